"""One interface over every kind of model that runs (``Runtime``): eager modules,
TorchScript archives (scripted, traced in eval or train mode) and ``torch.export`` programs.

``runtime_for(model)`` picks the kind; its ``layers`` are the BN layers with their facts
resolved once, ``observe`` feeds their inputs to a sink, ``measuring()`` gives the runtime to
measure on (a twin for TorchScript layers whose buffer update carries nothing), and
``caller_buffers`` is where results go back. Nothing outside this package knows which kind a
model is. A new kind is one module with a ``Runtime`` subclass, listed in ``KINDS``.
"""

from __future__ import annotations

from torch import nn

from bncheck.runtime.base import Observation, Runtime, Sink
from bncheck.runtime.eager import EagerRuntime
from bncheck.runtime.exported import ExportedRuntime
from bncheck.runtime.layer import BUFFERS, HOOKS, BNLayer
from bncheck.runtime.scripted import ScriptedRuntime
from bncheck.runtime.state import StateSnapshot, checksum, fingerprint, preserved_state, set_bn_train_mode

KINDS: tuple[type[Runtime], ...] = (ScriptedRuntime, ExportedRuntime, EagerRuntime)
"""Most specific first: the first that claims a model runs it; discovery asks each about
every submodule in this order."""
Runtime.kinds = KINDS


def runtime_for(model: nn.Module) -> Runtime:
    """The runtime of ``model``'s kind (discovery only: nothing is copied or edited)."""
    kind = next(kind for kind in KINDS if kind.claims(model))
    return kind(model)


def find_bn_layers(model: nn.Module) -> list[BNLayer]:
    """Every BatchNorm-like layer of ``model``, in ``named_modules()`` order."""
    return list(runtime_for(model).layers)


__all__ = [
    "BUFFERS", "HOOKS", "KINDS", "BNLayer", "EagerRuntime", "ExportedRuntime", "Observation", "Runtime",
    "ScriptedRuntime", "Sink", "StateSnapshot", "checksum", "find_bn_layers", "fingerprint", "preserved_state",
    "runtime_for", "set_bn_train_mode",
]
