"""The interface every kind of runnable model implements, and what is the same for all.

A ``Runtime`` holds the model that runs (the caller's, or a measuring twin), its BN layers
with their facts resolved once (``BNLayer``), and the two access strategies:

* ``hooks``: a forward pre-hook (and, on request, a forward hook) hands each layer's input to
  the sink before the layer runs;
* ``buffers``: after a train-mode forward, each layer's batch statistics are recovered from
  its buffer update, ``mu_B = (r_new - (1 - m) r_old) / m`` (the same for the unbiased
  variance), with ``m`` the momentum applied in this run.

A kind of model is one subclass in its own module: ``claims`` says whether a model is of
that kind, ``layer_of`` turns one of its submodules into a ``BNLayer``, ``opaque`` names
children that are not layers (an exported graph's buffer containers), and ``measuring``
returns the runtime to measure on (a twin when the caller's model cannot be observed as is).
Discovery walks ``named_modules()`` once and asks every registered kind about each module,
so a model that mixes kinds (an eager model holding a scripted submodule) works too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable, ClassVar, Optional, Protocol

import torch
from torch import Tensor, nn

from bncheck.runtime.layer import BNLayer
from bncheck.runtime.state import set_bn_train_mode

LayerCallback = Callable[[int, Tensor], None]
"""``callback(layer_index, tensor)``: a layer's input, before (or after) it ran."""


class Sink(Protocol):
    """Where observations go (the statistics pass)."""

    def __call__(self, index: int, x: Tensor) -> None:
        """Layer ``index`` is about to run on ``x``."""

    def from_buffers(self, index: int, mean: Tensor, var: Tensor, samples: int) -> None:
        """Layer ``index`` ran in train mode on ``samples`` samples; its batch mean and unbiased
        variance, recovered from its buffer update."""


class Runtime:
    """One model as bncheck runs it."""

    kind: ClassVar[str] = "eager"
    kinds: ClassVar[tuple[type[Runtime], ...]] = ()
    """Every registered kind, most specific first (filled in by ``bncheck.runtime``)."""

    def __init__(self, model: nn.Module, caller: Optional[nn.Module] = None,
                 layers: Optional[Sequence[BNLayer]] = None) -> None:
        self.model = model
        """The module that runs."""
        self.caller = model if caller is None else caller
        """The caller's model (differs from ``model`` on a measuring twin)."""
        self.layers: tuple[BNLayer, ...] = tuple(discover(model, self.kinds) if layers is None else layers)

    # -- what a kind decides ---------------------------------------------------------------
    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """Whether ``model`` (the top-level module) is of this kind."""
        raise NotImplementedError

    @classmethod
    def layer_of(cls, name: str, module: nn.Module, frozen_by: Optional[str]) -> Optional[BNLayer]:
        """``module`` as a BN layer of this kind; None when it is not one (or not this kind's)."""
        return None

    @classmethod
    def owns(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind even when it is not a layer (no other kind may then
        read it as one: a TorchScript module with running buffers that is not BatchNorm)."""
        return False

    @classmethod
    def opaque(cls, module: nn.Module) -> tuple[str, ...]:
        """Children of ``module`` whose submodules are not layers of their own."""
        return ()

    def measuring(self) -> Runtime:
        """The runtime to measure on: this one, unless the caller's model cannot be observed
        as it is (then a twin whose ``caller`` is the caller's model)."""
        return self

    # -- the same for every kind -------------------------------------------------------------
    def set_mode(self, bn_training: bool) -> None:
        """Everything in eval; BN layers with a train mode in ``bn_training``."""
        set_bn_train_mode(self.model, self.layers, bn_training)

    def caller_buffers(self) -> dict[str, Tensor]:
        """The caller's own buffers by state_dict key (where results are written back)."""
        return dict(self.caller.named_buffers())

    @contextmanager
    def observe(self, sink: Sink, after: Optional[dict[int, LayerCallback]] = None) -> Iterator[Observation]:
        """Hooks on every hook-measured layer (removed on exit, even on error) and the buffer
        readings of the others; ``after[i]`` also sees layer ``i``'s input after it ran."""
        observation = Observation(self.layers, sink)
        handles = []
        try:
            for index, layer in enumerate(self.layers):
                if layer.by_buffers:
                    continue
                handles.append(layer.module.register_forward_pre_hook(_pre_hook(sink, index)))
                if after and index in after:
                    handles.append(layer.module.register_forward_hook(_post_hook(after[index], index)))
            yield observation
        finally:
            for handle in handles:
                handle.remove()


class Observation:
    """What one ``observe`` block reads after each forward: the buffer-measured layers'
    batch statistics (train mode), from the buffers as they were when it began."""

    def __init__(self, layers: Sequence[BNLayer], sink: Sink) -> None:
        self._sink = sink
        self._before: dict[int, tuple[Tensor, Tensor, int]] = {}
        for index, layer in enumerate(layers):
            if layer.by_buffers and layer.track_running_stats:
                tracked = layer.buffer("num_batches_tracked")
                self._before[index] = (layer.running_mean.detach().clone(), layer.running_var.detach().clone(),
                                       int(tracked) if tracked is not None else 0)
        self._layers = layers

    @property
    def reads_buffers(self) -> bool:
        """Whether any layer is measured from its buffers (then every forward must start from
        the saved ones: a graph traced in train mode updates them even in eval mode)."""
        return bool(self._before)

    def after_forward(self, mode: str, samples: int) -> None:
        """After a forward of ``samples`` samples in ``mode`` (before the buffers are restored).

        The number of values per channel is unknown inside a graph, so the variance stays
        unbiased (an over-estimate by n/(n-1): under 1% once n = N*H*W > 100)."""
        if mode != "train":
            return
        for index, (mean_old, var_old, tracked_old) in self._before.items():
            layer = self._layers[index]
            momentum = layer.update_momentum
            if momentum is None:
                momentum = 1.0 / (tracked_old + 1)
            mean_new, var_new = layer.running_mean.detach(), layer.running_var.detach()
            if momentum <= 0.0 or torch.equal(mean_new, mean_old) and torch.equal(var_new, var_old):
                continue  # momentum 0 (or the layer was not called): the update carries no statistics
            batch_mean = (mean_new.double() - (1.0 - momentum) * mean_old.double()) / momentum
            batch_var = (var_new.double() - (1.0 - momentum) * var_old.double()) / momentum
            self._sink.from_buffers(index, batch_mean, batch_var.clamp_min(0.0), max(samples, 1))


def _pre_hook(sink: Sink, index: int) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            sink(index, args[0])

    return hook


def _post_hook(call: LayerCallback, index: int) -> Callable:
    def hook(_module: nn.Module, args: tuple, _out: object) -> None:
        if args and isinstance(args[0], Tensor):
            call(index, args[0])

    return hook


def discover(model: nn.Module, kinds: Sequence[type[Runtime]]) -> list[BNLayer]:
    """Every BN layer of ``model`` in ``named_modules()`` order, each from the first kind that
    knows its module."""
    layers = []
    opaque: list[str] = []
    freezing: set[str] = set()  # QAT fused modules with freeze_bn=True
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in opaque):
            continue
        if getattr(module, "freeze_bn", None) is True:
            freezing.add(name)
        parent = name.rpartition(".")[0]
        for kind in kinds:
            opaque += [f"{name}.{child}" if name else child for child in kind.opaque(module)]
            layer = kind.layer_of(name, module, parent if parent in freezing else None)
            if layer is not None:
                layers.append(layer)
            if layer is not None or kind.owns(module):
                break
    return layers
