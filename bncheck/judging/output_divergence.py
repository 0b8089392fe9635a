"""The model-level safety net: do train- and eval-mode outputs disagree far beyond what batch
noise explains -- whether or not a layer explains it, or could be measured at all?

What noise alone explains is measured, not assumed (``measuring.passes.noise_divergence``
re-deals the kept sample into new batches and runs it in train mode again); this module
decides when that pass is worth running and what its numbers mean. It never runs the model.

Batch composition is the other innocent cause: a batch of one class normalizes with that
class's statistics, so train mode diverges from eval mode by construction. With labels,
batches holding few of the classes say so; without, the input layer's batch means spreading
far beyond sampling noise (a one-way ANOVA F statistic) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bncheck.measuring.outputs import gap_value
from bncheck.measuring.passes import NoiseEstimate
from bncheck.reporting.report import Finding, OutputDivergence

NOISE_RATIO = 10.0
"""Output divergence (KL, or squared relative L2) this many times what batch noise gives is drift."""
FIRES_AGREEMENT = 0.9
"""...and the modes must disagree on at least 10% of top-1 predictions (classifiers)."""
FIRES_KL = 0.05
"""...with a mean KL of at least 0.05 nats (near-uniform outputs of an untrained model flip
their arg-max at the slightest change; that is not a disagreement worth failing)."""
FIRES_RELATIVE_L2 = 0.2
"""...or differ by at least 20% in relative L2 (other outputs)."""
COMPOSITION_F = 8.0
"""Input-layer batch means spreading this many times more than sampling explains: batches
were not drawn alike."""


@dataclass(frozen=True)
class Composition:
    """Whether the batches were drawn alike, and the evidence."""

    unrepresentative: bool
    evidence: str


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


def noise_decides_at(output: OutputDivergence) -> Optional[float]:
    """The noise value the output-divergence judgement turns on (the gap over ``NOISE_RATIO``):
    the noise pass can stop once it is surely under it."""
    value = gap_value(output)
    return value / NOISE_RATIO if value is not None else None


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


def unmeasured_noise_finding(output: OutputDivergence) -> Finding:
    """The modes' disagreement when the noise pass was not worth running (flagged layers already
    fail the gate): the numbers, and that how much of it batch noise explains was not measured."""
    if output.kind == "classifier":
        unit = "pixels' " if output.per == "pixel" else ""
        what = (f"train- and eval-mode outputs agree on {100 * output.top1_agreement:.1f}% of {unit}top-1 "
                f"predictions ({'per-pixel ' if output.per == 'pixel' else ''}KL {output.kl:.3f} nats)")
    elif output.kind == "detection":
        what = f"train- and eval-mode detections agree on {100 * output.box_agreement:.1f}% of boxes"
    else:
        what = f"train- and eval-mode outputs differ by {output.relative_l2:.3f} in relative L2"
    return Finding(
        "output-divergence", "info", None,
        f"{what}; how much of it batch noise explains was not measured: the flagged layers already fail the "
        "gate, so the noise pass could not change the verdict or the advice.",
        "See the flagged layers; bncheck run --thorough measures the noise too.",
    )


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
    gap, floor = gap_value(output), gap_value(noise) if noise is not None else None
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
