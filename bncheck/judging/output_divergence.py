"""The model-level safety net: do train- and eval-mode outputs disagree far beyond what batch
noise explains -- whether or not a layer explains it, or could be measured at all?

What noise alone explains is measured, not assumed: the sample runs once more in train mode,
re-dealt into new batches of the same sizes. Two independent batch estimates of a statistic
differ by twice the variance each has around the population, so half the divergence between
the two train-mode runs estimates the train/eval divergence a model with right running
statistics shows at this batch size. The pass runs only when the outputs disagree
noticeably, so healthy models pay nothing.

Batch composition is the other innocent cause: a batch of one class normalizes with that
class's statistics, so train mode diverges from eval mode by construction. With labels,
batches holding few of the classes say so; without, the input layer's batch means spreading
far beyond sampling noise (a one-way ANOVA F statistic) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from bncheck.judging.attribution import Kept
from bncheck.judging.metrics import softmax_divergence
from bncheck.measuring.batches import GraphBatch, ImageList, batch_len, forward, rebuild, to_device, to_host
from bncheck.measuring.detections import is_detections
from bncheck.measuring.distributed import combine
from bncheck.measuring.outputs import OutputTally, dense_divergence, is_dense, logits_of, time_major
from bncheck.reporting.report import Finding, OutputDivergence
from bncheck.runtime import Runtime, preserved_state

NOISE_RATIO = 10.0
"""Output divergence (KL, or squared relative L2) this many times what batch noise gives is drift."""
FIRES_AGREEMENT = 0.9
"""...and the modes must disagree on at least 10% of top-1 predictions (classifiers)."""
FIRES_KL = 0.05
"""...with a mean KL of at least 0.05 nats (near-uniform outputs of an untrained model flip
their arg-max at the slightest change; that is not a disagreement worth failing)."""
FIRES_RELATIVE_L2 = 0.2
"""...or differ by at least 20% in relative L2 (other outputs)."""
EARLY_STOP_MARGIN = 3.0
"""The noise pass stops after two or more re-dealt batches once every one of them puts the
noise this many times below what would explain the gap (``gap / NOISE_RATIO``): the decision
cannot turn on the batches left, so a failing model pays for a fraction of the pass."""
BETWEEN_BATCHES = 3.0
"""How much more a re-dealt batch's noise value varies from batch to batch than its samples'
spread says (they share the batch's statistics): measured 2.0-2.6x on resnet18 (10 and 1000
classes) and mobilenet_v3_small (2 classes) at batch sizes 4 and 16."""
ONE_BATCH_Z = 3.0
"""The first re-dealt batch settles the noise alone when its value is under the early-stop limit
and its value plus this many (inflated) standard errors is under ``gap / NOISE_RATIO``, the
value the decision turns on."""
COMPOSITION_F = 8.0
"""Input-layer batch means spreading this many times more than sampling explains: batches
were not drawn alike."""


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


@dataclass(frozen=True)
class Composition:
    """Whether the batches were drawn alike, and the evidence."""

    unrepresentative: bool
    evidence: str


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() else value
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return rebuild(value, [_slice(v, start, stop) for v in value])
    return value


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
    reduce: Optional[Callable[[OutputTally], OutputTally]] = None, gap: Optional[OutputDivergence] = None,
) -> Optional[NoiseEstimate]:
    """What batch noise alone does to train-mode outputs, on the kept sample: the samples are
    re-dealt into batches of the same sizes (a fixed shuffle across batches) and run in train
    mode again. Two independent batch estimates differ by twice the variance one has around
    the population, so half the divergence between the two train-mode runs estimates the
    train/eval divergence of a model whose running statistics are right. With one batch, its
    halves stand in (they differ from the whole by the same variance). None when neither is
    possible (one batch of fewer than 4 samples, or inputs that cannot be re-dealt).
    ``reduce`` adds other processes' tallies (each re-deals its own part of the sample).

    Sized by the decision it serves: given the output ``gap``, the re-dealt batches run one at a
    time and stop (from the second on) once each puts the noise ``EARLY_STOP_MARGIN`` times
    under ``gap / NOISE_RATIO``; the first stops it alone when it is under that limit too and
    its value plus ``ONE_BATCH_Z`` standard errors (its samples' spread, inflated by
    ``BETWEEN_BATCHES`` for what they share) is under ``gap / NOISE_RATIO`` itself. The estimate
    says how many samples it used and its standard error. Under torchrun (``reduce``) every
    batch runs."""
    value = _gap_value(gap) if gap is not None else None
    # under torchrun every rank runs every batch: a rank stopping alone would leave the others
    # waiting in a SyncBatchNorm's all-reduce
    enough = value / NOISE_RATIO / EARLY_STOP_MARGIN if value is not None and reduce is None else None
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
            floors.append(_gap_value(part.result()))
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


def _f_statistic(calls: list[tuple[Tensor, Tensor, int]]) -> float:
    """One-way ANOVA over batches: the spread of batch means against what the within-batch
    spread of per-sample means predicts for random batches (1 when batches are drawn alike);
    the median over channels."""
    means = torch.stack([m for m, _, _ in calls]).cpu()
    within = torch.stack([v for _, v, _ in calls]).cpu()
    sizes = torch.tensor([float(n) for _, _, n in calls], dtype=torch.float64)
    expected = (within / sizes[:, None]).mean(0)
    ratio = means.var(0, correction=1) / expected.clamp_min(1e-12)
    finite = ratio[torch.isfinite(ratio)]
    return float(finite.median()) if finite.numel() else math.nan


def composition(labels_per_batch: list[Optional[Tensor]],
                batch_means: dict[int, list[tuple[Tensor, Tensor, int]]]) -> Composition:
    """Were the batches drawn alike? From labels when every batch has them, else from how far
    the BN inputs' batch means spread beyond sampling noise (one-way ANOVA F, the largest over
    layers: class-specific features make one-class batches stand out deep in the network)."""
    if labels_per_batch and all(isinstance(y, Tensor) and y.dim() == 1 for y in labels_per_batch):
        distinct = [len(set(y.tolist())) for y in labels_per_batch]
        classes = len(set().union(*(set(y.tolist()) for y in labels_per_batch)))
        sizes = [int(y.shape[0]) for y in labels_per_batch]
        expected = sum(min(size, classes) for size in sizes) / len(sizes)
        mean_distinct = sum(distinct) / len(distinct)
        text = f"batches hold {mean_distinct:.1f} of the {classes} classes on average"
        return Composition(classes >= 2 and mean_distinct <= 0.5 * expected, text)
    scores = [_f_statistic(calls) for calls in batch_means.values() if len(calls) >= 3]
    scores = [f for f in scores if math.isfinite(f)]
    if not scores:
        return Composition(False, "too few batches to compare their composition")
    worst = max(scores)
    text = f"batch means of BN inputs spread up to {worst:.0f}x as much as sampling explains"
    return Composition(worst >= COMPOSITION_F, text)


def _gap_value(out: OutputDivergence) -> Optional[float]:
    if out.kind == "classifier":
        return out.kl
    if out.kind == "detection" and out.box_agreement is not None:
        return 1.0 - out.box_agreement
    if out.kind == "tensor" and out.relative_l2 is not None:
        return out.relative_l2**2
    return None


def triggered(output: OutputDivergence) -> bool:
    """Whether the outputs disagree enough for a model-level finding to be possible: only then
    is the noise pass (one more train-mode pass over the kept sample) worth its cost."""
    if output.kind == "classifier":
        return (output.top1_agreement is not None and output.top1_agreement <= FIRES_AGREEMENT
                and (output.kl or 0.0) >= FIRES_KL)
    if output.kind == "detection":
        return output.box_agreement is not None and output.box_agreement <= FIRES_AGREEMENT
    return output.kind == "tensor" and (output.relative_l2 or 0.0) >= FIRES_RELATIVE_L2


def model_level_findings(
    output: OutputDivergence, estimate: Optional[NoiseEstimate], batches: Composition, batch_size: int,
    layer_explains: bool, unmeasured: int = 0,
) -> list[Finding]:
    """``output-divergence`` when the modes disagree far beyond batch noise (a warning when the
    noise could not be measured), or ``unrepresentative-batches`` when batch composition
    explains the disagreement instead."""
    if not triggered(output):
        return []
    return _divergence_findings(output, estimate, batches, batch_size, layer_explains, unmeasured)


def nonfinite_output_finding(output: OutputDivergence) -> Optional[Finding]:
    """Eval-mode outputs that hold NaN/Inf are an error whatever else was measured: no
    threshold can make them pass."""
    if output.eval_nonfinite:
        train = ("train mode's are finite" if not output.train_nonfinite
                 else f"train mode's for {output.train_nonfinite}")
        return Finding(
            "output-divergence", "error", None,
            f"eval-mode outputs hold NaN/Inf for {output.eval_nonfinite} of {output.outputs_counted} samples "
            f"({train}): the model outputs nothing usable in deployment.",
            "Look for a non-finite-stats finding above (NaN/Inf or negative running variance); recalibrate the "
            "running statistics on clean data (bncheck fix) or restore them from a good checkpoint.",
        )
    return None


def _divergence_findings(
    output: OutputDivergence, estimate: Optional[NoiseEstimate], batches: Composition, batch_size: int,
    layer_explains: bool, unmeasured: int,
) -> list[Finding]:
    noise = estimate.divergence if estimate is not None else None
    gap, floor = _gap_value(output), _gap_value(noise) if noise is not None else None
    if gap is None:
        return []
    if output.kind == "classifier":
        unit = "pixels' " if output.per == "pixel" else ""
        what = (f"train- and eval-mode outputs agree on {100 * output.top1_agreement:.1f}% of {unit}top-1 "
                f"predictions ({'per-pixel ' if output.per == 'pixel' else ''}KL {output.kl:.3f} nats)")
        noise_text = (f"batch noise alone gives KL {floor:.3f}{estimate.describe()} "
                      f"({100 * noise.top1_agreement:.1f}% agreement)"
                      if floor is not None and noise is not None and noise.top1_agreement is not None
                      else "batch noise could not be measured")
    elif output.kind == "detection":
        what = (f"train- and eval-mode detections agree on {100 * output.box_agreement:.1f}% of boxes "
                f"({output.boxes_matched} found in both; eval mode misses {output.boxes_train - output.boxes_matched} "
                f"that train mode finds and adds {output.boxes_eval - output.boxes_matched})")
        noise_text = (f"batch noise alone gives {100 * floor:.1f}% disagreement{estimate.describe()}"
                      if floor is not None and estimate is not None else "batch noise could not be measured")
    else:
        what = f"train- and eval-mode outputs differ by {output.relative_l2:.3f} in relative L2"
        noise_text = (f"batch noise alone gives {math.sqrt(floor):.3f}{estimate.describe()}" if floor is not None
                      else "batch noise could not be measured")
    if batches.unrepresentative:  # composition, not drift, whatever the noise says
        return [Finding(
            "unrepresentative-batches", "warning", None,
            f"{what}, but {batches.evidence}: train mode normalizes each batch with its own statistics, so "
            "outputs diverge by construction and say nothing about drift.",
            "Shuffle the data so that every batch looks like the whole (bncheck shuffles image folders; "
            "tensor files and iterables are used in their order), then run again.",
        )]
    if floor is None:  # a material gap, but no noise measurement to hold it against
        return [Finding(
            "output-divergence", "warning", None,
            f"{what}, and {noise_text} (one batch of fewer than 4 samples, or inputs that cannot be re-batched).",
            "Run with at least two batches of 4+ samples so bncheck can tell drift from batch noise.",
        )]
    if floor > 0 and gap < NOISE_RATIO * floor:
        return []
    ratio = f"{gap / floor:.0f}x" if floor > 0 else "far beyond"
    if output.train_accuracy is not None and output.eval_accuracy is not None \
            and output.eval_accuracy > output.train_accuracy:
        return [Finding(
            "output-divergence", "info", None,
            f"{what}, {ratio} what batch noise explains, but eval mode is more accurate than train mode on "
            f"these labels ({100 * output.eval_accuracy:.1f}% vs {100 * output.train_accuracy:.1f}%): "
            "deployment is the better mode.",
            "Nothing to fix in eval mode; if the model still trains in train mode, its BN layers were likely "
            "frozen in eval on purpose.",
        )]
    if not layer_explains and not unmeasured:
        # Every layer was measured and none is off: the statistics are right, the modes still part
        # ways. Per-batch normalization differs from population statistics by sampling noise that
        # a deep (or untrained) network amplifies layer after layer; recalibrating cannot help.
        return [Finding(
            "output-divergence", "warning", None,
            f"{what}, {ratio} what re-dealing the batches explains at batch size {batch_size} ({noise_text}), "
            "yet every BN layer's running statistics match this data: the network amplifies the difference "
            "between normalizing each batch of this size and normalizing with population statistics.",
            "Not stale statistics (recalibrating will not change it). Check eval-mode accuracy against train "
            f"mode on labelled data; if it falls short, train with BN batches larger than {batch_size}, "
            "SyncBatchNorm or GroupNorm. Expected on an untrained network.",
        )]
    where = ("the flagged layers above account for it" if layer_explains
             else f"{unmeasured} BN layers could not be measured and may explain it")
    return [Finding(
        "output-divergence", "error", None,
        f"{what}, {ratio} what batch noise explains at batch size {batch_size} ({noise_text}); {where}.",
        "Eval mode will not behave as in training: check the layers flagged above, layers that could not be "
        "measured, and the preprocessing; bncheck fix recalibrates every BN layer and verifies the outputs.",
    )]
