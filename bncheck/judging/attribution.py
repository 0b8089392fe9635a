"""Causal attribution: how much of the train/eval output gap one layer's stale statistics
cause, measured by fixing that layer alone and re-running the eval-mode pass."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from bncheck.measuring.batches import batch_len, forward, to_device, to_host
from bncheck.measuring.outputs import OutputTally, output_gap
from bncheck.measuring.statistics import LayerStats
from bncheck.runtime import Runtime, preserved_state

Kept = list[tuple[Any, Optional[Tensor], Any]]
"""The sample as ``(inputs, labels, train-mode outputs)`` per batch, on the host."""


def attribute_layer(
    runtime: Runtime,
    entry: LayerStats,
    kept: Kept,
    gap: float,
    device: torch.device,
    float_dtype: Optional[torch.dtype],
    reduce: Optional[Callable[[OutputTally], OutputTally]] = None,
) -> Optional[float]:
    """Share of the output gap removed by fixing this one layer: one eval-mode pass over the
    sample with the layer's running statistics replaced by the population statistics its
    input had in the train-mode pass (what recalibrating it would do). 1 = the gap closes;
    0 = no effect; negative = fixing it alone makes the outputs diverge more. ``reduce``
    adds the tallies of other processes (each ran its own part of the sample)."""
    return attribute_layers(runtime, [entry], kept, gap, device, float_dtype, reduce)


def attribute_layers(
    runtime: Runtime,
    entries: list[LayerStats],
    kept: Kept,
    gap: float,
    device: torch.device,
    float_dtype: Optional[torch.dtype],
    reduce: Optional[Callable[[OutputTally], OutputTally]] = None,
) -> Optional[float]:
    """The same for a set of layers fixed together (e.g. every stale layer at once)."""
    tally = recalibrated_tally(runtime, entries, kept, device, float_dtype, reduce)
    if tally is None:
        return None
    fixed = output_gap(tally.result())
    return 1.0 - (fixed or 0.0) / gap


def recalibrated_tally(
    runtime: Runtime,
    entries: list[LayerStats],
    kept: Kept,
    device: torch.device,
    float_dtype: Optional[torch.dtype],
    reduce: Optional[Callable[[OutputTally], OutputTally]] = None,
) -> Optional[OutputTally]:
    """Train mode against eval mode with ``entries`` recalibrated to the sample's population
    statistics (labelled accuracy included): one eval pass over the kept sample, the model's
    buffers restored after it. None when no entry can be swapped in."""
    usable = [e for e in entries if e.train is not None and e.layer.running_mean is not None and not e.layer.by_buffers]
    if not usable:
        return None
    tally = OutputTally()
    with torch.no_grad(), preserved_state(runtime.model):
        runtime.set_mode(bn_training=False)
        for entry in usable:
            entry.layer.running_mean.copy_(entry.train.mean.to(entry.layer.running_mean))
            entry.layer.running_var.copy_(entry.train.var.to(entry.layer.running_var))
        for inputs, labels, out_train in kept:
            out_eval = forward(runtime.model, to_device(inputs, device, float_dtype), "eval")
            tally.add(out_train, to_host(out_eval), labels, batch=batch_len(inputs))
    return reduce(tally) if reduce is not None else tally
