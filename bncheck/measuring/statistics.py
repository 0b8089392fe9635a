"""The statistics pass: run a model over batches with a hook on every BN layer and pool,
per layer and per mode, the per-channel statistics of the layer's input.

One job, reused by ``analyze`` (an eval-mode and a train-mode forward per batch),
``recalibrate`` (train mode only) and a distributed all-reduce (the pooled
``ChannelMoments`` are plain sums). The model is left as it was: every buffer and
``training`` flag is restored (buffers after each train-mode forward, so batch ``k`` never
sees the running-stat updates of batch ``k-1``), and hooks are removed, even on error.

Recalibration can also take each layer's batch statistics from BatchNorm itself (``native``):
with the layer's momentum set to 1 for the pass, its running buffers hold exactly the batch
mean and unbiased variance after each call, which BatchNorm computed anyway -- the hook's own
reduction over the input (about what the layer itself costs) is skipped. Per-sample statistics
are still taken on some batches (the first ``NATIVE_SPREAD_SAMPLES`` samples, then batches 4,
8, 16, ... so they span the data), because the noise estimate needs their spread, and on those
batches the buffers are checked against the hook's numbers: a layer whose buffers disagree (a
forward that chunks its input, runs elsewhere, ignores momentum) stays on the hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from bncheck.errors import InternalError
from bncheck.judging.metrics import ChannelMoments
from bncheck.measuring.batches import batch_len, forward
from bncheck.runtime import BNLayer, Observation, Runtime, StateSnapshot, preserved_state

NATIVE_SPREAD_SAMPLES = 32
"""With ``native``: per-sample statistics (the noise estimate's groups) on every batch until
this many samples were seen, then on batches whose number is a power of two."""
# Buffers must match the hook's statistics to this fraction of the channel's std / variance.
_NATIVE_TOLERANCE = 1e-3

# Above this ratio of squared mean to variance, E[x^2] - mean^2 in float32 loses more than
# ~0.1% of the variance to cancellation; such inputs take the exact (slower) path.
_CANCELLATION_RATIO = 1e4
# Recalibration writes these numbers into a checkpoint: there the fast path's error,
# ~5e-7 x (1 + mean^2/var) relative, must stay within a few 1e-6 (four orders below the
# sampling error of any sample it is given), so the exact path starts at a ratio of 10.
_PRECISE_RATIO = 10.0


def per_sample_stats(x: Tensor, *, precise: bool = False) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance of each sample's channel over its positions: ``[N, C]`` each,
    plus positions per sample. An ``[N, C]`` input has one value per sample (variance 0).

    Fast path: the mean and ``||x||`` per row are plain reductions that run at memory speed
    (``torch.var_mean``'s Welford pass is ~15x slower on CPU); the variance is then
    ``||x||^2 / n - mean^2``. Rows whose mean dwarfs their spread would lose precision to
    cancellation, so then the exact two-pass ``var_mean`` is used: from mean^2/var > 1e4 for
    diagnosis (error up to ~5e-3), from > 10 with ``precise=True`` (recalibration writes these
    numbers into a checkpoint: error up to ~6e-6). Reduced in float32 (float64 stays
    float64); pooled in float64 by ``ChannelMoments``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.dim() == 2:
        return x, torch.zeros_like(x), 1
    n, c = x.shape[0], x.shape[1]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows, dim = x.permute(0, 2, 3, 1).reshape(n, -1, c), 1  # reduce without a copy
    else:
        rows, dim = x.reshape(n, c, -1), 2
    positions = rows.shape[dim]
    if rows.is_cuda:  # exact and fast there; no data-dependent branch, so no host sync per layer
        var, mean = torch.var_mean(rows, dim=dim, correction=0)
        return mean, var, positions
    mean = rows.mean(dim)
    second = torch.linalg.vector_norm(rows, dim=dim) ** 2 / positions
    var = (second - mean**2).clamp_min_(0.0)
    if bool((mean**2 > (_PRECISE_RATIO if precise else _CANCELLATION_RATIO) * var).any()):
        var, mean = torch.var_mean(rows, dim=dim, correction=0)
    return mean, var, positions


@dataclass
class LayerStats:
    """What the passes learned about one BN layer."""

    layer: BNLayer
    saved_training: bool
    """The module's ``training`` flag when the run started (how it was saved)."""
    train: Optional[ChannelMoments] = None
    """Pooled statistics of the layer's input in the train-mode pass."""
    eval: Optional[ChannelMoments] = None
    """Pooled statistics of the layer's input in the eval-mode pass."""
    depth: Optional[int] = None
    """Order of the layer's first call (0 = first BN the input reaches); None: never called."""
    train_calls: int = 0
    """Train-mode calls pooled (more than the batches when a module runs several times per forward)."""


class StatisticsPass:
    """Hook target and driver: ``forward(inputs, mode)`` runs the model in ``eval`` (every
    module in eval) or ``train`` (only BN layers in train mode) and pools each BN input into
    that mode's moments."""

    def __init__(self, runtime: Runtime, snapshot: StateSnapshot, precise: bool, native: bool = False) -> None:
        self.runtime = runtime
        self.model = runtime.model
        self.layers = list(runtime.layers)
        self.stats = [LayerStats(layer, layer.module.training) for layer in self.layers]
        self._snapshot = snapshot
        self._precise = precise
        self._mode = "eval"
        self._next_depth = 0
        self.native: dict[int, bool] = {i: False for i, layer in enumerate(self.layers) if native and layer.native}
        """Layers that may use BN's own batch statistics; True once their buffers were checked."""
        self._checking: dict[int, tuple[Tensor, Tensor]] = {}
        self._train_batches = 0
        self._train_samples = 0
        self._hook_all = True
        self.batch_means: dict[int, list[tuple[Tensor, Tensor, int]]] = {}
        """Per layer (index) and eval-mode call: mean and variance of the per-sample channel
        means, and the number of samples."""
        self.observation: Optional[Observation] = None
        """Set by ``statistics_pass``: reads buffer-measured layers after each forward."""

    def forward(self, inputs: Any, mode: str) -> Any:
        self._mode = mode
        self.runtime.set_mode(bn_training=mode == "train")
        if mode == "train":
            self._train_batches += 1
            number = self._train_batches
            self._hook_all = self._train_samples < NATIVE_SPREAD_SAMPLES or number & (number - 1) == 0
        out = forward(self.model, inputs, mode)
        if mode == "train":
            n = batch_len(inputs)
            self._train_samples += n
            self.observation.after_forward(mode, n)
            self._snapshot.restore_buffers()
        elif self.observation.reads_buffers:
            # a graph traced in train mode updates its buffers even in eval mode; the next
            # train-mode reading must start from the saved ones
            self._snapshot.restore_buffers()
        return out

    def _mark_called(self, entry: LayerStats) -> None:
        if entry.depth is None:
            entry.depth = self._next_depth
            self._next_depth += 1
        if self._mode == "train":
            entry.train_calls += 1

    def _add(self, entry: LayerStats, means: Tensor, variances: Tensor, per_group: int) -> None:
        if means.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64: pool on the host
            means, variances = means.cpu(), variances.cpu()
        moments = getattr(entry, self._mode)
        if moments is None:
            moments = ChannelMoments(means.shape[1], device=means.device)
            setattr(entry, self._mode, moments)
        moments.add_groups(means, variances, per_group)

    def __call__(self, index: int, x: Tensor) -> None:
        entry = self.stats[index]
        self._mark_called(entry)
        if x.dim() < 2 or x.shape[0] == 0:
            return
        if self._mode == "train" and self.native.get(index) and not self._hook_all:
            return  # after_call takes BN's own statistics
        means, variances, positions = per_sample_stats(x, precise=self._precise)
        self._add(entry, means, variances, positions)
        if self._mode == "train" and index in self.native:
            self._checking[index] = (means, variances)
        if self._mode == "eval" and means.shape[0] >= 2:
            # per layer and batch: how batch means spread tells whether batches were drawn
            # alike (a batch of one class differs from the others far beyond sampling). The
            # eval pass, because in train mode every BN re-centres each batch and hides it
            # from the layers after; kept on the device, a [C] pair per call
            self.batch_means.setdefault(index, []).append(
                (means.double().mean(0), means.double().var(0, correction=1), int(means.shape[0]))
            )

    def after_call(self, index: int, x: Tensor) -> None:
        """After a native-candidate layer ran in train mode: its buffers hold this call's batch
        mean and unbiased variance (momentum 1). Check them against the hook's numbers, or
        pool them when the hook was skipped."""
        if self._mode != "train" or index not in self.native or x.dim() < 2 or x.shape[0] == 0:
            return
        layer = self.layers[index]
        values = x.numel() // x.shape[1]
        if values < 2:
            return
        mean = _float64(layer.running_mean)
        var = _float64(layer.running_var) * ((values - 1) / values)
        checking = self._checking.pop(index, None)
        if checking is not None:
            means, variances = (_float64(t) for t in checking)
            hook_mean = means.mean(0)
            hook_var = variances.mean(0) + ((means - hook_mean) ** 2).mean(0)
            scale = hook_var + layer.eps
            agree = bool(((mean - hook_mean) ** 2 <= _NATIVE_TOLERANCE**2 * scale).all()
                         and ((var - hook_var).abs() <= _NATIVE_TOLERANCE * scale).all())
            if agree:
                self.native[index] = True
            else:
                del self.native[index]  # this layer's buffers do not hold its batch statistics
            return
        if not self.native[index]:  # never checked: cannot happen (the first batch is hooked)
            raise InternalError(f"{layer.name}: BN statistics taken before they were checked")
        moments = self.stats[index].train
        moments.add_pooled(mean.to(moments.mean.device), var.to(moments.mean.device), float(values))

    def from_buffers(self, index: int, mean: Tensor, var: Tensor, samples: int) -> None:
        """A buffer-measured layer's batch statistics after a train-mode forward."""
        entry = self.stats[index]
        self._mark_called(entry)
        self._add(entry, mean[None], var[None], samples)


def _float64(t: Tensor) -> Tensor:
    """``t`` in float64, on the host where the device has no float64 (e.g. MPS)."""
    t = t.detach()
    if t.device.type not in ("cpu", "cuda"):
        t = t.cpu()
    return t.to(torch.float64)


@contextmanager
def _momentum_one(layers: Sequence[BNLayer]) -> Iterator[None]:
    saved = [(layer.module, layer.module.momentum) for layer in layers]
    try:
        for module, _ in saved:
            module.momentum = 1.0
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum


@contextmanager
def statistics_pass(runtime: Runtime, *, precise: bool = False, native: bool = False) -> Iterator[StatisticsPass]:
    """Observation of ``runtime``'s layers and a snapshot of its model; on exit (also on error)
    the hooks are removed and every buffer, mode flag and momentum is restored. ``native``: take
    batch statistics from BatchNorm itself where its buffers prove to hold them (train mode only)."""
    with torch.no_grad(), preserved_state(runtime.model) as snapshot:
        collector = StatisticsPass(runtime, snapshot, precise, native)
        candidates = [collector.layers[i] for i in collector.native]
        after = {i: collector.after_call for i in collector.native}
        with _momentum_one(candidates), runtime.observe(collector, after=after) as observation:
            collector.observation = observation
            yield collector
