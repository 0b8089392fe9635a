"""The result of a run: plain frozen dataclasses holding Python floats, and their JSON.

This module never imports torch, so ``bncheck report`` re-renders a saved run fast on a
machine without it. JSON schema: ``bncheck/run/v1`` (``schema/run-v1.json``); floats that
are not finite are written as ``null`` -- a finding always says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

from bncheck.errors import InputError, first_line
from bncheck.judging.findings import STALE

SCHEMA_ID = "bncheck/run/v1"
SEVERITIES = ("info", "warning", "error")
"""Finding severities, least severe first: the one definition every module uses."""
SEVERITY_ORDER = {severity: rank for rank, severity in enumerate(SEVERITIES)}
STALE_CODES = STALE
"""Findings that say a layer's running statistics are stale: the group one conclusion speaks for."""


@dataclass(frozen=True)
class Finding:
    code: str
    """Stable finding code, e.g. ``stale-running-stats`` (defined in bncheck/judging/findings.py)."""
    severity: str
    """``error``, ``warning`` or ``info``."""
    layer: Optional[str]
    """Layer name, or None for a model-level finding."""
    message: str
    """One sentence with the numbers that triggered the finding."""
    hint: str
    """What to do about it."""


@dataclass(frozen=True)
class ChannelDrift:
    channel: int
    """Channel index within the layer."""
    error: Optional[float]
    """Normalization error e of this channel, in output stds."""
    mean_shift: Optional[float]
    """Signed mean shift b, in running stds."""
    scale_ratio: Optional[float]
    """Scale ratio a; 1 when batch and running variance agree."""


@dataclass(frozen=True)
class LayerResult:
    name: str
    """Qualified module name, as in ``model.named_modules()``."""
    type: str
    """Class name of the layer (BatchNorm2d, FrozenBatchNorm2d, ...)."""
    channels: int
    """Number of channels (num_features)."""
    rank: int
    """1 = most divergent. Non-finite layers rank above every finite score."""
    depth: Optional[int]
    """Position in execution order (0 = first BN layer the input reaches); None if never called."""
    score: Optional[float]
    """|gamma|-weighted RMS normalization error of the train-mode pass (root cause); None if not finite."""
    mean_shift: Optional[float]
    """|gamma|-weighted RMS of the mean shift, in running stds."""
    scale_ratio: Optional[float]
    """|gamma|-weighted geometric mean of the scale ratio; 1 when variances agree."""
    kl: Optional[float]
    """|gamma|-weighted mean Gaussian KL(batch || running), nats."""
    max_error: Optional[float]
    """Largest channel normalization error."""
    noise_floor: Optional[float]
    """Score expected from sampling noise alone for the pooled sample; None if unknown."""
    drift_to_noise: Optional[float]
    """score / noise_floor: how far the drift stands above sampling noise."""
    batch_noise: Optional[float]
    """Score expected from sampling noise alone within one batch (train-mode scatter)."""
    eval_score: Optional[float]
    """Same score for the eval-mode pass (deployment inputs); None if not measurable."""
    momentum: Optional[float]
    """The layer's momentum; None means a cumulative average."""
    eps: Optional[float]
    """The layer's eps."""
    track_running_stats: bool
    """False: eval mode uses batch statistics too."""
    worst_channels: tuple[ChannelDrift, ...]
    """The channels with the largest normalization error, worst first."""
    findings: tuple[Finding, ...]
    """Findings on this layer (also listed in the report's findings)."""
    attribution: Optional[float] = None
    """Share of the train/eval output gap removed by giving only this layer the population
    statistics of its input (one extra eval pass); None when not measured."""


@dataclass(frozen=True)
class OutputDivergence:
    kind: str
    """``classifier`` (softmax outputs compared), ``tensor`` (relative L2) or ``none``."""
    kl: Optional[float] = None
    """Mean KL(softmax train || softmax eval), nats."""
    js: Optional[float] = None
    """Mean Jensen-Shannon divergence of the softmax outputs, nats (at most ln 2)."""
    top1_agreement: Optional[float] = None
    """Share of samples whose arg-max is the same in both modes."""
    relative_l2: Optional[float] = None
    """||eval - train|| / ||train|| over every output value."""
    train_accuracy: Optional[float] = None
    """Top-1 accuracy in train mode when the data has labels."""
    eval_accuracy: Optional[float] = None
    """Top-1 accuracy in eval mode when the data has labels."""
    labeled: Optional[int] = None
    """Labelled samples behind the accuracies."""
    train_only_correct: Optional[int] = None
    """Labelled samples right in train mode, wrong in eval mode."""
    eval_only_correct: Optional[int] = None
    """Labelled samples right in eval mode, wrong in train mode."""
    accuracy_gap_p: Optional[float] = None
    """Exact McNemar p-value of the accuracy difference between modes (paired on the same samples):
    small means the difference is beyond sampling error."""
    classes: Optional[int] = None
    """Width of the class dimension."""
    eval_top_class: Optional[int] = None
    """The class eval mode predicts most often."""
    eval_top_class_share: Optional[float] = None
    """Share of predictions (samples, or time steps of sequence outputs) eval mode gives that class."""
    train_top_class_share: Optional[float] = None
    """The same share of train mode's most frequent prediction."""
    eval_confidence: Optional[float] = None
    """Mean eval-mode top softmax probability."""
    per: Optional[str] = None
    """``pixel`` for segmentation outputs: agreement and KL are per pixel, averaged over pixels;
    with masks the accuracies are pixel accuracies, ``labeled`` counts images and the paired
    counts say in how many images each mode labelled more pixels right."""
    train_miou: Optional[float] = None
    """Mean IoU over the classes present, train mode (segmentation with masks)."""
    eval_miou: Optional[float] = None
    train_class_iou: Optional[tuple[Optional[float], ...]] = None
    """IoU per class, train mode (None: a class neither in the masks nor predicted)."""
    eval_class_iou: Optional[tuple[Optional[float], ...]] = None
    images: Optional[int] = None
    """Samples behind per-pixel numbers."""
    eval_nonfinite: Optional[int] = None
    """Samples whose eval-mode output holds NaN/Inf (None: not counted)."""
    train_nonfinite: Optional[int] = None
    """Samples whose train-mode output holds NaN/Inf."""
    outputs_counted: Optional[int] = None
    """Samples behind the two counts above."""
    binary: Optional[bool] = None
    """One score per pixel read as a sigmoid logit of a binary mask (only when masks label it)."""
    boxes_train: Optional[int] = None
    """Detection: boxes found (score >= 0.5) in train mode over every image."""
    boxes_eval: Optional[int] = None
    boxes_matched: Optional[int] = None
    """Boxes found in both modes (same label, IoU >= 0.5, one to one)."""
    box_agreement: Optional[float] = None
    """``2 * matched / (train + eval)``: 1 when both modes find the same boxes."""
    score_shift: Optional[float] = None
    """Mean |eval score - train score| of the boxes found in both."""
    objects: Optional[int] = None
    """Target boxes (detection with targets); ``train_accuracy``/``eval_accuracy`` are then each
    mode's recall of them (IoU >= 0.5, same label, score >= 0.5)."""
    train_located: Optional[int] = None
    """Target boxes a train-mode box sits on (IoU >= 0.5, score >= 0.5) whatever the labels: far
    above the recall, the targets' labels are not the model's class numbers."""
    train_map50: Optional[float] = None
    """mAP@0.5 in train mode (COCO's, pycocotools); None without targets or without the library."""
    eval_map50: Optional[float] = None
    train_map: Optional[float] = None
    """mAP@[.5:.95] in train mode."""
    eval_map: Optional[float] = None
    source: Optional[str] = None
    """Where in the model's output the compared prediction was found (``output[1] (logits; ...)``,
    ``output['out']``, ``output.logits (--output)``, ``probabilities``); None: the output itself."""


@dataclass(frozen=True)
class ModelInfo:
    checkpoint: Optional[str]
    """Checkpoint path as given, or None for an in-memory model / random init."""
    arch: Optional[str]
    """Architecture spec (``torchvision:resnet18``), or None when the file held the model."""
    format: str
    """How the model was loaded: state_dict, pickled-module, torchscript, in-memory, random-init."""
    sha256: Optional[str]
    """SHA-256 of the checkpoint file."""
    bn_layers: int
    """Number of BatchNorm layers found."""
    momentum_from: Optional[str] = None
    """Where the layers' momentum values come from: ``checkpoint`` (the file holds the modules),
    ``builder`` (your --arch code built them), ``library-default`` (a torchvision/timm builder
    rebuilt the model from weights: momentum is not saved in a state_dict, so the values are
    the library's defaults, not what training used; bncheck does not reason from them)."""
    weights_key: Optional[str] = None
    """Where in the checkpoint the loaded weights sit (``state_dict``, ``state_dict_ema``); None
    when the file is the weights."""
    other_weights: tuple[str, ...] = ()
    """Other models the checkpoint holds (EMA/SWA copies beside the live weights): ``--weights``."""


@dataclass(frozen=True)
class DataInfo:
    source: Optional[str]
    """Data path as given (None: no data)."""
    samples: int
    """Samples that went through the model in each mode."""
    batch_size: int
    batches: int
    labels: bool
    """Whether the data carried labels (class subfolders, a labels tensor)."""
    skipped: int = 0
    """Files that could not be read and were skipped."""
    requested: Optional[int] = None
    """Samples asked for (batch_size x num_batches); more than ``samples`` when the data ran out."""
    input_shape: Optional[tuple[int, ...]] = None
    """Shape of one sample as fed to the model (after transforms), e.g. [3, 224, 224]."""
    preprocessing: Optional[str] = None
    """The transforms applied to images and where each setting came from (default, config, flag)."""


@dataclass(frozen=True)
class Sources:
    """Where a run's model and data came from, as the caller knows them (the engine knows
    neither): put into the report when it is built, never patched in afterwards."""

    model: Optional[ModelInfo] = None
    """The checkpoint that was opened (its ``bn_layers`` is counted by the run); None: an
    in-memory model."""
    describe_data: Optional[Callable[[], dict[str, Any]]] = None
    """Called once the batches are consumed (a folder counts unreadable files while it is read):
    ``DataInfo`` fields -- ``source``, ``skipped``, ``requested``, ``preprocessing``."""

    def model_info(self, bn_layers: int) -> ModelInfo:
        if self.model is None:
            return ModelInfo(checkpoint=None, arch=None, format="in-memory", sha256=None, bn_layers=bn_layers)
        return replace(self.model, bn_layers=bn_layers)

    def data_info(self, **measured: Any) -> DataInfo:
        """``DataInfo`` of what the run measured plus what the data source says of itself."""
        described = self.describe_data() if self.describe_data is not None else {}
        return DataInfo(**{"source": None, **described, **measured})


@dataclass(frozen=True)
class LayerChange:
    name: str
    before: Optional[float]
    """Layer score in the baseline run (None: absent or not finite)."""
    after: Optional[float]
    """Layer score in this run."""
    delta: Optional[float]
    """after - before."""


@dataclass(frozen=True)
class BaselineComparison:
    source: str
    """Path of the baseline run's JSON."""
    new: tuple[Finding, ...]
    """Findings (by code and layer) that the baseline did not have."""
    worsened: tuple[Finding, ...]
    """Findings more severe than in the baseline, or on a layer whose score grew past
    thresholds.baseline_worsen."""
    resolved: tuple[Finding, ...]
    """Baseline findings that are gone."""
    changes: tuple[LayerChange, ...]
    """Per-layer score changes, largest first."""


@dataclass(frozen=True)
class PassRecord:
    """One pass that ran the model (or was skipped), for ``--profile`` and the JSON."""

    name: str
    """``statistics``, ``input signature``, ``conclusion``, ``attribution``, ``output noise``,
    ``combined evidence`` or ``accuracy recovery`` (``measuring.passes.STEPS``)."""
    ran: bool
    seconds: float
    """Wall time of the pass (0 when skipped)."""
    forwards: int
    """Forward passes it ran (batches, or stem-only forwards for the input signature)."""
    samples: int
    """Samples it ran over (the kept sample, or the whole data for ``statistics``)."""
    bought: str
    """What it measured, or why it did not run (what it would have said is not guessed)."""


@dataclass(frozen=True)
class Picture:
    """One sample of a segmentation or detection run, pictured: base64 PNGs in one fixed palette
    (the Pascal VOC colours; class 0 black): class maps, or the input with boxes drawn on it."""

    sample: int
    """Position of the sample in the data order (on its rank, under torchrun)."""
    agreement: float
    """Share of its pixels given the same class by both modes (segmentation), or of its boxes
    found by both (detection: ``2 * matched / (train + eval)``)."""
    image: Optional[str]
    """The input (None when it is not an image); its middle slice for a volume."""
    eval: str
    """Classes (or boxes) predicted in eval mode (deployment)."""
    train: str
    """Classes (or boxes) predicted in train mode (batch statistics)."""
    truth: Optional[str] = None
    """The mask (or target boxes), when given."""
    classes: tuple[int, ...] = ()
    """Classes that appear in the picture (its legend)."""


class Displayed:
    """How a result shows itself in a notebook: Jupyter gets the HTML report (in an iframe, so
    its page styles stay its own), terminal IPython the table bncheck prints."""

    def _repr_html_(self) -> str:
        from html import escape

        from bncheck.reporting.render import render

        page = render(self, "html")
        return (f'<iframe srcdoc="{escape(page, quote=True)}" title="bncheck report" '
                'style="width:100%;height:640px;border:1px solid #d0d7de;border-radius:6px"></iframe>')

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        from bncheck.reporting.render import render

        printer.text(type(self).__name__ + "(...)" if cycle else render(self, "table").rstrip("\n"))


@dataclass(frozen=True)
class Report(Displayed):
    model: ModelInfo
    data: DataInfo
    verdict: str
    """``pass``, ``fail`` (a finding at or above fail_on) or ``no-batchnorm``."""
    fail_on: str
    output: OutputDivergence
    first_divergent_layer: Optional[str]
    """First layer in execution order whose eval-pass score crosses the divergence threshold."""
    layers: tuple[LayerResult, ...]
    """Sorted by rank, most divergent first."""
    findings: tuple[Finding, ...]
    """Every finding, most severe first."""
    thresholds: dict[str, float]
    bncheck_version: str
    torch_version: Optional[str]
    device: Optional[str]
    duration_s: Optional[float]
    baseline: Optional[BaselineComparison] = None
    """Comparison with an accepted baseline run; when present it decides the verdict."""
    conclusion: Optional[str] = None
    """One model-level sentence when many layers share a cause (e.g. most layers stale:
    recalibrate all, with the measured share of the output gap that recovers)."""
    world_size: int = 1
    """Processes that shared the sample (torchrun / DDP ranks); 1 when not distributed."""
    input_reading: Optional[str] = None
    """What the input-signature pass found explains the first BN layer's shift: ``preprocessing``
    (a known mistake), ``units`` (a rescale beyond 8x that no plausible change matches), ``domain``
    (a mild per-channel change), ``ambiguous`` (units and domain fit about equally: both readings)
    or ``unexplained``; None when that pass did not run (the layer was not flagged, or no fit)."""
    pictures: tuple[Picture, ...] = ()
    """Segmentation: the samples where the modes disagree most, pictured (lowest agreement first)."""
    passes: tuple[PassRecord, ...] = ()
    """Each pass that ran the model, or was skipped, in order: its time and what it bought."""
    schema: str = SCHEMA_ID

    @staticmethod
    def non_finite(layer: LayerResult) -> bool:
        """The layer's score is null because its statistics hold NaN/Inf (not merely unmeasured)."""
        return layer.score is None and any(f.code == "non-finite-stats" for f in layer.findings)

    def top_finding(self, layer: Optional[LayerResult] = None) -> Optional[Finding]:
        """The most severe finding of ``layer``, or of the whole report when no layer is given
        (None when there is none)."""
        findings = self.findings if layer is None else layer.findings
        return max(findings, key=lambda f: SEVERITY_ORDER[f.severity], default=None)

    @property
    def worst_severity(self) -> Optional[str]:
        return max((f.severity for f in self.findings), key=SEVERITY_ORDER.__getitem__, default=None)


_NESTED: dict[tuple[type, str], type] = {
    (Report, "model"): ModelInfo,
    (Report, "data"): DataInfo,
    (Report, "output"): OutputDivergence,
    (Report, "layers"): LayerResult,
    (Report, "findings"): Finding,
    (LayerResult, "worst_channels"): ChannelDrift,
    (LayerResult, "findings"): Finding,
    (Report, "baseline"): BaselineComparison,
    (Report, "pictures"): Picture,
    (Report, "passes"): PassRecord,
    (BaselineComparison, "new"): Finding,
    (BaselineComparison, "worsened"): Finding,
    (BaselineComparison, "resolved"): Finding,
    (BaselineComparison, "changes"): LayerChange,
}


def fails_gate(findings: Iterable[Finding], fail_on: str) -> bool:
    """Whether any finding is at least as severe as ``fail_on`` (``never`` never fails)."""
    return fail_on != "never" and any(SEVERITY_ORDER[f.severity] >= SEVERITY_ORDER[fail_on] for f in findings)


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(report: Report) -> dict[str, Any]:
    """The JSON document (schema first), every non-finite float as None."""
    body = _plain(asdict(report))
    body.pop("schema")
    return {"schema": SCHEMA_ID, **body}


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        nested = _NESTED.get((cls, f.name))
        if nested is not None and isinstance(value, list):
            value = tuple(_build(nested, item) for item in value)
        elif nested is not None and isinstance(value, dict):
            value = _build(nested, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def validate(data: Any, where: str = "the run result", kind: str = "run") -> None:
    """Check a document against the packaged JSON Schema; InputError naming the first
    problem and where it is (``layers[0].score: 'high' is not of type 'number', 'null'``)."""
    import jsonschema

    schema = json.loads(schema_path(kind).read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    raise InputError(
        f"{where} is not a valid bncheck/{kind}/v1 document ({path or 'top level'}: {message}); "
        "re-create it with `bncheck run` instead of editing it"
    )


def from_dict(data: dict[str, Any], where: str = "the run result") -> Report:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_ID:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{where} is not a bncheck run result (schema {found!r}, expected {SCHEMA_ID!r})")
    validate(data, where)
    try:
        return _build(Report, data)
    except TypeError as exc:
        raise InputError(f"bncheck run result is incomplete or from another version: {first_line(exc)}") from None


def dumps(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, allow_nan=False) + "\n"


def load(path: Path) -> Report:
    """Read a saved run; InputError with a one-line reason when it cannot be used (too large,
    not a regular file, not JSON, nested too deep, not the schema, or a verdict that its own
    findings contradict)."""
    from bncheck.reading.untrusted import MAX_RUN_BYTES, read_text_bounded

    if not Path(path).exists():
        raise InputError(f"no saved run at {path}; run `bncheck run ...` first or pass the JSON path")
    text = read_text_bounded(Path(path), "saved run", MAX_RUN_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}); re-run `bncheck run`") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to be a bncheck run result; re-run `bncheck run`") from None
    report = from_dict(data, str(path))
    expected = gate_verdict(report, report.fail_on)
    if report.verdict != expected:
        raise InputError(
            f"{path} says its verdict is {report.verdict!r}, but its findings give {expected!r} at fail_on "
            f"{report.fail_on!r}; the file was edited: re-create it with `bncheck run`"
        )
    return report


def verdict_of(findings: Iterable[Finding], fail_on: str, *, no_batchnorm: bool) -> str:
    """The one verdict rule (engine, baseline, saved runs): ``fail`` when a finding reaches
    ``fail_on``; otherwise ``no-batchnorm`` (a pass: nothing to measure) or ``pass``."""
    if fails_gate(findings, fail_on):
        return "fail"
    return "no-batchnorm" if no_batchnorm else "pass"


def gate_verdict(report: Report, fail_on: str) -> str:
    """The verdict ``report``'s own findings give at ``fail_on``: with a baseline, only new and
    worsened findings count; ``no-batchnorm`` never hides a failing finding."""
    judged = (*report.baseline.new, *report.baseline.worsened) if report.baseline is not None else report.findings
    return verdict_of(judged, fail_on, no_batchnorm=report.verdict == "no-batchnorm")


GATE_STRICTNESS = {"never": 0, "error": 1, "warning": 2}


def stricter(first: str, second: str) -> str:
    """The stricter of two ``fail_on`` levels (``warning`` fails on more than ``error``)."""
    return max(first, second, key=GATE_STRICTNESS.__getitem__)


def regate(report: Report, fail_on: str) -> Report:
    """``report`` judged at ``fail_on`` (the reader's gate, not the one stored in the file)."""
    return replace(report, fail_on=fail_on, verdict=gate_verdict(report, fail_on))


def schema_path(kind: str = "run") -> Path:
    """The packaged JSON Schema of a ``run`` result or a ``fix`` result."""
    return Path(__file__).parents[1] / "schema" / f"{kind}-v1.json"


FIX_SCHEMA_ID = "bncheck/fix/v1"


@dataclass(frozen=True)
class LayerFix:
    name: str
    """Qualified module name."""
    score_before: Optional[float]
    """Layer score before recalibration (None: not measured or not finite)."""
    score_after: Optional[float]
    """Layer score after recalibration, on the same sample."""
    finding_before: Optional[str]
    """Most severe finding code before, if any."""
    finding_after: Optional[str]
    """Most severe finding code after, if any."""
    recalibrated: bool
    """Whether this layer's running statistics were replaced."""
    values: Optional[int] = None
    """Values per channel the new statistics pool."""
    standard_error: Optional[float] = None
    """Expected error of the new statistics from sampling alone, in output stds."""
    mean_change: Optional[float] = None
    """RMS change of the running mean, in old running stds."""
    var_ratio: Optional[float] = None
    """Typical new / old running variance."""


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclass(frozen=True)
class HeldOut:
    """The fix checked on samples its statistics did not see: recalibrated on the other
    batches, the task metric on the last quarter before and after."""

    metric: str
    """``accuracy``, ``mIoU`` or ``recall`` (detection)."""
    before: float
    after: float
    samples: int
    """Held-out samples the metric was measured on."""
    fitted: int
    """Samples the held-out check's statistics came from."""


@dataclass(frozen=True)
class FixReport(Displayed):
    """``bncheck fix``: what was recalibrated, the diagnosis before and after, and the decision."""

    outcome: str
    """``written``, ``dry-run`` (computed, not written) or ``refused`` (nothing written)."""
    out: Optional[str]
    """The file written (or that would be written)."""
    reasons: tuple[str, ...]
    """Why it was refused, or what ``--force`` overrode."""
    warnings: tuple[str, ...]
    """Caveats: small sample, accuracy not verifiable without labels, ..."""
    samples: int
    """Samples whose statistics were pooled."""
    batches: int
    layers: tuple[LayerFix, ...]
    """Every BN layer, in the order of the before-report's ranking."""
    skipped: tuple[SkippedLayer, ...]
    """BN layers left unchanged, and why."""
    before: Report
    after: Optional[Report]
    """The diagnosis of the recalibrated model (None when nothing was recalibrated)."""
    remaining: tuple[Finding, ...]
    """Findings of the recalibrated model at or above fail_on."""
    verdict: str
    """``pass``: written (or writable) and the fixed model passes the gate; ``fail`` otherwise."""
    held_out: Optional[HeldOut] = None
    """The labelled metric on held-out samples (None: no labels, one batch, or other recalibration data)."""
    schema: str = FIX_SCHEMA_ID


_NESTED.update({
    (FixReport, "layers"): LayerFix,
    (FixReport, "skipped"): SkippedLayer,
    (FixReport, "remaining"): Finding,
    (FixReport, "held_out"): HeldOut,
})


def fix_to_dict(fix: FixReport) -> dict[str, Any]:
    body = _plain(asdict(fix))
    body.pop("schema")
    body["before"] = to_dict(fix.before)
    body["after"] = to_dict(fix.after) if fix.after is not None else None
    return {"schema": FIX_SCHEMA_ID, **body}


def dumps_fix(fix: FixReport) -> str:
    return json.dumps(fix_to_dict(fix), indent=2, allow_nan=False) + "\n"




DIFF_SCHEMA_ID = "bncheck/diff/v1"


@dataclass(frozen=True)
class LayerDiff:
    name: str
    """BN layer name (in both checkpoints)."""
    type: str
    channels: int
    mean_shift: Optional[float]
    """RMS over channels of (mean_B - mean_A) / sqrt(var_A + eps): how far the running mean moved."""
    var_log_change: Optional[float]
    """RMS over channels of ln((var_B + eps) / (var_A + eps)): how far the running variance moved."""
    stats_identical: bool
    """Running mean and variance bit-identical in both checkpoints."""
    affine_change: Optional[float]
    """Relative L2 change of gamma or beta (the larger); None without affine parameters."""
    feeding: Optional[str]
    """The module whose output this layer normalizes (nearest weighted module before it)."""
    feeding_change: Optional[float]
    """Relative L2 change of that module's weight."""


@dataclass(frozen=True)
class DiffReport(Displayed):
    """``bncheck diff A B``: BN statistics and the weights around them, compared."""

    a: ModelInfo
    b: ModelInfo
    layers: tuple[LayerDiff, ...]
    """Layers in both checkpoints, most moved statistics first."""
    findings: tuple[Finding, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    verdict: str
    fail_on: str
    schema: str = DIFF_SCHEMA_ID


def diff_to_dict(diff: DiffReport) -> dict[str, Any]:
    body = _plain(asdict(diff))
    body.pop("schema")
    return {"schema": DIFF_SCHEMA_ID, **body}


def dumps_diff(diff: DiffReport) -> str:
    return json.dumps(diff_to_dict(diff), indent=2, allow_nan=False) + "\n"
