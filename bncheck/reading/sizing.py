"""A model built from a description (``--arch`` with its kwargs, a model folder's config) is
sized before it is allocated: built once on the meta device, where tensors have shapes and no
storage, and refused when it would not fit. A config from a stranger that asks for
``hidden_sizes: [100000, ...]`` costs a refusal, not 27 GB."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Callable, Optional

from torch import Tensor, nn

from bncheck.errors import InputError

LIMIT_VARIABLE = "BNCHECK_MAX_MODEL_GB"
DEFAULT_LIMIT_GB = 4.0
"""Largest model (parameters + buffers) built from a description, in GiB: every BN network of
torchvision and timm is below 1.5 GiB in float32."""
WEIGHTS_MARGIN = 4
"""A model folder's config may describe a model at most this many times its weights' bytes
(float16 weights of a float32 model are 2x), plus 64 MiB."""


def model_limit_bytes() -> int:
    text = os.environ.get(LIMIT_VARIABLE)
    if text is None:
        return int(DEFAULT_LIMIT_GB * 1024**3)
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{LIMIT_VARIABLE}={text!r} is not a number of GiB; set e.g. {LIMIT_VARIABLE}=16") from None
    if not value > 0:
        raise InputError(f"{LIMIT_VARIABLE}={text!r} must be a positive number of GiB")
    return int(value * 1024**3)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each shared tensor once."""
    return tensor_bytes({id(t): t for t in (*model.parameters(), *model.buffers())}.values())


def build_sized(build: Callable[[], nn.Module], what: str, weights_bytes: Optional[int] = None) -> nn.Module:
    """``build()`` after a meta-device build of the same model passed the size checks. A
    builder that cannot run on the meta device (it reads tensor values while building) is
    built as it is: its code is a library's or the user's, the sizes are what bncheck bounds."""
    import torch

    try:
        with torch.device("meta"):
            probe = build()
    except Exception:
        probe = None
    if isinstance(probe, nn.Module):
        size = model_bytes(probe)
        del probe
        limit = model_limit_bytes()
        if size > limit:
            raise InputError(
                f"{what} describes a model of {size / 1024**3:.1f} GiB, above the {limit / 1024**3:.1f} GiB limit; "
                f"check its size settings, or raise the limit with {LIMIT_VARIABLE}=N if it is right")
        if weights_bytes is not None and size > WEIGHTS_MARGIN * weights_bytes + 64 * 1024**2:
            raise InputError(
                f"{what} describes a model of {size / 1024**2:.0f} MiB, but the weights beside it hold "
                f"{weights_bytes / 1024**2:.1f} MiB; the config does not match its weights: re-save the folder")
    return build()
