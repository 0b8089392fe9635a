"""Findings from per-layer facts: pure rules, no torch, no IO.

Each rule reads the numbers ``analyze`` measured and the layer's attributes, and emits
a ``Finding`` with a stable code, a one-sentence message carrying the numbers, and a
hint that says what to do. Thresholds come from ``Settings.thresholds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from bncheck.config import Thresholds
from bncheck.judging.findings import STALE
from bncheck.judging.labels import DETECTION_VOUCHING_RECALL
from bncheck.judging.metrics import binomial_tail
from bncheck.judging.preprocessing import InputReading
from bncheck.reporting.numbers import num
from bncheck.reporting.report import Finding, OutputDivergence


@dataclass(frozen=True)
class LayerFacts:
    name: str
    type_name: str
    kind: str
    """``batchnorm`` or ``frozen``."""
    channels: int
    depth: Optional[int]
    score: Optional[float]
    """Train-pass score; None when not measurable or not finite (see the flags below)."""
    max_abs_mean_shift: Optional[float]
    drift_to_noise: Optional[float]
    batch_noise: Optional[float]
    batch_size: int
    momentum: Optional[float]
    track_running_stats: bool
    nonfinite_running: int
    """Channels whose running mean or var is NaN/Inf, or whose running var is negative (eval mode
    takes its square root: NaN)."""
    nonfinite_batch: int
    """Channels whose batch statistics are NaN/Inf."""
    default_buffers: bool
    """running_mean all 0 and running_var all 1, exactly (never updated)."""
    num_batches_tracked: Optional[int]
    dead_blowup: int
    """Channels with near-zero running variance but real batch variance."""
    dead_both: int
    """Channels with near-zero variance in both (constant channels)."""
    dead_running: int
    """Channels whose running variance is near zero (read from the buffers alone)."""
    affine_frozen: bool
    """Affine parameters have requires_grad=False."""
    saved_training: bool
    """The module was in train mode when the run started (how it was saved)."""
    attribution: Optional[float] = None
    """Share of the output gap that fixing this layer alone removes (None: not measured)."""
    eps: float = 1e-5
    """The layer's eps."""
    by_buffers: bool = False
    """Measured from its buffer updates (a TorchScript layer: no hooks reach it)."""
    max_abs_log_scale: Optional[float] = None
    """Largest |ln scale ratio| over channels (ln 10: a channel's std off by 10x)."""
    momentum_known: bool = True
    """False when momentum is a library default (a state_dict rebuilt by torchvision/timm): no
    rule reasons from it then."""
    init_residual: Optional[float] = None
    """Share of the initial running_var still in the buffer: (1 - momentum) ** num_batches_tracked."""
    unconverged_channels: int = 0
    """Channels whose variance in the data is below that residual (the init dominates them)."""
    traced_training: Optional[bool] = None
    """``training`` frozen into the layer's graph by tracing (TorchScript) or ``torch.export``
    (True: batch statistics even in eval mode); None when the layer follows its module's flag."""


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return num(value, digits, missing="n/a")


def _drift_counts(f: LayerFacts, t: Thresholds) -> bool:
    """Drift is real when it stands above sampling noise (or noise could not be measured)."""
    return f.drift_to_noise is None or f.drift_to_noise >= t.drift_to_noise


def _stale_severity(f: LayerFacts, t: Thresholds) -> Optional[str]:
    if f.score is None or not _drift_counts(f, t):
        return None
    if f.score >= t.stale_error:
        return "error"
    if f.score >= t.stale_warning:
        return "warning"
    return None


INPUT_LAYER_HINT = (
    "The input's statistics cannot tell a preprocessing mismatch from a domain change here: a mismatch of a kind "
    "bncheck does not test (compare the pipeline with training's: resizing, cropping, augmentation, "
    "scaling, mean/std, channel order) -> fix the pipeline, since recalibrating would bake it in; or data "
    "from another domain than training -> recalibrate on representative data with bncheck fix (verified "
    "before it writes). Labels tell them apart: the labelled task metric in eval mode (accuracy, mIoU, recall of "
    "target boxes) recovering after bncheck fix --dry-run."
)
"""Advice for a stale first BN layer whose shift no transform of the input explains: both readings."""


def layer_findings(f: LayerFacts, t: Thresholds, *, is_input_layer: bool, has_data: bool = True,
                   input_reading: Optional[InputReading] = None) -> list[Finding]:
    """Findings for one layer; without data only what the module and its buffers reveal.
    ``input_reading``: for the first BN layer, what the input-signature pass found explains its
    shift (a preprocessing transform, a units mismatch, a domain change, nothing); None when
    that pass did not run."""
    out: list[Finding] = []

    def add(code: str, severity: str, message: str, hint: str) -> None:
        out.append(Finding(code, severity, f.name, message, hint))

    if has_data and f.depth is None and not f.by_buffers:
        # Declared but never called (an unused head, a branch this input never takes): its
        # buffers play no part in the outputs, so nothing else about them matters.
        add(
            "unused-layer",
            "info",
            "never ran in the forward pass on this data, so its running statistics play no part in the outputs.",
            "Nothing to do; remove the module if it is dead code, or feed data that takes its branch.",
        )
        return out
    if f.traced_training is True:
        # eval mode does not exist for this layer: its running statistics never touch an output
        add(
            "traced-in-train-mode",
            "error",
            "traced or exported in train mode: training=True is frozen into this layer's graph, so even after "
            ".eval() it normalizes every input with the statistics of its own batch -- a sample's output depends "
            "on the rest of its batch, and the running statistics are never used.",
            "Re-export the model after model.eval() (TorchScript trace or torch.export) and check the new file with "
            "bncheck; recalibrating this archive changes nothing it computes.",
        )
        return out
    if has_data and f.by_buffers and f.score is None and f.track_running_stats and not f.nonfinite_running:
        momentum = "momentum=0 leaves its buffers unchanged" if f.momentum == 0.0 else "its buffers did not move"
        add(
            "unmeasurable",
            "warning",
            f"a TorchScript BN layer whose batch statistics could not be observed: TorchScript has no hooks and "
            f"{momentum} in train mode, so its running stats were not compared with this data.",
            "Check the output-divergence finding for whether it matters, and run bncheck on the eager model "
            "(state_dict + --arch) or a torch.export .pt2 to measure this layer.",
        )

    if f.nonfinite_running:
        add(
            "non-finite-stats",
            "error",
            f"running statistics hold NaN/Inf or a negative variance in {f.nonfinite_running} of {f.channels} "
            "channels: eval mode outputs NaN for them.",
            "Recalibrate the running stats on clean data (bncheck fix) "
            "and look for the step that wrote NaN (a diverged batch, fp16 overflow).",
        )
    if f.nonfinite_batch:
        add(
            "non-finite-stats",
            "error",
            f"the input to this layer has NaN/Inf statistics in {f.nonfinite_batch} of "
            f"{f.channels} channels.",
            "Check the data for NaN/Inf and the layers before this one for overflow.",
        )
    if not f.track_running_stats:
        add(
            "tracking-disabled",
            "warning",
            "track_running_stats=False: eval mode normalizes with each batch's own statistics, "
            "so predictions depend on batch composition and batch size 1 fails.",
            "Enable track_running_stats and calibrate running stats, or make sure deployment "
            "batches are large and drawn like the training batches.",
        )
        return out
    never_updated = f.default_buffers
    if never_updated:
        count = f.num_batches_tracked
        tracked = "" if count in (None, 0) else f" (though num_batches_tracked is {count})"
        add(
            "never-updated",
            "error" if _stale_severity(f, t) else "warning",
            f"running_mean is all 0 and running_var all 1{tracked}: the running stats were never updated "
            f"from data (score {_fmt(f.score)}).",
            "Calibrate them on training data (bncheck fix), or check that the checkpoint holds the buffers.",
        )
    elif f.num_batches_tracked == 0 and f.kind == "batchnorm":
        # Real statistics with a zero counter: written by a converter or tool (or an old
        # checkpoint without the counter), not by train-mode updates. Judged by the data.
        add(
            "counter-reset",
            "info",
            "num_batches_tracked is 0 with real running stats: usual for an EMA or SWA copy of the weights (an EMA "
            "averages floating-point tensors only, so the integer counter stays 0, as in ultralytics' fp16 EMA "
            "checkpoints) or a converted checkpoint; nothing is wrong with that by itself, and the statistics are "
            "checked against the data like any other.",
            "Nothing to do unless the layer is also flagged.",
        )
    if f.kind == "frozen":
        checked = (
            f"its buffers were compared with this data's statistics (score {_fmt(f.score)})"
            if has_data
            else "without --data only its buffers were checked"
        )
        add(
            "frozen-bn",
            "info",
            f"{f.type_name} has no train mode; {checked}.",
            "Nothing to do unless it is also flagged stale; then recompute its statistics on "
            "data from the deployment domain.",
        )
    if f.dead_blowup:
        add(
            "dead-channels",
            "warning",
            f"{f.dead_blowup} of {f.channels} channels have near-zero running variance but real "
            "batch variance, so eval mode divides them by ~sqrt(eps).",
            "Recalibrate the running stats; if the channels are dead in training too, prune them "
            "or raise eps.",
        )
    elif f.dead_both and f.dead_both == f.channels:
        add(
            "dead-channels",
            "info",
            f"all {f.channels} channels have near-zero variance in both modes (constant input).",
            "Harmless for BN itself; check why the layer before it outputs constants.",
        )

    if not has_data:
        out += _lint_findings(f, t)
        return out
    severity = _stale_severity(f, t)
    if severity is None or never_updated:  # never-updated already carries the score
        return out
    numbers = (
        f"score {_fmt(f.score)} (RMS output error in stds), {_fmt(f.drift_to_noise, 1)}x its "
        f"noise floor, mean shift up to {_fmt(f.max_abs_mean_shift, 1)} running stds"
    )
    if f.attribution is not None and math.isfinite(f.attribution):
        if f.attribution >= 0:
            numbers += f"; fixing this layer alone recovers {100 * f.attribution:.0f}% of the output gap"
        else:  # other layers' stale statistics compensate for this one: fixing it alone hurts
            numbers += (f"; fixing this layer alone makes the output gap {100 * -f.attribution:.0f}% larger "
                        "(layers after it were tuned to its current statistics: fix them together, not alone)")
    extreme_scale = (f.max_abs_log_scale or 0.0) >= math.log(10.0)
    if f.momentum_known and f.unconverged_channels and f.init_residual is not None and f.init_residual >= 1e-3:
        add(
            "unconverged-running-stats",
            severity,
            f"the running stats still carry {100 * f.init_residual:.1f}% of their initial value "
            f"((1 - momentum {f.momentum:g}) ^ {f.num_batches_tracked} updates), and on {f.unconverged_channels} of "
            f"{f.channels} channels the data's variance is below that residual, so the initial value 1 dominates "
            f"them and eval mode squashes those features: {numbers}.",
            "Recalibrate to exact population statistics (bncheck fix: no initial value left), or train with "
            "more updates or a larger BN momentum.",
        )
    elif is_input_layer and input_reading is not None and input_reading.kind in ("preprocessing", "units"):
        add(
            "input-distribution",
            "error",
            f"the first BN layer that runs sees inputs far from its running stats: {numbers}; "
            f"{input_reading.evidence}",
            "Fix the preprocessing before anything else (recalibrating would bake the mismatch into the "
            "checkpoint): for images the scale (0..1 vs 0..255), normalization mean/std and channel order "
            "(--mean/--std, data.channels); for volumes, tabular or audio features the same units, intensity "
            "normalization and standardization as in training.",
        )
    elif is_input_layer and input_reading is None and (
            (f.max_abs_mean_shift or 0.0) >= t.input_mean_shift or extreme_scale):
        scale = (f"; a channel's spread is off by {math.exp(f.max_abs_log_scale):.0f}x"
                 if extreme_scale and f.max_abs_log_scale is not None else "")
        add(
            "input-distribution",
            "error",
            f"the first BN layer that runs sees inputs far from its running stats: {numbers}{scale} (judged by "
            "the size of the shift alone: no transform of the input could be fitted to this model or data).",
            "Check the preprocessing against training before anything else (recalibrating would hide it): for "
            "images the scale (0..1 vs 0..255), normalization mean/std and channel order (--mean/--std, "
            "data.channels); for tabular or audio features the same units, scaling and standardization as in "
            "training. If it matches, the data is from another domain: recalibrate with bncheck fix --force.",
        )
    elif (f.momentum_known and f.momentum == 0.0) or (f.affine_frozen and f.saved_training):
        why = "momentum=0" if f.momentum_known and f.momentum == 0.0 else "affine frozen but saved in train mode"
        add(
            "pseudo-frozen",
            "error" if severity == "error" else "warning",
            f"{why}, so the running stats never followed the data that trained the layer "
            f"in train mode: {numbers}.",
            "Keep frozen BN layers in eval mode while fine-tuning (bncheck.freeze_batchnorm(model) "
            "survives model.train()), and recalibrate this checkpoint on the fine-tuning data (bncheck fix).",
        )
    elif is_input_layer and input_reading is not None and input_reading.kind == "domain":
        add(
            "stale-running-stats",
            severity,
            f"the first BN layer that runs sees inputs unlike its running stats: {numbers}; {input_reading.evidence}",
            "Recalibrate on representative data from this domain (bncheck fix, verified before it writes). If "
            "the images should look like the training ones (same camera, same lighting), compare a few by eye "
            "first.",
        )
    elif is_input_layer:
        evidence = f"; {input_reading.evidence}" if input_reading is not None else "."
        add(
            "stale-running-stats",
            severity,
            f"the first BN layer that runs sees inputs unlike its running stats: {numbers}{evidence}",
            INPUT_LAYER_HINT,
        )
    else:
        add(
            "stale-running-stats",
            severity,
            f"running stats disagree with this data: {numbers}.",
            "Two readings fit: stale statistics (the layer trained in train mode on other data) -> "
            "recalibrate on representative data with bncheck fix, which verifies the result and refuses when "
            "labelled eval-mode accuracy drops; or BN deliberately kept in eval mode while fine-tuning on this "
            "data -> keep it. Tell them apart with labels (eval-mode accuracy above train-mode accuracy "
            "means frozen on purpose) and check this data matches what the model was trained on.",
        )
    return out


def _lint_findings(f: LayerFacts, t: Thresholds) -> list[Finding]:
    """What a checkpoint reveals about a layer with no data at all."""
    out: list[Finding] = []
    zero = f.momentum_known and f.momentum == 0.0
    if zero or (f.affine_frozen and f.saved_training and f.kind == "batchnorm"):
        why = (
            "momentum=0: its running stats can never update"
            if zero
            else "its affine parameters are frozen (requires_grad=False) but it was saved in train mode"
        )
        out.append(Finding(
            "pseudo-frozen", "warning", f.name,
            f"{why}; if it trained in train mode, eval mode uses statistics from before that training.",
            "Run bncheck with --data to measure it; keep frozen BN layers in eval mode while fine-tuning.",
        ))
    if f.momentum_known and f.momentum is None and f.kind == "batchnorm" and not f.default_buffers:
        out.append(Finding(
            "momentum-none", "info", f.name,
            "momentum=None: the running stats are a cumulative average over every batch seen since the "
            "start of training, early weights included.",
            "Run bncheck with --data to measure whether that matters; recalibrate after training "
            "(bncheck fix) if it does.",
        ))
    if not t.eps_low <= f.eps <= t.eps_high:
        out.append(Finding(
            "unusual-eps", "warning", f.name,
            f"eps={f.eps:g} is outside {t.eps_low:g}..{t.eps_high:g}: "
            + ("eval mode barely damps low-variance channels." if f.eps < t.eps_low
               else "it dominates the variance of quiet channels, so normalization is weaker than it looks."),
            "Check that eps was not changed by a conversion tool or a config typo (PyTorch's default is 1e-5).",
        ))
    if f.dead_running and not f.default_buffers:
        out.append(Finding(
            "dead-channels", "warning", f.name,
            f"{f.dead_running} of {f.channels} channels have running variance <= {t.dead_channel_var:g}; "
            "any real input on them is divided by ~sqrt(eps) in eval mode.",
            "Run bncheck with --data to see whether the data makes them blow up; recalibrate or prune them.",
        ))
    return out


FROZEN_READING_CODES = ("stale-running-stats", "pseudo-frozen")


ACCURACY_GAP_P = 0.01
"""McNemar p-value below which train mode's labelled accuracy lead is beyond sampling error: an
error finding whatever the layer scores say (the gate's false-alarm rate on a healthy model is
at most this, and lower since a healthy eval mode is rarely less accurate)."""
READING_P = 0.05
"""McNemar p-value below which labels decide between the two readings of stale-looking layers."""
CHANCE_P = 0.001
"""Binomial p-value (against guessing the commonest of ``classes`` classes) below which an
accuracy counts as meaningful."""


def _discordant(output: OutputDivergence) -> Optional[tuple[int, int, float]]:
    """(samples right only in train mode, only in eval mode, their McNemar p-value), or None
    without labels."""
    if not output.labeled or output.train_only_correct is None or output.accuracy_gap_p is None:
        return None
    return output.train_only_correct, output.eval_only_correct or 0, output.accuracy_gap_p


def above_chance(output: OutputDivergence, accuracy: Optional[float]) -> bool:
    """``accuracy`` is well above chance for this many classes on this many labelled samples
    (binomial test against 1/classes, and at least 1.5x chance): an accuracy at chance says the
    data or its labels are not what the model knows, so it cannot vouch for either mode."""
    if accuracy is None or not output.labeled or not output.classes or output.classes < 2:
        return False
    chance = 1.0 / output.classes
    correct = round(accuracy * output.labeled)
    return accuracy >= 1.5 * chance and binomial_tail(correct, output.labeled, chance) < CHANCE_P


def eval_mode_is_better(output: OutputDivergence) -> bool:
    """Labels say deployment (eval mode) does better than train mode, and mean it: the paired
    difference is beyond sampling error (McNemar) and eval mode is well above chance. Equal
    accuracies (100% on an easy sample), a difference of a few samples, or two accuracies at
    chance (out-of-domain data) cannot tell the readings apart."""
    pairs = _discordant(output)
    if pairs is None:
        return False
    train_only, eval_only, p = pairs
    return eval_only > train_only and p < READING_P and above_chance(output, output.eval_accuracy)


def task_metric(output: OutputDivergence) -> tuple[str, Optional[float], Optional[float]]:
    """The labelled measure a user reads: ``mIoU`` of a segmentation run with masks (train,
    eval), else ``accuracy``."""
    if output.per == "pixel" and output.train_miou is not None and output.eval_miou is not None:
        return "mIoU", output.train_miou, output.eval_miou
    if output.kind == "detection":
        return "recall", output.train_accuracy, output.eval_accuracy
    return "accuracy", output.train_accuracy, output.eval_accuracy


def frozen_in_eval(finding: Finding, train_accuracy: float, eval_accuracy: float, metric: str = "accuracy") -> Finding:
    """The same numbers, read the way labelled accuracy says: running statistics that disagree
    with this data while eval mode is the better mode were kept on purpose (BN frozen in eval
    mode while fine-tuning, ``norm_eval``, FrozenBatchNorm conversions): the layers after them
    learned with exactly these statistics, and recalibrating would break them."""
    return Finding(
        "bn-frozen-in-eval",
        "info",
        finding.layer,
        f"{finding.message.rstrip('.')}; but eval mode is more accurate than train mode on this labelled "
        f"data ({metric} {100 * eval_accuracy:.1f}% vs {100 * train_accuracy:.1f}%, beyond sampling error): BN kept in "
        "eval mode on purpose, not drift.",
        "Keep these statistics: the layers after this one were trained with them. Do not recalibrate "
        "(bncheck fix refuses when eval-mode accuracy would drop).",
    )


def frozen_by_module(finding: Finding, owner: str) -> Finding:
    """A stale-looking BN inside a QAT fused module whose ``freeze_bn`` is set: frozen on purpose
    (``freeze_bn_stats`` late in QAT training; the convolution's folded weights were trained with
    these statistics), so the numbers are reported and recalibration is not advised."""
    if finding.code not in FROZEN_READING_CODES + ("unconverged-running-stats",):
        return finding
    return Finding(
        "bn-frozen-in-eval", "info", finding.layer,
        f"{finding.message.rstrip('.')}; but {owner} has freeze_bn=True (QAT freeze_bn_stats): its statistics "
        "are frozen on purpose, not drift.",
        "Keep these statistics: the fused convolution's weights were trained with them, and recalibrating "
        "would change what the quantized model computes. If labelled accuracy shows eval mode falling short, "
        "see the accuracy-gap finding for what recalibration recovers.",
    )


TRAIN_MODE_MARGIN = 0.02
"""Train-mode accuracy this much above eval-mode accuracy rules out BN frozen on purpose."""


NOT_WORSE_SAMPLES = 30
"""Labelled samples (images, for segmentation and detection: ``NOT_WORSE_IMAGES``) from which
eval mode doing as well as train mode counts as evidence."""
NOT_WORSE_IMAGES = 16


def eval_not_worse(output: OutputDivergence) -> bool:
    """Labels say deployment does at least as well as train mode on enough samples, without
    being better beyond chance (that is ``eval_mode_is_better``): stale-looking statistics then
    cost nothing measurable on this data, and recalibrating them has nothing to recover here."""
    pairs = _discordant(output)
    if pairs is None or eval_mode_is_better(output):
        return False
    train_only, eval_only, _ = pairs
    _, train, evaluated = task_metric(output)
    enough = NOT_WORSE_IMAGES if output.per == "pixel" or output.kind == "detection" else NOT_WORSE_SAMPLES
    if output.kind == "detection":
        chance_ok = train is not None and train >= DETECTION_VOUCHING_RECALL
    else:
        chance_ok = above_chance(output, output.eval_accuracy)
    # labels that agree with a model answering one class for (nearly) everything vouch for nothing
    varied = output.per == "pixel" or output.kind != "classifier" or (output.eval_top_class_share or 0.0) < 0.9
    return (output.labeled >= enough and eval_only >= train_only and train is not None and evaluated is not None
            and evaluated >= train and chance_ok and varied)


def stale_at_no_cost(finding: Finding, train: float, evaluated: float, metric: str, labeled: int) -> Finding:
    """A stale-looking layer on labelled data where eval mode does as well as train mode: the
    statistics differ, the task does not suffer; two readings, and how to tell them apart."""
    return Finding(
        finding.code, "warning", finding.layer,
        f"{finding.message.rstrip('.')}; but on these {labeled} labelled samples eval mode does as well as train "
        f"mode ({metric} {100 * evaluated:.1f}% vs {100 * train:.1f}%), so recalibrating has nothing measurable to "
        "recover here.",
        "Two readings fit: BN kept in eval mode on purpose while training (ultralytics' freeze=, norm_eval, a "
        "fine-tune with BN frozen properly: the layers after it learned with these statistics -- keep them), or "
        "statistics that are stale on data too easy to show it. To tell: run on more, or harder, labelled data "
        "from deployment (a gap beyond chance is an accuracy-gap error); bncheck fix --dry-run shows before -> "
        "after without writing.",
    )


def two_readings_conclusion(output: OutputDivergence) -> str:
    metric, train, evaluated = task_metric(output)
    return (f"Labels show eval mode doing as well as train mode ({metric} {100 * evaluated:.1f}% vs "
            f"{100 * train:.1f}% on {output.labeled} samples): the statistics flagged below differ from this data, "
            "but nothing measurable is lost to them, so no recalibration is advised on this evidence. If BN was "
            "kept in eval mode while training (frozen on purpose), keep the checkpoint; if not, check on more or "
            "harder labelled data from deployment.")


def train_mode_is_better(output: OutputDivergence) -> bool:
    pairs = _discordant(output)
    if pairs is None or output.train_accuracy is None or output.eval_accuracy is None:
        return False
    train_only, eval_only, p = pairs
    return train_only > eval_only and (output.train_accuracy - output.eval_accuracy >= TRAIN_MODE_MARGIN
                                       or p < READING_P)


def accuracy_gap(output: OutputDivergence) -> bool:
    """Train mode more accurate than eval mode on the same labelled samples, beyond sampling error."""
    pairs = _discordant(output)
    return pairs is not None and pairs[0] > pairs[1] and pairs[2] < ACCURACY_GAP_P


@dataclass(frozen=True)
class Recovery:
    """The task metric on the kept labelled samples: eval mode before and after recalibrating
    every measured BN layer on them, and train mode (the gap to close)."""

    metric: str
    """``accuracy`` (classifiers) or ``mIoU`` (segmentation with masks)."""
    before: float
    after: float
    train: float
    samples: int

    @property
    def closed(self) -> float:
        """Share of the train/eval gap that recalibration closes (1: all of it; 0 when no gap)."""
        gap = self.train - self.before
        return (self.after - self.before) / gap if gap > 0 else 0.0


def accuracy_gap_finding(output: OutputDivergence, recovered: Optional[Recovery]) -> Finding:
    """``accuracy-gap``: a labelled gap is never "nothing to do". ``recovered``: what
    recalibrating every measured BN layer on the kept samples does to the task metric (None:
    not measured). Most of the gap closed: the running statistics are the cause; part of it:
    they are one cause; none (within one sample's worth): look elsewhere."""
    train_only, eval_only, p = _discordant(output)
    if output.kind == "detection":
        scores = (f"mAP@0.5 {100 * output.train_map50:.1f}% vs {100 * output.eval_map50:.1f}%, "
                  if output.train_map50 is not None and output.eval_map50 is not None else "")
        message = (
            f"train mode detects better than eval mode on {output.labeled} images with targets ({scores}recall of "
            f"{output.objects} target boxes {100 * output.train_accuracy:.1f}% vs {100 * output.eval_accuracy:.1f}%; "
            f"{train_only} images with more found in train mode, {eval_only} in eval mode; sign test p = {p:.2g}): "
            "the gap is beyond sampling error, whatever the layer scores say."
        )
    elif output.per == "pixel":
        miou = (f"mIoU {100 * output.train_miou:.1f}% vs {100 * output.eval_miou:.1f}%, "
                if output.train_miou is not None and output.eval_miou is not None else "")
        message = (
            f"train mode segments better than eval mode on {output.labeled} images with masks ({miou}pixel accuracy "
            f"{100 * output.train_accuracy:.1f}% vs {100 * output.eval_accuracy:.1f}%; {train_only} images better in "
            f"train mode, {eval_only} in eval mode; sign test p = {p:.2g}): the gap is beyond sampling error, "
            "whatever the layer scores say."
        )
    else:
        message = (
            f"train mode is more accurate than eval mode on {output.labeled} labelled samples "
            f"({100 * output.train_accuracy:.1f}% vs {100 * output.eval_accuracy:.1f}%; {train_only} samples right "
            f"only in train mode, {eval_only} only in eval mode; McNemar p = {p:.2g}): the gap is beyond sampling "
            "error, whatever the layer scores say."
        )
    if recovered is None:
        hint = ("Not measured what recalibration recovers (--attribute 0 or no layer measurable): run bncheck fix "
                "--dry-run on representative data to see before -> after.")
        return Finding("accuracy-gap", "error", None, message, hint)
    r = recovered
    change = (f"{r.metric} from {100 * r.before:.1f}% to {100 * r.after:.1f}% (train mode {100 * r.train:.1f}%) "
              f"on {r.samples} of these samples (measured)")
    gained = r.after - r.before >= max(0.02, 1.0 / r.samples) or (r.closed >= 0.5 and r.after > r.before)
    if gained and r.closed >= 0.5:
        hint = (f"Recalibrating every BN layer on this data raises eval-mode {change}: the running statistics do "
                "not match this data. Recalibrate on representative data with bncheck fix (it verifies the "
                "result), and check the training setup that produced them (per-rank BN without SyncBN, a sampler "
                "that gave ranks different classes, BN frozen while the rest trained, batches too small for the "
                "running statistics to settle).")
    elif gained:
        hint = (f"Recalibrating every BN layer on this data raises eval-mode {change}: {100 * r.closed:.0f}% of the "
                "gap. The running statistics are one cause, not the only one: recalibrate with bncheck fix (it "
                "verifies the result), then look at what else behaves differently in train mode (layers other "
                "than BN, BN layers bncheck could not measure).")
    else:
        hint = (f"Recalibrating every BN layer on this data does not recover it ({change.replace(' from ', ': ')}): "
                "the gap is not in the running statistics. Look at what else behaves differently in train mode "
                "(layers other than BN, BN layers bncheck could not measure) and check the data matches training.")
    return Finding("accuracy-gap", "error", None, message, hint)


def chance_accuracy_finding(output: OutputDivergence) -> Optional[Finding]:
    """Both modes at or near chance on labelled data: the data (or its label order) is not what
    the model was trained on; no statistic of this data can be trusted to fix the model."""
    if not output.labeled or output.classes is None or output.classes < 2:
        return None
    if above_chance(output, output.eval_accuracy) or above_chance(output, output.train_accuracy):
        return None
    return Finding(
        "chance-accuracy", "warning", None,
        f"neither mode beats chance on {output.labeled} labelled samples (train mode "
        f"{100 * output.train_accuracy:.1f}%, eval mode {100 * output.eval_accuracy:.1f}%, chance "
        f"{100 / output.classes:.1f}% for {output.classes} classes): this data is not what the model was trained "
        "on, its class folders are in another order, or the model is untrained.",
        "Check the data before the statistics: preprocessing, domain (e.g. inverted or differently scaled "
        "inputs) and the label order. Do not recalibrate on it: statistics of data the model cannot classify "
        "fix nothing.",
    )


def check_data_first(finding: Finding, cause: Finding, *, cannot_judge: bool = False) -> Finding:
    """A stale-looking layer measured on a sample that is itself off: the numbers stand, the
    advice changes from "recalibrate" to "check the sample" (its statistics are not the ones
    the model should hold). Only the stale group advises recalibrating; input-distribution
    already says: check the data. ``cannot_judge``: the sample is one-sided and the drift sits
    only past the first layer (the input's statistics match, the class-specific features do
    not) -- what a healthy model shows on a sample of one class: a warning, never a FAIL."""
    if finding.code not in STALE:
        return finding
    severity = "warning" if cannot_judge and finding.severity == "error" else finding.severity
    message = finding.message
    if severity != finding.severity:
        message = (message.rstrip(".") + "; but the sample is one-sided and the first layer matches it, so this "
                   "sample cannot judge the statistics.")
    return Finding(
        finding.code, severity, finding.layer, message,
        f"Measured on a sample that looks off ({cause.code}): check the sample first -- {cause.hint}",
    )


UNREPRESENTATIVE_SHARE = 0.9
"""Share of eval-mode predictions in one class above which an unlabelled sample looks like one class."""


def one_class_sample_finding(output: OutputDivergence) -> Optional[Finding]:
    """Without labels, a sample that eval mode assigns (nearly) all to one class, confidently.
    Two readings fit and the outputs cannot tell them apart: a sample of one class (its BN
    statistics are that class's, not the population's, so layers look stale and recalibrating on
    it would break the model for every other class), or a model whose eval mode collapsed onto
    one class. Train mode does not decide it: measured on the shipped samples, train mode
    spreads its predictions in both cases (batches of one class normalize the class away)."""
    if output.labeled or not output.classes or output.classes < 3 or output.eval_top_class_share is None:
        return None
    if output.eval_nonfinite:  # NaN outputs "predict" class 0: no reading of the sample, the outputs are broken
        return None
    if output.eval_top_class_share < UNREPRESENTATIVE_SHARE or (output.eval_confidence or 0.0) < 0.8:
        return None
    return Finding(
        "unrepresentative-sample", "warning", None,
        f"eval mode predicts class {output.eval_top_class} for {100 * output.eval_top_class_share:.0f}% of this "
        f"unlabelled sample (mean confidence {output.eval_confidence:.2f}, {output.classes} classes): either the "
        "sample holds one class, so its BN statistics are that class's and not the population's, or eval mode "
        "collapsed onto one class.",
        "Tell them apart on a sample you know holds every class (class subfolders also give labels and "
        "accuracy per mode); until then do not recalibrate on this sample (bncheck fix refuses without --force).",
    )


def collapse_more_likely(finding: Finding) -> Finding:
    """The one-class reading weakened by the layers: the drift reaches the first BN layer, whose
    input a one-class sample barely moves but a stale model (the forum's freeze, a domain change)
    does. An info finding then: the stale layers' advice stands."""
    return Finding(
        finding.code, "info", None,
        finding.message.rstrip(".") + "; the drift reaches the first BN layer, so a collapse of eval mode "
        "(stale statistics) is the likelier reading.",
        "Labels settle it (class subfolders or (inputs, labels) batches give accuracy per mode); bncheck fix "
        "verifies its result either way.",
    )


def stale_with_labels(finding: Finding, train_accuracy: float, eval_accuracy: float, *,
                      input_layer: bool = False, metric: str = "accuracy") -> Finding:
    """Labels that show train mode clearly better leave one reading of stale statistics: say it
    plainly instead of naming both (at the first BN layer, after the preprocessing check, unless
    the input-signature pass already read its shift as a domain change: then the caller passes
    ``input_layer=False``)."""
    if input_layer:
        return Finding(
            finding.code, finding.severity, finding.layer, finding.message,
            f"Labels rule out BN kept in eval mode on purpose (train-mode {metric} {100 * train_accuracy:.1f}% vs "
            f"eval-mode {100 * eval_accuracy:.1f}%). {INPUT_LAYER_HINT}",
        )
    return Finding(
        finding.code, finding.severity, finding.layer, finding.message,
        f"Labels rule out BN kept in eval mode on purpose (train-mode {metric} {100 * train_accuracy:.1f}% vs "
        f"eval-mode {100 * eval_accuracy:.1f}%): the statistics are stale. Recalibrate on representative data "
        "with bncheck fix (it verifies the result and refuses when labelled eval-mode accuracy drops), after "
        "checking this data matches what the model was trained on.",
    )


def _batch_advice(worst: LayerFacts, t: Thresholds) -> str:
    """Advice sized to the batch actually used: sampling noise shrinks as 1/sqrt(batch)."""
    noise = worst.batch_noise or 0.0
    enough = math.ceil(worst.batch_size * (noise / t.small_batch_noise) ** 2) if noise > 0 else worst.batch_size
    return (
        f"Train-mode outputs depend on which samples share a batch: at batch size {worst.batch_size} the "
        f"noise would fall under {t.small_batch_noise:g} with about {max(enough, worst.batch_size + 1)} samples per "
        "BN batch (noise shrinks as 1/sqrt(batch)); train with larger BN batches, SyncBatchNorm across devices, "
        "or GroupNorm/LayerNorm. Deployment in eval mode is not affected by this."
    )


def model_findings(facts: list[LayerFacts], t: Thresholds) -> list[Finding]:
    """Findings about the model or the sample as a whole."""
    noisy = [f for f in facts if f.batch_noise is not None and f.batch_noise >= t.small_batch_noise]
    if not noisy:
        return []
    worst = max(noisy, key=lambda f: f.batch_noise or 0.0)
    return [
        Finding(
            "small-batch-noise",
            "warning",
            worst.name,
            f"with batch size {worst.batch_size}, batch statistics scatter by "
            f"{_fmt(worst.batch_noise)} output stds from sampling noise alone at "
            f"{len(noisy)} of {len(facts)} layers (worst here).",
            _batch_advice(worst, t),
        )
    ]
