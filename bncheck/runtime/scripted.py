"""TorchScript models (``torch.jit.script``, or ``torch.jit.trace`` in either mode).

Submodules of a TorchScript archive keep their class in ``original_name``; the BatchNorm
ones (by name, or any module with running buffers whose forward graph makes one
``batch_norm`` call: timm's BatchNormAct2d) are layers measured from their buffer updates:
hooks do not reach into a graph.

With momentum 0 -- the seed bug, scripted for deployment -- or ``training=False`` frozen into
the graph by tracing in eval mode, that update carries nothing. The momentum is a constant
baked into each layer's graph, so bncheck measures on a *twin* (``measuring``): the model
saved and loaded again in memory (the caller's module is never touched), whose stuck BN
graphs get momentum 1 and follow the module's mode again before their first run. The twin's
layers then store exactly their batch mean and unbiased variance after each train-mode call.
Their facts (momentum as saved, traced ``training``) are the caller's layers', so every finding
reasons from what the model does; ``applied_momentum`` tells the recovery what the twin
applies. A layer whose graph does not have the expected single batch_norm call is left alone
(it stays unmeasurable).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bncheck.runtime.base import Runtime
from bncheck.runtime.eager import has_running_buffers
from bncheck.runtime.layer import BUFFERS, BNLayer

_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "_BatchNorm"}
_MISSING = object()


class ScriptedRuntime(Runtime):
    kind = "torchscript"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return isinstance(model, torch.jit.ScriptModule)

    @classmethod
    def owns(cls, module: nn.Module) -> bool:
        return isinstance(module, torch.jit.ScriptModule)

    @classmethod
    def layer_of(cls, name: str, module: nn.Module, frozen_by: Optional[str]) -> Optional[BNLayer]:
        if not isinstance(module, torch.jit.ScriptModule):
            return None
        type_name = getattr(module, "original_name", type(module).__name__)
        # by class name, or by what it does: BatchNorm subclasses (timm's BatchNormAct2d, ...)
        # keep their own name but make one batch_norm call on their running buffers
        call = _bn_call(module)
        if not has_running_buffers(module) or (type_name not in _BN_NAMES and call is None):
            return None
        value, source = getattr(module, "momentum", _MISSING), "module"
        if value is _MISSING:  # traced: no attribute, the constant in its graph
            constant = _constant(call[0].inputsAt(call[1])) if call is not None else None
            value, source = (constant, "graph") if isinstance(constant, float) else (0.1, "default")
        training = _constant(call[0].inputsAt(call[2])) if call is not None else None
        return BNLayer(name, module, type_name, "batchnorm", access=BUFFERS,
                       momentum=None if value is None else float(value), momentum_from=source,
                       traced_training=training if isinstance(training, bool) else None)

    def measuring(self) -> Runtime:
        """This runtime, or one over a twin whose stuck layers (momentum 0, or ``training``
        traced as False) update with momentum 1 in train mode; same parameters and buffers,
        separate tensors."""
        if self.model is not self.caller or not any(_stuck(layer) for layer in self.layers):
            return self
        try:
            twin = _reloaded(self.model)
        except Exception:  # an archive that cannot round-trip in memory: measure as before
            return self
        modules = dict(twin.named_modules())
        layers, edited = [], 0
        for layer in self.layers:
            module = modules[layer.name]
            if _stuck(layer) and _edit(module):
                layers.append(replace(layer, module=module, applied_momentum=1.0))
                edited += 1
            else:
                layers.append(replace(layer, module=module))
        return ScriptedRuntime(twin, caller=self.caller, layers=layers) if edited else self


def load_archive(path: Path) -> nn.Module:
    """``torch.jit.load``: runs the archive's code (callers ask for trust first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


def save_archive(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.save is deprecated in torch 2.14, still the format's writer
        torch.jit.save(module, str(path))


def _stuck(layer: BNLayer) -> bool:
    """A layer whose train-mode call tells nothing through its buffers."""
    return layer.by_buffers and (layer.momentum == 0.0 or layer.traced_training is False)


def _bn_call(module: nn.Module) -> Optional[tuple[Any, int, int, Any]]:
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


def _constant(value: Any) -> Any:
    """The value of a TorchScript graph value produced by a constant; None otherwise."""
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def _reloaded(model: nn.Module) -> nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    location = tensors[0].device if tensors else torch.device("cpu")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.save/load are deprecated in torch 2.14, still the format
        torch.jit.save(model, buffer)
        buffer.seek(0)
        twin = torch.jit.load(buffer, map_location=location)
    for (_, mine), (_, theirs) in zip(model.named_modules(), twin.named_modules()):
        theirs.training = mine.training  # (jit.save keeps them; belt and braces)
    return twin


def _edit(module: nn.Module) -> bool:
    """Before the graph ever ran (a graph already run keeps its compiled plan): the batch_norm
    call's momentum becomes 1.0, and a ``training`` frozen into the graph by tracing becomes
    the module's own flag again."""
    call = _bn_call(module)
    if call is None:
        return False
    node, momentum, training, graph = call
    if _constant(node.inputsAt(training)) is False:
        flag = graph.create("prim::GetAttr", [next(graph.inputs())])
        flag.s_("name", "training")
        flag.output().setType(torch._C.BoolType.get())
        flag.insertBefore(node)
        node.replaceInput(training, flag.output())
    one = graph.insertConstant(1.0)
    one.node().moveBefore(node)
    node.replaceInput(momentum, one)
    return True
