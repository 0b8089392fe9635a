"""Making TorchScript BN layers measurable whose buffer update carries nothing.

A scripted BN layer has no hooks; its batch statistics are recovered from its buffer update
(``collect``): ``mu_B = (r_new - (1 - m) r_old) / m``. With momentum 0 -- the seed bug,
scripted for deployment -- the update carries nothing. The momentum is a constant baked into
each layer's graph, so bncheck measures on a *twin*: the model saved and loaded again in
memory (the user's module is never touched), whose BN graphs get momentum 1 before their
first run. The twin's layers then store exactly their batch mean and unbiased variance after
each train-mode call. Their ``momentum`` attribute still reads the real value, so every
finding reasons from what the model does; ``recovery_momentum`` tells the recovery the
factor actually applied. A model traced in eval mode has ``training=False`` frozen into each
BN call, so its buffers never move either: the twin's calls follow the module's flag again.
A layer whose graph does not have the expected single batch_norm call is left alone (it
stays ``unmeasurable``).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .discovery import find_bn_layers, graph_constant, graph_edited, remember_momentum, scripted_bn_call


def recovery_momentum(module: nn.Module, default: Any) -> Any:
    """The update factor a scripted layer applies in this run (1.0 on a twin)."""
    return 1.0 if graph_edited(module) else default


def measurable(model: nn.Module) -> nn.Module:
    """``model`` itself, or -- for a TorchScript model with a BN layer whose buffer update
    carries nothing (momentum 0, or traced in eval mode: ``training`` a constant False) -- a
    twin whose BN layers follow the module's mode and update with momentum 1 (same
    parameters and buffers, separate tensors)."""
    if not isinstance(model, torch.jit.ScriptModule):
        return model
    if not any(_stuck(layer) for layer in find_bn_layers(model) if layer.scripted):
        return model
    try:
        twin = _reloaded(model)
    except Exception:  # an archive that cannot round-trip in memory: measure as before
        return model
    edited = 0
    for layer in find_bn_layers(twin):
        saved = layer.momentum
        if layer.scripted and _stuck(layer) and _edit(layer.module):
            remember_momentum(layer.module, saved)
            edited += 1
    return twin if edited else model


def _stuck(layer: Any) -> bool:
    """A scripted BN layer whose train-mode call tells nothing through its buffers."""
    return layer.momentum == 0.0 or traced_training(layer.module) is False


def traced_training(module: nn.Module) -> Optional[bool]:
    """The ``training`` value tracing froze into a TorchScript BN layer's batch_norm call, or
    None when the call follows the module's flag (scripted code, or a twin already edited).
    True means the layer normalizes with batch statistics even after ``.eval()``."""
    call = scripted_bn_call(module)
    if call is None:
        return None
    value = graph_constant(call[0].inputsAt(call[2]))
    return value if isinstance(value, bool) else None


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


def _edit(module: nn.Module) -> bool:
    """Before the graph ever ran (a graph already run keeps its compiled plan): the batch_norm
    call's momentum becomes 1.0, and a ``training`` frozen into the graph by tracing becomes
    the module's own flag again."""
    call = scripted_bn_call(module)
    if call is None:
        return False
    node, momentum, training, graph = call
    if graph_constant(node.inputsAt(training)) is False:
        flag = graph.create("prim::GetAttr", [next(graph.inputs())])
        flag.s_("name", "training")
        flag.output().setType(torch._C.BoolType.get())
        flag.insertBefore(node)
        node.replaceInput(training, flag.output())
    one = graph.insertConstant(1.0)
    one.node().moveBefore(node)
    node.replaceInput(momentum, one)
    return True
