"""Recalibration (PreciseBN, done exactly): replace each BN layer's running statistics
with the population statistics of its train-mode input over a sample.

Why not an EMA or an average of per-batch variances: the running buffers should hold what
eval mode needs, the mean and variance of the layer's input over the whole population.
Per batch, the hook pools the per-sample means and variances with Chan's merge in float64,
so every value counts once (an uneven last batch weighs what it holds, a BN module called
several times per forward -- ghost BN, a head shared across FPN levels -- pools every
call), and the result equals the mean and variance over all values at once. The running
variance stores the unbiased estimate (``n / (n - 1)``), as PyTorch's BN does. Standard BN
layers hand over their own batch statistics after the first samples (``measuring.statistics``' native
mode: momentum 1 for the pass, checked against the hook's numbers), so most batches cost no
more than a bare train-mode forward.

Only BN layers run in train mode; dropout and everything else stay in eval (unlike
``torch.optim.swa_utils.update_bn``). Each layer sees its input as in training: the
layers before it normalize with batch statistics. The model's buffers are untouched
while measuring; the result is applied afterwards, in place or not (``in_place``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from bncheck.errors import InputError, InternalError, UsageError
from bncheck.judging.metrics import channel_weights, noise_floor
from bncheck.measuring import distributed
from bncheck.measuring.batches import (
    OnDevice,
    _dataset_pair,
    batch_len,
    iter_batches,
    model_placement,
    split_batch,
    to_device,
)
from bncheck.measuring.statistics import LayerStats, statistics_pass
from bncheck.runtime import BNLayer, Runtime, checksum, runtime_for

STABLE_ERROR = 0.05
"""Expected error of recalibrated statistics (in output stds, like a layer score) above
which the sample is called too small for stable statistics."""


@dataclass(frozen=True)
class LayerRecalibration:
    name: str
    """Qualified module name."""
    values: int
    """Values pooled per channel (samples x positions x calls)."""
    calls: int
    """Train-mode calls pooled (batches, times calls per forward)."""
    standard_error: Optional[float]
    """Expected normalization error of the new statistics from sampling alone, in output
    stds (the noise floor of the pooled sample); None with fewer than two samples."""
    mean_change: float
    """|gamma|-weighted RMS change of the running mean, in old running stds."""
    var_ratio: float
    """|gamma|-weighted geometric mean of new / old running variance."""


@dataclass(frozen=True)
class RecalibrationResult:
    """What ``recalibrate`` measured and (with ``in_place``) wrote into the model."""

    layers: tuple[LayerRecalibration, ...]
    """One entry per recalibrated layer, in model order."""
    skipped: tuple[tuple[str, str], ...]
    """``(layer, reason)`` for BN layers left as they were."""
    samples: int
    batches: int
    in_place: bool
    """True: the model now holds the new statistics; False: only ``state`` does."""
    state: dict[str, Tensor] = field(repr=False)
    """New buffers by state_dict key (``running_mean``, ``running_var``,
    ``num_batches_tracked``): ``model.load_state_dict(result.state, strict=False)``."""
    previous: dict[str, Tensor] = field(repr=False)
    """The buffers as they were, same keys: load them to undo."""

    @property
    def worst_standard_error(self) -> Optional[float]:
        known = [layer.standard_error for layer in self.layers if layer.standard_error is not None]
        return max(known) if known else None

    def samples_for_stable_statistics(self, target: float = STABLE_ERROR) -> Optional[int]:
        """Samples needed for every layer's standard error to reach ``target`` (it shrinks
        as 1/sqrt(samples)); None when already there or unknown."""
        worst = self.worst_standard_error
        if worst is None or worst <= target:
            return None
        return int(math.ceil(self.samples * (worst / target) ** 2))


def _selected(layers: list[BNLayer], globs: Optional[Sequence[str]]) -> tuple[list[BNLayer], list[tuple[str, str]]]:
    chosen, skipped = [], []
    if isinstance(globs, str):
        globs = (globs,)
    for layer in layers:
        if globs and not any(fnmatch.fnmatchcase(layer.name, g) for g in globs):
            continue
        if layer.kind != "batchnorm":
            skipped.append((layer.name, f"{layer.type_name} has no train mode (frozen by design)"))
        elif not layer.track_running_stats:
            skipped.append((layer.name, "track_running_stats=False: eval mode uses batch statistics, no buffers"))
        else:
            chosen.append(layer)
    if globs and not chosen and not skipped:
        names = ", ".join(layer.name for layer in layers[:5])
        raise UsageError(f"$layers {list(globs)} match no BN layer; the model's BN layers start {names}")
    return chosen, skipped


def _pool_shared_buffers(entries: list[LayerStats], skipped: list[tuple[str, str]]) -> dict[str, LayerStats]:
    """One entry per set of running buffers. Several modules may share one tensor (a
    ``torch.export`` program makes one module per BN call, so a BN called twice appears
    twice): their train-mode moments pool into the first, which owns the update."""
    owners: dict[str, LayerStats] = {}
    first_by_buffer: dict[int, LayerStats] = {}
    for entry in entries:
        key = entry.layer.running_mean.data_ptr()
        owner = first_by_buffer.get(key)
        if owner is None:
            first_by_buffer[key] = entry
            owners[entry.layer.name] = entry
            continue
        if entry.train is not None:
            if owner.train is None:
                owner.train = entry.train
            else:
                owner.train.merge(entry.train)
        owner.train_calls += entry.train_calls
        skipped.append((entry.layer.name, f"shares its running buffers with {owner.layer.name} (pooled there)"))
    return owners


def _unbiased(var: Tensor, values: float) -> Tensor:
    return var * (values / (values - 1.0)) if values > 1 else var


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    layers: Optional[Sequence[str]] = None,
    num_samples: Optional[int] = None,
    batch_size: int = 32,
    device: Any = None,
    in_place: bool = True,
    shard: Optional[bool] = None,
) -> RecalibrationResult:
    """Set BN running statistics to the exact population statistics of ``data``.

    Args:
        model: the model whose BN layers to recalibrate.
        data: a tensor (or ``(inputs, labels)`` pair) cut into batches of ``batch_size``,
            or a ``DataLoader`` / iterable of batches; every sample is used unless
            ``num_samples`` caps it.
        layers: layer-name globs to recalibrate (default: every BN layer with a train mode
            and running statistics).
        num_samples: stop after this many samples (whole batches; the batch that crosses
            the cap is the last).
        batch_size: samples per forward pass when ``data`` is a tensor.
        device: where to run (None: where the model is; moved back afterwards).
        in_place: True (default) writes the new statistics into ``model``; False leaves the
            model bit-identical and returns them in ``result.state``.
        shard: under ``torch.distributed``, whether this rank takes batches ``rank, rank +
            world_size, ...`` of ``data`` (default: for a tensor yes, for an iterable no --
            it is taken to be this rank's part). The statistics are pooled over every rank,
            so every rank writes the same buffers.

    Returns:
        A ``RecalibrationResult`` with per-layer standard errors, the new buffers and the
        previous ones (``model.load_state_dict(result.previous, strict=False)`` undoes it).

    >>> import torch, bncheck
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    >>> data = torch.tensor([[0.0, 10.0], [2.0, 10.0], [4.0, 16.0]])
    >>> result = bncheck.recalibrate(model, data, batch_size=2)   # batches of 3 (a lone sample joins)
    >>> model[0].running_mean.tolist(), model[0].running_var.tolist()
    ([2.0, 12.0], [4.0, 12.0])
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
        raise UsageError(f"$num_samples must be an integer of at least 2, got {num_samples!r}")
    runtime = runtime_for(model).measuring()  # a twin where the caller's model cannot be observed as is
    all_layers = list(runtime.layers)
    chosen, skipped = _selected(all_layers, layers)
    batches = iter_batches(data, batch_size=batch_size, num_batches=None)
    world = distributed.current()
    if world.active and (shard or (shard is None and _dataset_pair(data) is not None)):
        batches = world.shard(batches)
    with OnDevice(runtime.model, device) as target:
        stats, samples, seen = _measure(runtime, batches, num_samples, target)
    return _recalibrated(runtime, chosen, skipped, stats, samples, seen, in_place)


def recalibrate_measured(model: nn.Module, measured: dict[str, LayerStats], samples: int, batches: int, *,
                         layers: Optional[Sequence[str]] = None, in_place: bool = True) -> RecalibrationResult:
    """``recalibrate`` from train-mode statistics already measured on the sample (the train-mode
    half of a diagnosis on the same batches: ``engine.TrainPass``), without another pass."""
    runtime = runtime_for(model).measuring()
    chosen, skipped = _selected(list(runtime.layers), layers)
    stats = []
    for layer in runtime.layers:
        entry = LayerStats(layer, layer.module.training)
        found = measured.get(layer.name)
        if found is not None:
            entry.train, entry.depth, entry.train_calls = found.train, found.depth, found.train_calls
        stats.append(entry)
    return _recalibrated(runtime, chosen, skipped, stats, samples, batches, in_place)


def _recalibrated(runtime: Runtime, chosen: list[BNLayer], skipped: list[tuple[str, str]], stats: list[LayerStats],
                  samples: int, seen: int, in_place: bool) -> RecalibrationResult:
    """New running statistics of the ``chosen`` layers from their pooled train-mode statistics."""
    by_name = {entry.layer.name: entry for entry in stats}
    owners = _pool_shared_buffers([by_name[layer.name] for layer in chosen], skipped)
    results, state, previous, targets = [], {}, {}, {}
    for layer in chosen:
        if layer.name not in owners:
            continue
        entry = owners[layer.name]
        moments = entry.train
        if moments is None or moments.values < 2:
            skipped.append((layer.name, "never ran in the forward pass" if entry.depth is None
                            else "saw fewer than two values per channel"))
            continue
        if layer.by_buffers and layer.update_momentum is not None and layer.update_momentum <= 0:
            skipped.append((layer.name, "TorchScript layer with momentum 0: its statistics cannot be observed"))
            continue
        new_mean = moments.mean
        # TorchScript statistics come from buffer updates, already unbiased per batch (and
        # ``values`` counts samples there, not values: no second correction)
        new_var = moments.var if layer.by_buffers else _unbiased(moments.var, moments.values)
        if not (torch.isfinite(new_mean).all() and torch.isfinite(new_var).all()):
            skipped.append((layer.name, "its input holds NaN/Inf: left unchanged"))
            continue
        key = f"{layer.name}." if layer.name else ""
        old_mean, old_var = layer.running_mean, layer.running_var
        previous[key + "running_mean"] = old_mean.detach().clone()
        previous[key + "running_var"] = old_var.detach().clone()
        state[key + "running_mean"] = new_mean.to(old_mean)
        state[key + "running_var"] = new_var.to(old_var)
        targets[key + "running_mean"], targets[key + "running_var"] = old_mean, old_var
        tracked = layer.buffer("num_batches_tracked")
        if tracked is not None:
            previous[key + "num_batches_tracked"] = tracked.detach().clone()
            targets[key + "num_batches_tracked"] = tracked
            # the statistics now summarize this many batches (it weighs later cumulative updates)
            state[key + "num_batches_tracked"] = torch.tensor(entry.train_calls, dtype=tracked.dtype)
        results.append(_summary(layer, entry, old_mean, old_var, new_mean, new_var))
    if runtime.caller is not runtime.model:  # measured on a twin: write into the caller's own buffers
        own = runtime.caller_buffers()
        targets = {key: own[key] for key in targets}
        previous = {key: own[key].detach().clone() for key in previous}
    if in_place:
        with torch.no_grad():
            for key, value in state.items():
                targets[key].copy_(value.to(targets[key]))
    return RecalibrationResult(
        layers=tuple(results), skipped=tuple(skipped), samples=samples, batches=seen, in_place=in_place,
        state=state, previous=previous,
    )


def _measure(
    runtime: Runtime, batches: Any, num_samples: Optional[int], device: torch.device
) -> tuple[list[LayerStats], int, int]:
    model = runtime.model
    _, float_dtype = model_placement(model)
    before = checksum(model)
    world = distributed.current()
    samples = seen = 0
    failure: Optional[BaseException] = None
    try:
        with statistics_pass(runtime, precise=True, native=True) as stats:
            for batch in batches:
                inputs, _ = split_batch(batch)
                inputs = to_device(inputs, device, float_dtype)
                stats.forward(inputs, "train")
                samples += batch_len(inputs)
                seen += 1
                if num_samples is not None and samples * world.size >= num_samples:
                    break
    except Exception as exc:  # every rank learns of it before the pooling
        failure = exc
    finally:
        after = checksum(model)
    world.agree(failure)
    if after != before:
        raise InternalError("the model changed while measuring its statistics; please report this bug")
    if world.active:  # every rank gets the statistics of the whole sample
        counts = distributed.pool(world, distributed.SampleCounts(samples, seen))
        samples, seen = counts.samples, counts.batches
        distributed.pool_stats(world, stats, device)
    if seen == 0:
        raise InputError("the data yielded no batches; point $data at a non-empty folder, file or iterable")
    return stats.stats, samples, seen


def _summary(
    layer: BNLayer, entry: LayerStats, old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor
) -> LayerRecalibration:
    moments = entry.train
    eps = layer.eps
    old_mean64, old_var64 = old_mean.detach().to(new_mean), old_var.detach().to(new_var)
    weights = channel_weights(layer.weight, moments.channels, new_mean)
    floor = noise_floor(moments, moments.var, eps, weights, moments.values)
    shift = (new_mean - old_mean64) / torch.sqrt(old_var64 + eps)
    ratio = (new_var + eps) / (old_var64 + eps)
    total = float(weights.sum())
    return LayerRecalibration(
        name=layer.name,
        values=int(moments.values),
        calls=entry.train_calls,
        standard_error=floor if math.isfinite(floor) else None,
        mean_change=float(torch.sqrt((weights * shift**2).sum() / total)),
        var_ratio=float(torch.exp((weights * torch.log(ratio)).sum() / total)),
    )
