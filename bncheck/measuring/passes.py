"""The passes that run the model after the statistics pass, each a named unit.

The statistics pass (``measuring.statistics``) runs every batch once per mode. What follows
re-runs only the sample kept on the host (``Kept``), and each pass is worth its cost only for
some reports: ``STEPS`` says, per pass, what it needs, what it produces and when it runs; the
engine decides with ``judging`` (which never runs the model) and records each pass it ran or
skipped in a ``Plan`` (time, forwards, samples, what it bought), which goes into the report
as ``passes`` and is what ``--profile`` prints.

- ``recalibrated_tally``: one eval pass with some layers' running statistics replaced by the
  population statistics their input had in train mode (what recalibrating them does); its
  tally gives the share of the output gap that closes, and, with labels, the task metric.
  The tallies are cached per set of layers: the conclusion, the accuracy recovery and
  attribution share them.
- ``noise_divergence``: the kept samples re-dealt into new batches and run in train mode again
  (what batch noise alone does to the outputs), stopped once the decision it serves is settled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

from bncheck.judging.metrics import softmax_divergence
from bncheck.measuring.batches import (
    GraphBatch,
    ImageList,
    batch_len,
    forward,
    forwards_run,
    rebuild,
    to_device,
    to_host,
)
from bncheck.measuring.detections import is_detections
from bncheck.measuring.distributed import combine
from bncheck.measuring.outputs import OutputTally, dense_divergence, gap_value, is_dense, logits_of, time_major
from bncheck.measuring.statistics import LayerStats
from bncheck.reporting.report import OutputDivergence, PassRecord
from bncheck.runtime import Runtime, preserved_state

Kept = list[tuple[Any, Optional[Tensor], Any]]
"""The sample as ``(inputs, labels, train-mode outputs)`` per batch, on the host."""

Reduce = Optional[Callable[[OutputTally], OutputTally]]
"""Adds other processes' tallies (torchrun: each rank runs its own part of the sample)."""

EARLY_STOP_MARGIN = 3.0
"""The noise pass stops after two or more re-dealt batches once every one of them puts the
noise this many times below the value the decision turns on: the decision cannot turn on the
batches left, so a failing model pays for a fraction of the pass."""
BETWEEN_BATCHES = 3.0
"""How much more a re-dealt batch's noise value varies from batch to batch than its samples'
spread says (they share the batch's statistics): measured 2.0-2.6x on resnet18 (10 and 1000
classes) and mobilenet_v3_small (2 classes) at batch sizes 4 and 16."""
ONE_BATCH_Z = 3.0
"""The first re-dealt batch settles the noise alone when its value is under the early-stop limit
and its value plus this many (inflated) standard errors is under the value the decision turns on."""


@dataclass(frozen=True)
class Step:
    """One pass that runs the model: what it needs, what it produces, when it is worth its cost."""

    name: str
    needs: str
    produces: str
    worth: str


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("statistics", "the data", "every BN layer's input statistics in eval and train mode, both modes' outputs",
         "always: one eval and one train forward per batch"),
    Step("input signature", "the kept inputs", "what explains the first BN layer's shift (a preprocessing "
         "mistake, units, a domain change)", "when the first BN layer is flagged (stem forwards only)"),
    Step("conclusion", "train-mode statistics, the kept sample", "the share of the output gap that recalibrating "
         "all BN layers together (and the flagged ones) recovers", "when several layers are stale and the modes' "
         "outputs differ; skipped with --attribute 0"),
    Step("attribution", "train-mode statistics, the kept sample", "the share of the output gap that fixing each "
         "flagged layer alone recovers", "when few layers are flagged, or recalibrating them all does not already "
         "explain the gap (--thorough: always); one eval pass per layer"),
    Step("output noise", "the kept sample", "what batch noise alone does to the outputs (drift or noise?)",
         "when the modes' outputs disagree and its answer can change the verdict or the advice: no flagged layer "
         "already fails the gate (--thorough: whenever they disagree)"),
    Step("combined evidence", "train-mode statistics, the kept sample", "whether weak layers together pull eval "
         "mode away (a direction test)", "when three or more layers sit just under the noise bar and the outputs "
         "disagree"),
    Step("accuracy recovery", "labels, train-mode statistics, the kept sample", "the task metric after "
         "recalibrating every layer", "when labels show an accuracy gap; shares the conclusion's pass when it ran"),
)}

T = TypeVar("T")


class Plan:
    """Runs the passes the engine decides on and records each one, run or skipped."""

    def __init__(self, progress: Optional[Callable[[str, int, Optional[int]], None]] = None) -> None:
        self.records: list[PassRecord] = []
        self.progress = progress
        self._recalibrated: dict[frozenset[str], Recalibrated] = {}

    def run(self, name: str, work: Callable[[], T], bought: Callable[[T], str], samples: int = 0) -> T:
        """``work()`` timed, with the forwards it ran counted; ``bought(result)`` says what it measured."""
        if name not in STEPS:
            raise KeyError(name)
        if self.progress is not None and name != "attribution":
            self.progress(name, 0, None)
        start, calls = time.perf_counter(), forwards_run()
        result = work()
        self.record(name, time.perf_counter() - start, forwards_run() - calls, samples, bought(result))
        return result

    def record(self, name: str, seconds: float, forwards: int, samples: int, bought: str) -> None:
        self.records.append(PassRecord(name, True, round(seconds, 4), forwards, samples, bought))

    def skip(self, name: str, why: str) -> None:
        """A pass not run: why, in the report (what it would have said is not guessed)."""
        if name not in STEPS:
            raise KeyError(name)
        self.records.append(PassRecord(name, False, 0.0, 0, 0, why))

    def recalibrated(self, runtime: Runtime, entries: Iterable[LayerStats], kept: Kept, device: torch.device,
                     float_dtype: Optional[torch.dtype], reduce: Reduce = None,
                     enough: Optional[Callable[[OutputTally, int], bool]] = None) -> Recalibrated:
        """The eval pass with ``entries`` recalibrated, once per set of layers: the batches run so
        far are kept, so a later caller that needs more resumes where the first stopped.
        ``enough(tally, batches)`` may stop it after any batch (not under torchrun, where every
        rank runs every batch)."""
        entries = list(entries)
        key = frozenset(entry.layer.name for entry in entries)
        done = self._recalibrated.get(key)
        if done is None:
            done = self._recalibrated[key] = Recalibrated(OutputTally(keep_values=True), 0, len(kept))
        if done.complete or done.empty:
            return done
        usable = usable_entries(entries)
        if not usable:
            done.empty = True
            return done
        local = done.local
        with torch.no_grad(), preserved_state(runtime.model):
            runtime.set_mode(bn_training=False)
            for entry in usable:
                entry.layer.running_mean.copy_(entry.train.mean.to(entry.layer.running_mean))
                entry.layer.running_var.copy_(entry.train.var.to(entry.layer.running_var))
            for inputs, labels, out_train in kept[done.batches:]:
                out_eval = forward(runtime.model, to_device(inputs, device, float_dtype), "eval")
                local.add(out_train, to_host(out_eval), labels, batch=batch_len(inputs))
                done.batches += 1
                if reduce is None and enough is not None and done.batches < len(kept) and enough(local, done.batches):
                    break
        if done.complete:
            done.tally = reduce(local) if reduce is not None else local
        else:
            done.tally = local
        return done


@dataclass
class Recalibrated:
    """An eval pass over the kept sample with some layers' running statistics replaced by the
    population statistics their input had in train mode, possibly stopped early."""

    local: OutputTally
    """This process's tally of the batches run."""
    batches: int
    """Kept batches run so far (the first ``batches`` of them)."""
    of: int
    """Kept batches in all."""
    tally: Optional[OutputTally] = None
    """The tally to judge: pooled over ranks once complete; None when no layer could be replaced."""
    empty: bool = False
    """No entry could be swapped in (no train statistics, or statistics held by buffers alone)."""

    @property
    def complete(self) -> bool:
        return self.batches >= self.of


def usable_entries(entries: list[LayerStats]) -> list[LayerStats]:
    """Layers whose running statistics can be replaced by their train-mode input statistics."""
    return [e for e in entries if e.train is not None and e.layer.running_mean is not None and not e.layer.by_buffers]


def recalibrated_tally(
    runtime: Runtime,
    entries: list[LayerStats],
    kept: Kept,
    device: torch.device,
    float_dtype: Optional[torch.dtype],
    reduce: Reduce = None,
) -> Optional[OutputTally]:
    """Train mode against eval mode with ``entries`` recalibrated to the sample's population
    statistics (labelled accuracy included): one eval pass over the kept sample, the model's
    buffers restored after it. None when no entry can be swapped in."""
    return Plan().recalibrated(runtime, entries, kept, device, float_dtype, reduce).tally


@dataclass(frozen=True)
class NoiseEstimate:
    """What batch noise alone does to train-mode outputs, and how well it was measured."""

    divergence: OutputDivergence
    samples: int
    """Samples re-dealt into new batches (all those kept, unless the pass stopped early)."""
    batches: int
    """Re-dealt batches run."""
    error: Optional[float] = None
    """Standard error of the noise value (KL, or squared relative L2) between the re-dealt
    batches; with one batch, its samples' standard error times ``BETWEEN_BATCHES``; None when
    neither is known."""
    complete: bool = True
    """False when the pass stopped early (the estimate then serves only the gap it was sized for)."""

    def describe(self) -> str:
        spread = f" +/- {self.error:.2g}" if self.error is not None else ""
        batches = "1 re-dealt batch" if self.batches == 1 else f"{self.batches} re-dealt batches"
        return f"{spread} from {self.samples} samples in {batches}"




def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if is_detections(first):  # one dict per image: the images, in order
        return [d for part in parts for d in part]
    if isinstance(first, ImageList):  # per-sample items: the batch is the list itself
        return ImageList(item for part in parts for item in part)
    if isinstance(first, GraphBatch):  # graphs, kept whole: re-dealt with from_data_list
        return (first, [graph for part in parts for graph in part.graphs()])
    if isinstance(first, Tensor):
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return rebuild(first, [_cat([p[i] for p in parts]) for i in range(len(first))])
    return first


def _take(value: Any, index: Tensor, total: int) -> Any:
    """The samples ``index`` of ``value`` (``total`` samples). A tensor whose leading size is
    not ``total`` holds something else per row (nodes, edges, time steps): never cut by sample,
    so the re-deal is not possible (ValueError)."""
    if isinstance(value, ImageList):
        return ImageList(value[int(i)] for i in index)
    if is_detections(value):
        if len(value) != total:
            raise ValueError(f"{len(value)} detections for {total} images")
        return [value[int(i)] for i in index]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], GraphBatch):
        kind, graphs = value
        return kind.of([graphs[int(i)] for i in index])
    if isinstance(value, Tensor):
        if value.dim() and value.shape[0] != total:
            raise ValueError(f"a tensor of {value.shape[0]} rows in a sample of {total}: not one row per sample")
        return value[index] if value.dim() else value
    if isinstance(value, dict):
        return {k: _take(v, index, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return rebuild(value, [_take(v, index, total) for v in value])
    return value


def noise_divergence(
    runtime: Runtime, kept: Kept, device: torch.device, float_dtype: Optional[torch.dtype],
    reduce: Optional[Callable[[OutputTally], OutputTally]] = None, decides_at: Optional[float] = None,
) -> Optional[NoiseEstimate]:
    """What batch noise alone does to train-mode outputs, on the kept sample: the samples are
    re-dealt into batches of the same sizes (a fixed shuffle across batches) and run in train
    mode again. Two independent batch estimates differ by twice the variance one has around
    the population, so half the divergence between the two train-mode runs estimates the
    train/eval divergence of a model whose running statistics are right. With one batch, its
    halves stand in (they differ from the whole by the same variance). None when neither is
    possible (one batch of fewer than 4 samples, or inputs that cannot be re-dealt).
    ``reduce`` adds other processes' tallies (each re-deals its own part of the sample).

    Sized by the decision it serves: ``decides_at`` is the noise value the judgement turns on
    (``judging.output_divergence.noise_decides_at``); the re-dealt batches run one at a time and
    stop (from the second on) once each puts the noise ``EARLY_STOP_MARGIN`` times under it; the
    first stops it alone when it is under that limit too and its value plus ``ONE_BATCH_Z``
    standard errors (its samples' spread, inflated by ``BETWEEN_BATCHES`` for what they share) is
    under ``decides_at`` itself. The estimate says how many samples it used and its standard
    error. Under torchrun (``reduce``) every batch runs."""
    # under torchrun every rank runs every batch: a rank stopping alone would leave the others
    # waiting in a SyncBatchNorm's all-reduce
    enough = decides_at / EARLY_STOP_MARGIN if decides_at is not None and reduce is None else None
    local, floors, first_error = _noise_tally(runtime, kept, device, float_dtype, enough)
    batches = len(kept) if len(kept) >= 2 else 2  # one batch: its two halves
    tally = reduce(local or OutputTally()) if reduce is not None else local
    if tally is None:
        return None
    result = tally.result()
    if result.kind == "none":
        return None
    error = first_error if len(floors) == 1 else None
    if len(floors) >= 2 and all(f is not None for f in floors):
        mean = sum(floors) / len(floors)
        error = math.sqrt(sum((f - mean) ** 2 for f in floors) / (len(floors) - 1) / len(floors))
    return NoiseEstimate(result, tally.images or tally.samples, len(floors), error, complete=len(floors) == batches)


def _noise_tally(
    runtime: Runtime, kept: Kept, device: torch.device, float_dtype: Optional[torch.dtype],
    enough: Optional[float] = None,
) -> tuple[Optional[OutputTally], list[Optional[float]], Optional[float]]:
    """The two train-mode runs' divergence as a tally, already scaled to one run's noise, each
    re-dealt batch's own noise value, and the first one's standard error (inflated, see
    ``BETWEEN_BATCHES``); stops early when every batch's is under ``enough``, or after the first
    when its value is under ``enough`` and ``ONE_BATCH_Z`` standard errors under the decision's
    value (``enough * EARLY_STOP_MARGIN``)."""
    nothing: tuple[None, list[Optional[float]], None] = (None, [], None)
    if not kept:
        return nothing
    sizes = [batch_len(inputs) for inputs, _, _ in kept]
    # time-major sequence outputs ([T, batch, classes]) are re-dealt along their batch dimension
    sequence = time_major(logits_of(kept[0][2]), sizes[0])

    def batch_first(out: Any, size: int) -> Any:
        out = logits_of(out)
        return out.transpose(0, 1) if sequence and time_major(out, size) else out

    try:
        inputs_all = _cat([inputs for inputs, _, _ in kept])
        train_all = _cat([batch_first(out, size) for (_, _, out), size in zip(kept, sizes)])
        labels = [y for _, y, _ in kept]
        labels_all = torch.cat(labels) if all(isinstance(y, Tensor) for y in labels) else None
    except (RuntimeError, TypeError, ValueError, IndexError):
        return nothing  # ragged inputs (a list of differently sized images, say)
    total = sum(sizes)
    if len(kept) >= 2:
        order, scale = torch.randperm(total, generator=torch.Generator().manual_seed(0)), 0.5
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
    elif total >= 4:
        order, scale = torch.arange(total), 1.0
        bounds = [(0, total // 2), (total // 2, total)]
    else:
        return nothing
    parts: list[OutputTally] = []
    floors: list[Optional[float]] = []
    first_error: Optional[float] = None
    with torch.no_grad(), preserved_state(runtime.model) as snapshot:
        for start, stop in bounds:
            runtime.set_mode(bn_training=True)
            chosen = order[start:stop]
            try:
                batch = to_device(_take(inputs_all, chosen, total), device, float_dtype)
                before = _take(train_all, chosen, total)
            except (TypeError, ValueError):
                return nothing  # inputs or outputs that are not one row per sample (graphs' nodes, say)
            again = batch_first(to_host(forward(runtime.model, batch, "train")), stop - start)
            snapshot.restore_buffers()
            try:  # these samples' outputs in their own batch against the new one
                labels_part = labels_all[chosen] if labels_all is not None else None
                if sequence:  # one row per time step, as the main tally compares them
                    before, again, labels_part = before.reshape(-1, before.shape[-1]), \
                        again.reshape(-1, again.shape[-1]), None
                part = OutputTally()
                part.add(before, again, labels_part)
            except (RuntimeError, TypeError, ValueError, IndexError):
                return nothing  # outputs that do not line up per sample (variable-length detections, say)
            if part.kind in (None, "none"):
                return nothing
            # KL and squared distances scale with the variance: half of two runs' divergence is one run's
            part.kl *= scale
            part.diff_sq *= scale
            parts.append(part)
            floors.append(gap_value(part.result()))
            if len(parts) == 1 and len(kept) >= 2 and not sequence:  # samples from several original batches
                first_error = _sample_error(before, again, part.kind, scale)
                if first_error is not None:
                    first_error *= BETWEEN_BATCHES
            if enough is None or len(parts) == len(bounds) or floors[-1] is None:
                continue
            if len(parts) == 1 and first_error is not None and floors[0] < enough \
                    and floors[0] + ONE_BATCH_Z * first_error < enough * EARLY_STOP_MARGIN:
                break  # under the limit, and ONE_BATCH_Z standard errors under what the decision turns on
            if len(parts) >= 2 and all(f is not None and f < enough for f in floors):
                break
    return combine(parts), floors, first_error


def _sample_error(before: Any, again: Any, kind: Optional[str], scale: float) -> Optional[float]:
    """Standard error of one re-dealt batch's noise value from the spread of its samples'
    own values: per-sample KL for classifiers; for other outputs (a ratio of summed squares,
    ``sum d_i / sum r_i``) by the delta method. None for outputs without one row per sample."""
    if not isinstance(before, Tensor) or not isinstance(again, Tensor) or before.shape != again.shape \
            or before.dim() < 1 or before.shape[0] < 4:
        return None
    n = before.shape[0]
    if kind == "classifier" and is_dense(before):
        values = dense_divergence(before, again)[0].double() * scale  # per image: its pixels' mean KL
        return float(values.std() / math.sqrt(n))
    if kind == "classifier":
        values = softmax_divergence(before, again)[0].double() * scale
        return float(values.std() / math.sqrt(n))
    if kind != "tensor" or not before.is_floating_point():
        return None
    b, a = before.detach().double().reshape(n, -1), again.detach().double().reshape(n, -1)
    d, r = ((a - b) ** 2).sum(1) * scale, (b**2).sum(1)
    if float(r.sum()) <= 0:
        return None
    ratio = d.sum() / r.sum()
    return float(((d - ratio * r).square().sum() / (n - 1) / n).sqrt() / r.mean())


