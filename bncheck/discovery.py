"""Which modules are BatchNorm layers, and what kind.

* ``_BatchNorm`` subclasses (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*, timm's
  BatchNormAct2d, ...) can run in train mode: ``kind = "batchnorm"``.
* Look-alikes that hold ``running_mean``/``running_var`` buffers but are not
  ``_BatchNorm`` (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) always
  normalize with their buffers: ``kind = "frozen"``; they are compared with the data.
* Submodules of a TorchScript archive keep their class in ``original_name``; the
  BatchNorm ones (by name, or any module with running buffers whose forward graph makes one
  ``batch_norm`` call: timm's BatchNormAct2d) are ``kind = "batchnorm"`` with
  ``scripted = True`` (no hooks there).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_MISSING = object()
_MOMENTUM_AS_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Scripted layers whose graph bncheck edited (a measuring twin): the momentum as saved."""

_SCRIPTED_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "_BatchNorm"}


@dataclass(frozen=True)
class BNLayer:
    name: str
    """Qualified name from ``named_modules()``."""
    module: nn.Module
    type_name: str
    kind: str
    """``batchnorm`` (has a train mode) or ``frozen`` (buffers only)."""
    scripted: bool
    """A TorchScript submodule: no hooks, statistics come from buffer updates."""
    frozen_by: Optional[str] = None
    """The module that keeps this layer in eval mode on purpose (a QAT fused ConvBn module after
    ``freeze_bn_stats``: ``freeze_bn=True``, its BN stays in eval through ``model.train()``)."""

    def buffer(self, name: str) -> Optional[Tensor]:
        value = getattr(self.module, name, None)
        return value if isinstance(value, Tensor) else None

    @property
    def running_mean(self) -> Optional[Tensor]:
        return self.buffer("running_mean")

    @property
    def running_var(self) -> Optional[Tensor]:
        return self.buffer("running_var")

    @property
    def weight(self) -> Optional[Tensor]:
        return self.buffer("weight")

    @property
    def eps(self) -> float:
        return float(getattr(self.module, "eps", 1e-5))

    @property
    def momentum(self) -> Optional[float]:
        """The module's momentum; for a traced TorchScript layer (no attribute) the constant
        its graph updates with; 0.1 (PyTorch's default) when nothing says."""
        value = getattr(self.module, "momentum", _MISSING)
        if value is _MISSING:
            value = scripted_momentum(self.module) if self.scripted else 0.1
        return None if value is None else float(value)

    @property
    def track_running_stats(self) -> bool:
        return bool(getattr(self.module, "track_running_stats", True)) and self.running_mean is not None

    @property
    def channels(self) -> int:
        for tensor in (self.running_mean, self.weight):
            if tensor is not None and not isinstance(tensor, nn.parameter.UninitializedTensorMixin):
                return int(tensor.numel())
        return int(getattr(self.module, "num_features", 0) or 0)


def scripted_bn_call(module: nn.Module) -> Optional[tuple[Any, int, int, Any]]:
    """The layer's one batch_norm call in its forward graph, with the positions of its
    momentum and training arguments; None when there is not exactly one."""
    try:
        graph = module._c._get_method("forward").graph
    except Exception:
        return None
    calls = []
    # scripted: F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    for node in graph.findAllNodes("prim::CallFunction"):
        function = node.inputsAt(0).node()
        if function.kind() == "prim::Constant" and function.hasAttribute("name") and function.s("name") == "batch_norm":
            calls.append((node, 7, 6, graph))  # inputs after the function itself
    # traced: aten::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    calls += [(node, 6, 5, graph) for node in graph.findAllNodes("aten::batch_norm")]
    if len(calls) != 1:
        return None
    node, momentum, _, _ = calls[0]
    if node.inputsSize() <= momentum or node.inputsAt(momentum).type().kind() != "FloatType":
        return None
    return calls[0]


def scripted_momentum(module: nn.Module) -> Optional[float]:
    """The update factor a TorchScript layer's batch_norm call uses, when it is a constant
    (traced graphs); 0.1 when it is computed (scripted code reads ``momentum`` at run time)
    or unknown."""
    if module in _MOMENTUM_AS_SAVED:
        return _MOMENTUM_AS_SAVED[module]
    call = scripted_bn_call(module)
    value = graph_constant(call[0].inputsAt(call[1])) if call is not None else None
    return value if isinstance(value, float) else 0.1


def graph_constant(value: Any) -> Any:
    """The value of a TorchScript graph value produced by a constant; None otherwise."""
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def remember_momentum(module: nn.Module, momentum: Optional[float]) -> None:
    """Before bncheck edits a scripted layer's graph: what its momentum was."""
    _MOMENTUM_AS_SAVED[module] = momentum


def graph_edited(module: nn.Module) -> bool:
    """Whether bncheck edited this scripted layer's graph (a measuring twin's layer)."""
    return module in _MOMENTUM_AS_SAVED


def _type_name(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", type(module).__name__)
    return getattr(module, "bncheck_type_name", type(module).__name__)


def _has_running_buffers(module: nn.Module) -> bool:
    own = dict(module.named_buffers(recurse=False))
    return isinstance(own.get("running_mean"), Tensor) and isinstance(own.get("running_var"), Tensor)


def find_bn_layers(model: nn.Module) -> list[BNLayer]:
    """Every BatchNorm-like layer of ``model``, in ``named_modules()`` order."""
    layers = []
    opaque: list[str] = []  # wrapped graphs whose buffer containers are not layers
    freezing: set[str] = set()  # QAT fused modules with freeze_bn=True
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in opaque):
            continue
        if getattr(module, "freeze_bn", None) is True:
            freezing.add(name)
        for child in getattr(module, "_bncheck_opaque_children", ()):
            opaque.append(f"{name}.{child}" if name else child)
        if isinstance(module, _BatchNorm):
            parent = name.rpartition(".")[0]
            layers.append(BNLayer(name, module, _type_name(module), "batchnorm", False,
                                  frozen_by=parent if parent in freezing else None))
        elif isinstance(module, torch.jit.ScriptModule):
            # by class name, or by what it does: BatchNorm subclasses (timm's BatchNormAct2d, ...)
            # keep their own name but make one batch_norm call on their running buffers
            if _has_running_buffers(module) and (_type_name(module) in _SCRIPTED_BN_NAMES
                                                 or scripted_bn_call(module) is not None):
                layers.append(BNLayer(name, module, _type_name(module), "batchnorm", True))
        elif _has_running_buffers(module):
            layers.append(BNLayer(name, module, _type_name(module), "frozen", False))
    return layers
