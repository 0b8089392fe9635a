"""Making TorchScript BN layers with momentum 0 measurable.

A scripted BN layer has no hooks; its batch statistics are recovered from its buffer update
(``collect``): ``mu_B = (r_new - (1 - m) r_old) / m``. With momentum 0 -- the seed bug,
scripted for deployment -- the update carries nothing. The momentum is a constant baked into
each layer's graph, so bncheck measures on a *twin*: the model saved and loaded again in
memory (the user's module is never touched), whose BN graphs get momentum 1 before their
first run. The twin's layers then store exactly their batch mean and unbiased variance after
each train-mode call. Their ``momentum`` attribute still reads the real value, so every
finding reasons from what the model does; ``recovery_momentum`` tells the recovery the
factor actually applied. A layer whose graph does not have the expected single batch_norm
call is left alone (it stays ``unmeasurable``).
"""

from __future__ import annotations

import io
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from .discovery import find_bn_layers

_RECOVERY: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def recovery_momentum(module: nn.Module, default: Any) -> Any:
    """The update factor a scripted layer applies in this run (1.0 on a twin)."""
    return _RECOVERY.get(module, default)


def measurable(model: nn.Module) -> nn.Module:
    """``model`` itself, or -- for a TorchScript model with a BN layer of momentum 0 -- a twin
    whose BN layers update with momentum 1 (same parameters and buffers, separate tensors)."""
    if not isinstance(model, torch.jit.ScriptModule):
        return model
    stuck = [layer for layer in find_bn_layers(model) if layer.scripted and layer.momentum == 0.0]
    if not stuck:
        return model
    try:
        twin = _reloaded(model)
    except Exception:  # an archive that cannot round-trip in memory: measure as before
        return model
    edited = 0
    for layer in find_bn_layers(twin):
        if layer.scripted and layer.momentum == 0.0 and _momentum_one(layer.module):
            _RECOVERY[layer.module] = 1.0
            edited += 1
    return twin if edited else model


def _reloaded(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
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


def _momentum_one(module: nn.Module) -> bool:
    """Replace the momentum argument of the layer's one batch_norm call with 1.0, before the
    graph ever ran (a graph already run keeps its compiled plan)."""
    try:
        graph = module._c._get_method("forward").graph
    except Exception:
        return False
    calls = []
    for node in graph.findAllNodes("prim::CallFunction"):
        function = node.inputsAt(0).node()
        if function.kind() == "prim::Constant" and function.hasAttribute("name") and function.s("name") == "batch_norm":
            calls.append((node, 7))  # (fn, input, running_mean, running_var, weight, bias, training, momentum, eps)
    # aten::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    calls += [(node, 6) for node in graph.findAllNodes("aten::batch_norm")]
    if len(calls) != 1:
        return False
    node, index = calls[0]
    if node.inputsSize() <= index or node.inputsAt(index).type().kind() != "FloatType":
        return False
    one = graph.insertConstant(1.0)
    one.node().moveBefore(node)
    node.replaceInput(index, one)
    return True
