"""Eager ``nn.Module`` models: hooks see every BN layer's input.

* ``_BatchNorm`` subclasses (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*, timm's
  BatchNormAct2d, ...) can run in train mode: ``kind = "batchnorm"``.
* Look-alikes that hold ``running_mean``/``running_var`` buffers but are not
  ``_BatchNorm`` (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) always
  normalize with their buffers: ``kind = "frozen"``; they are compared with the data.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncheck.runtime.base import Runtime
from bncheck.runtime.layer import BNLayer

# BN modules whose forward is torch's own besides _BatchNorm's: a momentum-1 update stores
# exactly the batch statistics. SyncBatchNorm is left out: its buffers hold every rank's batch.
_NATIVE_FORWARDS = ("BatchNormAct2d",)


class EagerRuntime(Runtime):
    kind = "eager"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    @classmethod
    def layer_of(cls, name: str, module: nn.Module, frozen_by: Optional[str]) -> Optional[BNLayer]:
        if isinstance(module, _BatchNorm):
            return batchnorm_layer(name, module, type(module).__name__, frozen_by=frozen_by)
        if has_running_buffers(module):
            return BNLayer(name, module, type(module).__name__, "frozen", momentum=_momentum(module))
        return None


def batchnorm_layer(name: str, module: _BatchNorm, type_name: str, **facts: object) -> BNLayer:
    """A ``_BatchNorm`` module (any subclass) as a hook-measured layer."""
    layer = BNLayer(name, module, type_name, "batchnorm", momentum=_momentum(module), **facts)
    native = (
        not isinstance(module, nn.SyncBatchNorm)
        and (type(module).forward is _BatchNorm.forward or type(module).__name__ in _NATIVE_FORWARDS)
        and layer.track_running_stats and layer.running_var is not None
    )
    return replace(layer, native=native)


def _momentum(module: nn.Module) -> Optional[float]:
    value = getattr(module, "momentum", 0.1)
    return None if value is None else float(value)


def has_running_buffers(module: nn.Module) -> bool:
    own = dict(module.named_buffers(recurse=False))
    return isinstance(own.get("running_mean"), Tensor) and isinstance(own.get("running_var"), Tensor)
