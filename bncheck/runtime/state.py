"""Side-effect-free access to a model: state snapshots, fingerprints and mode switching.

A run must leave the model bit-identical. ``preserved_state`` snapshots every buffer
(``running_mean``, ``running_var``, ``num_batches_tracked`` and any other) and every
module's ``training`` flag, and restores them in ``finally``; ``fingerprint`` lets the
caller prove it. ``set_bn_train_mode`` is the one way every pass switches modes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bncheck.runtime.layer import BNLayer


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes, plus
    every module's ``training`` flag."""
    digest = hashlib.sha256()
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in items:
            if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
                digest.update(f"{kind}:{name}:uninitialized".encode())
                continue
            t = tensor.detach()
            digest.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                digest.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    for name, module in model.named_modules():
        digest.update(f"t:{name}:{module.training}".encode())
    return digest.hexdigest()


class StateSnapshot:
    """Copies of every buffer and ``training`` flag, restorable any number of times."""

    def __init__(self, model: nn.Module) -> None:
        self._buffers: list[tuple[Tensor, Tensor]] = [
            (buf, buf.detach().clone())
            for _, buf in model.named_buffers()
            if not isinstance(buf, nn.parameter.UninitializedTensorMixin)
        ]
        self._training = [(module, module.training) for module in model.modules()]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for live, saved in self._buffers:
                live.copy_(saved)

    def restore(self) -> None:
        self.restore_buffers()
        for module, flag in self._training:
            # Module.train() recurses into children; set each module's own flag only.
            module.training = flag


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[StateSnapshot]:
    snapshot = StateSnapshot(model)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def set_bn_train_mode(model: nn.Module, layers: Sequence[BNLayer], bn_training: bool) -> None:
    """Everything in eval mode (Dropout and friends stay deterministic); BN layers that
    have a train mode get ``bn_training``. Frozen look-alikes stay in eval."""
    model.eval()
    if bn_training:
        for layer in layers:
            if layer.kind == "batchnorm":
                layer.module.train()
