"""Everything ``torch.save`` writes: state_dicts in any nesting (Lightning, timm's EMA entries, key
prefixes) read with ``weights_only``, and pickled modules only when trusted."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bncheck.errors import InputError
from bncheck.reading.architectures import NESTED_KEYS, locate_state_dict, weight_entries
from bncheck.reading.formats.base import Checkpoint, Format, Probe, model_from_state, put_buffers
from bncheck.reporting.report import ModelInfo


class TorchPickleFormat(Format):
    """Everything ``torch.save`` writes: a state_dict (plain, nested under ``state_dict``/
    ``model``/``ema``/..., Lightning ``.ckpt`` with its other entries, any key prefix) or,
    only when trusted, a pickled module (alone or inside a dict)."""

    name = "state_dict"

    def sniff(self, probe: Probe) -> bool:
        return True  # the fallback: torch.load says what it is

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        path = probe.path
        obj = _torch_load(path, trusted)
        if isinstance(obj, nn.Module):
            return Checkpoint(obj, ModelInfo(str(path), arch, "pickled-module", digest, 0), path, self, container=obj)
        if isinstance(obj, Mapping) and arch is None:
            for key in NESTED_KEYS:
                if isinstance(obj.get(key), nn.Module):
                    info = ModelInfo(str(path), None, "pickled-module", digest, 0)
                    return Checkpoint(obj[key], info, path, self, container=obj)
        state, locator = locate_state_dict(obj, path, probe.select)
        model, prefix = model_from_state(state, path, arch, arch_kwargs)
        chosen = locator[0] if locator else None
        others = tuple(entry for entry in weight_entries(obj) if entry != chosen)
        info = ModelInfo(str(path), arch, self.name, digest, 0, weights_key=".".join(locator) or None,
                         other_weights=others)
        return Checkpoint(model, info, path, self, container=obj, locator=locator, prefix=prefix)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        # The container holds the very module object that was analysed (pickled-module) or
        # the state_dict mapping the weights came from: put the new buffers there.
        if checkpoint.format == "state_dict":
            mapping = checkpoint.container
            for key in checkpoint.locator:
                mapping = mapping[key]
            put_buffers(mapping, checkpoint)
        torch.save(checkpoint.container, str(tmp))


def _safe_globals() -> Any:
    """Plain-data classes a training checkpoint holds beside its weights, allowed in a
    ``weights_only`` load: timm's CheckpointSaver pickles its ``args`` (an argparse.Namespace,
    attributes only, no code runs to rebuild one)."""
    import argparse
    import contextlib

    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()


def _torch_load(path: Path, trusted: bool) -> Any:
    try:
        with warnings.catch_warnings(), _safe_globals():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
        with path.open("rb") as fh:
            plain_pickle = fh.read(2) in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}
        if found or plain_pickle or "Unsupported class" in text:
            what = f" (it references {found.group(1)})" if found else ""
            raise InputError(
                f"{path} holds pickled Python objects{what}, e.g. a whole model saved with "
                "torch.save(model); loading it executes code: rerun with $trust_checkpoint "
                "if you trust the file, or save model.state_dict() instead"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise _unreadable(path, detail.group(1) if detail else text) from None
    except Exception as exc:
        raise _unreadable(path, str(exc) or type(exc).__name__) from None


def _unreadable(path: Path, reason: str) -> InputError:
    """One line for a file torch.load cannot read: what it looks like, and torch's reason
    cut to its first sentence."""
    with path.open("rb") as fh:
        head = fh.read(512)
    try:
        looks_like_text = all(ch.isprintable() or ch in "\r\n\t" for ch in head.decode("utf-8"))
    except UnicodeDecodeError:  # binary (or text cut mid-character: then the generic message)
        looks_like_text = False
    if looks_like_text:
        return InputError(f"{path} is a text file, not a PyTorch checkpoint; pass the file written by torch.save")
    first = (reason.strip().splitlines() or [""])[0]
    first = re.split(r"(?<=[a-z])\. ", first)[0].rstrip(".")[:120]
    return InputError(
        f"{path} is not a readable PyTorch checkpoint ({first}); check that the file is complete "
        "(not truncated by a download or copy) and was written by torch.save"
    )
