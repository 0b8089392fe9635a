"""Per-layer numbers from pooled statistics, and the ``Report`` built from them.

``score_layer`` turns one layer's pooled input moments and its running statistics into
the dimensionless scores of ``metrics``; ``layer_facts`` adds what the module itself says
(momentum, buffers, affine); ``build_report`` diagnoses, ranks and decides the verdict.
Pure functions of what the passes measured: no forward passes here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Optional

import torch
from torch import nn

from bncheck import __version__
from bncheck.config import Thresholds
from bncheck.judging.metrics import (
    ChannelMoments,
    channel_weights,
    gaussian_kl,
    mean_shift,
    noise_floor,
    normalization_error,
    scale_ratio,
    weighted_geometric_mean,
    weighted_rms,
)
from bncheck.judging.preprocessing import InputReading
from bncheck.judging.rules import (
    FROZEN_READING_CODES,
    LayerFacts,
    chance_accuracy_finding,
    check_data_first,
    collapse_more_likely,
    eval_mode_is_better,
    eval_not_worse,
    frozen_by_module,
    frozen_in_eval,
    layer_findings,
    model_findings,
    one_class_sample_finding,
    stale_at_no_cost,
    stale_with_labels,
    task_metric,
    train_mode_is_better,
)
from bncheck.measuring.statistics import LayerStats
from bncheck.reporting.report import (
    SEVERITY_ORDER,
    STALE_CODES,
    ChannelDrift,
    DataInfo,
    Finding,
    LayerResult,
    ModelInfo,
    OutputDivergence,
    PassRecord,
    Picture,
    Report,
    verdict_of,
)
from bncheck.runtime import BNLayer

WORST_CHANNELS = 5


@dataclass(frozen=True)
class _Scores:
    score: Optional[float]
    mean_shift: Optional[float]
    max_abs_mean_shift: Optional[float]
    scale_ratio: Optional[float]
    kl: Optional[float]
    max_error: Optional[float]
    noise_floor: Optional[float]
    drift_to_noise: Optional[float]
    batch_noise: Optional[float]
    worst: tuple[ChannelDrift, ...]
    nonfinite_batch: int
    dead_blowup: int
    dead_both: int
    max_abs_log_scale: Optional[float] = None


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def score_layer(layer: BNLayer, moments: ChannelMoments, dead_var: float) -> _Scores:
    running_mean = layer.running_mean.detach().to(moments.device, torch.float64)
    running_var = layer.running_var.detach().to(moments.device, torch.float64)
    eps = layer.eps
    weights = channel_weights(layer.weight, moments.channels, running_mean)
    a = scale_ratio(moments.var, running_var, eps)
    b = mean_shift(moments.mean, running_mean, running_var, eps)
    e = normalization_error(a, b)
    kl = gaussian_kl(a, b)
    score = weighted_rms(e, weights)
    floor = noise_floor(moments, running_var, eps, weights, moments.values)
    # Batch-to-batch scatter of train mode is about batch vs population statistics, so it is
    # measured against the pooled variance (the running stats play no part in it).
    per_batch = noise_floor(moments, moments.var, eps, weights, moments.values / moments.batches)
    ranked = torch.nan_to_num(e, nan=math.inf).argsort(descending=True)[:WORST_CHANNELS]
    worst = tuple(
        ChannelDrift(int(c), _finite(float(e[c])), _finite(float(b[c])), _finite(float(a[c])))
        for c in ranked.tolist()
    )
    batch_finite = torch.isfinite(moments.mean) & torch.isfinite(moments.var)
    drift = score / floor if math.isfinite(score) and math.isfinite(floor) and floor > 0 else math.nan
    return _Scores(
        score=_finite(score),
        mean_shift=_finite(weighted_rms(b, weights)),
        max_abs_mean_shift=_finite(float(b.abs().max())) if b.numel() else None,
        scale_ratio=_finite(weighted_geometric_mean(a, weights)),
        kl=_finite(float((weights * kl).sum() / weights.sum())),
        max_error=_finite(float(e.max())) if e.numel() else None,
        noise_floor=_finite(floor),
        drift_to_noise=_finite(drift),
        batch_noise=_finite(per_batch),
        worst=worst,
        nonfinite_batch=int((~batch_finite).sum()),
        dead_blowup=int(((running_var <= dead_var) & (moments.var > 100.0 * (running_var + eps))).sum()),
        dead_both=int(((running_var <= dead_var) & (moments.var <= dead_var)).sum()),
        max_abs_log_scale=_finite(float(torch.log(a).abs().max())) if a.numel() else None,
    )


_NO_SCORES = _Scores(None, None, None, None, None, None, None, None, None, (), 0, 0, 0)


def _init_residual(momentum: Optional[float], count: Optional[int], run: LayerStats) -> tuple[Optional[float], int]:
    """How much of the initial running_var (1) is still in the buffer after ``count`` EMA
    updates, ``(1 - momentum) ** count``, and on how many channels that residual is at least
    the variance the data has there while the buffer does hold it (so the initial value, not
    the data, dominates them)."""
    if momentum is None or not 0.0 < momentum < 1.0 or not count or run.train is None:
        return None, 0
    residual = (1.0 - momentum) ** count
    running_var = run.layer.running_var
    if running_var is None:
        return residual, 0
    # The reading needs evidence in the buffer too: if the init is still there, running_var
    # holds at least (about) the residual where the data's variance is smaller. Statistics set
    # some other way (update_bn, bncheck fix, a cumulative average) leave a small counter
    # without the residual, and are not called unconverged.
    data_mean, data_var = run.train.mean, run.train.var
    running_var = running_var.detach().to(data_var)
    carries = running_var >= 0.5 * residual
    unconverged = (data_var < residual) & carries
    if not bool(unconverged.any()) or run.layer.running_mean is None:
        return residual, 0
    # And the reading must explain the buffers: an EMA from the init (mean 0, var 1) over this
    # data predicts running stats ((1 - r) mu, r + (1 - r) var). A converged buffer that merely
    # disagrees with new data (drift after a recalibration, whose counter is small) is not it.
    running_mean = run.layer.running_mean.detach().to(data_mean)
    eps = run.layer.eps
    predicted_error = normalization_error(
        scale_ratio((1.0 - residual) * data_var + residual, running_var, eps),
        mean_shift((1.0 - residual) * data_mean, running_mean, running_var, eps),
    )[unconverged]
    data_error = normalization_error(
        scale_ratio(data_var, running_var, eps), mean_shift(data_mean, running_mean, running_var, eps)
    )[unconverged]
    if float(predicted_error.square().mean().sqrt()) > 0.5 * float(data_error.square().mean().sqrt()):
        return residual, 0
    return residual, int(unconverged.sum())


def layer_facts(run: LayerStats, s: _Scores, batch_size: int, dead_var: float) -> LayerFacts:
    layer = run.layer
    rm, rv = layer.running_mean, layer.running_var
    nonfinite_running = 0
    default = False
    if rm is not None and rv is not None:
        nonfinite_running = int((~(torch.isfinite(rm) & torch.isfinite(rv)) | (rv < 0)).sum())
        default = bool((rm == 0).all()) and bool((rv == 1).all())
    tracked = layer.buffer("num_batches_tracked")
    affine = [p for p in (getattr(layer.module, "weight", None), getattr(layer.module, "bias", None))
              if isinstance(p, nn.Parameter)]
    count = int(tracked) if tracked is not None and tracked.numel() == 1 else None
    residual, unconverged = _init_residual(layer.momentum, count, run)
    return LayerFacts(
        **same_named(s, LayerFacts),  # the scores: score, drift_to_noise, dead channels, ...
        **same_named(layer, LayerFacts),  # the runtime's facts: name, kind, momentum, eps, ...
        depth=run.depth,
        batch_size=batch_size,
        nonfinite_running=nonfinite_running,
        default_buffers=default,
        num_batches_tracked=count,
        dead_running=int((rv <= dead_var).sum()) if rv is not None else 0,
        affine_frozen=bool(affine) and not any(p.requires_grad for p in affine),
        saved_training=run.saved_training,
        init_residual=residual,
        unconverged_channels=unconverged,
    )


def same_named(source: object, target: type) -> dict[str, object]:
    """The values of ``source`` (a dataclass or an object with properties) for every field of
    the dataclass ``target`` it has under the same name: results are built from the measured
    quantities without hand-copied field lists."""
    own = {f.name for f in fields(source)} if is_dataclass(source) else set()
    return {f.name: getattr(source, f.name) for f in fields(target)
            if f.name in own or isinstance(getattr(type(source), f.name, None), property)}


def _rank_key(item: tuple[LayerFacts, _Scores]) -> tuple:
    facts, scores = item
    broken = facts.nonfinite_running or facts.nonfinite_batch
    if broken:
        return (0, 0.0, facts.depth if facts.depth is not None else 10**9)
    if scores.score is not None:
        return (1, -scores.score, 0)
    return (2, 0.0, facts.depth if facts.depth is not None else 10**9)


def build_report(
    runs: list[LayerStats],
    ignored: set[str],
    thresholds: Thresholds,
    fail_on: str,
    model_info: ModelInfo,
    data_info: DataInfo,
    output: OutputDivergence,
    device: str,
    started: float,
    *,
    has_data: bool,
    attribution: Optional[dict[str, Optional[float]]] = None,
    extra_findings: tuple[Finding, ...] = (),
    momentum_known: bool = True,
    conclusion: Optional[str] = None,
    world_size: int = 1,
    input_reading: Optional[InputReading] = None,
    pictures: tuple[Picture, ...] = (),
    passes: tuple[PassRecord, ...] = (),
) -> Report:
    """Score, diagnose and rank the layers; decide the verdict. ``extra_findings`` are
    model-level findings measured elsewhere (the output-divergence net); ``conclusion`` and
    ``world_size`` go into the report as they are."""
    largest_batch = data_info.batch_size
    scored = []
    for run in runs:
        if run.layer.name in ignored:
            continue
        if run.train is not None and run.layer.running_mean is not None:
            scores = score_layer(run.layer, run.train, thresholds.dead_channel_var)
        else:
            scores = _NO_SCORES
        facts = layer_facts(run, scores, largest_batch, thresholds.dead_channel_var)
        if not momentum_known:
            facts = replace(facts, momentum_known=False)
        if attribution and run.layer.name in attribution:
            facts = replace(facts, attribution=attribution[run.layer.name])
        scored.append((facts, scores))
    scored.sort(key=_rank_key)

    called = [f for f, _ in scored if f.depth is not None]
    input_layer = min(called, key=lambda f: f.depth).name if called else None
    findings_by_layer = {
        f.name: layer_findings(f, thresholds, is_input_layer=f.name == input_layer, has_data=has_data,
                               input_reading=input_reading if f.name == input_layer else None)
        for f, _ in scored
    }
    metric, *task = task_metric(output)
    if has_data and eval_mode_is_better(output):
        findings_by_layer = {
            name: [frozen_in_eval(f, *task, metric=metric) if f.code in FROZEN_READING_CODES
                   else f for f in found]
            for name, found in findings_by_layer.items()
        }
    elif has_data and eval_not_worse(output):
        _, train, evaluated = task_metric(output)
        findings_by_layer = {
            name: [stale_at_no_cost(f, train, evaluated, metric, output.labeled)
                   if f.code in FROZEN_READING_CODES and f.severity == "error" else f for f in found]
            for name, found in findings_by_layer.items()
        }
    elif has_data and train_mode_is_better(output):
        domain = input_reading is not None and input_reading.kind == "domain"  # one reading left: stale
        findings_by_layer = {
            name: [stale_with_labels(f, *task, input_layer=name == input_layer and not domain, metric=metric)
                   if f.code == "stale-running-stats" else f for f in found]
            for name, found in findings_by_layer.items()
        }
    owners = {run.layer.name: run.layer.frozen_by for run in runs if run.layer.frozen_by}
    if owners:
        findings_by_layer = {name: [frozen_by_module(f, owners[name]) if name in owners else f for f in found]
                             for name, found in findings_by_layer.items()}
    # the sample itself looks wrong (one class, or data the model cannot classify): say that
    # first, and advise no recalibration on it
    data_first = [f for f in (chance_accuracy_finding(output), one_class_sample_finding(output)) if f] \
        if has_data else []
    weakened: list[Finding] = []
    first_stale = input_layer is not None and any(
        f.code in STALE_CODES and f.severity != "info" for f in findings_by_layer.get(input_layer, []))
    if first_stale and any(f.code == "unrepresentative-sample" for f in data_first):
        weakened = [collapse_more_likely(f) for f in data_first if f.code == "unrepresentative-sample"]
        data_first = [f for f in data_first if f.code != "unrepresentative-sample"]
    if data_first:
        one_sided = data_first[0].code == "unrepresentative-sample" and input_layer is not None and not any(
            f.code in STALE_CODES for f in findings_by_layer.get(input_layer, []))
        findings_by_layer = {name: [check_data_first(f, data_first[0], cannot_judge=one_sided) for f in found]
                             for name, found in findings_by_layer.items()}
    eval_scores = {
        run.layer.name: score_layer(run.layer, run.eval, thresholds.dead_channel_var)
        for run in runs
        if run.eval is not None and run.layer.running_mean is not None
    }
    layer_by_name = {run.layer.name: run.layer for run in runs}
    layer_results = []
    for rank, (facts, s) in enumerate(scored, start=1):
        layer = layer_by_name[facts.name]
        ev = eval_scores.get(facts.name)
        layer_results.append(
            LayerResult(
                **same_named(s, LayerResult),  # score, mean_shift, scale_ratio, kl, noise_floor, ...
                name=facts.name,
                type=facts.type_name,
                channels=facts.channels,
                rank=rank,
                depth=facts.depth,
                eval_score=ev.score if ev else None,
                attribution=facts.attribution,
                momentum=facts.momentum,
                eps=layer.eps,
                track_running_stats=facts.track_running_stats,
                worst_channels=s.worst,
                findings=tuple(findings_by_layer[facts.name]),
            )
        )

    first_divergent = None
    for facts, _ in sorted(((f, s) for f, s in scored if f.depth is not None), key=lambda fs: fs[0].depth):
        ev = eval_scores.get(facts.name)
        if ev is None:
            continue
        diverged = ev.score is None or (
            ev.score >= thresholds.divergence
            and (ev.drift_to_noise is None or ev.drift_to_noise >= thresholds.drift_to_noise)
        )
        if diverged:
            first_divergent = facts.name
            break

    all_findings: list[Finding] = [f for r in layer_results for f in r.findings]
    all_findings += model_findings([f for f, _ in scored], thresholds)
    all_findings += data_first + weakened
    all_findings += extra_findings
    # Most severe first; within a severity, the layers whose fix measurably closes most of the
    # output gap first, and those whose fix alone widens it last (never the first advice).
    share = {r.name: r.attribution for r in layer_results}

    def order(finding: Finding) -> tuple:
        gained = share.get(finding.layer) if finding.layer is not None else None
        return (-SEVERITY_ORDER[finding.severity], 1 if gained is not None and gained < 0 else 0, -(gained or 0.0))

    all_findings.sort(key=order)
    verdict = verdict_of(all_findings, fail_on, no_batchnorm=not runs)  # re-checked on every saved run
    return Report(
        model=model_info,
        data=data_info,
        verdict=verdict,
        fail_on=fail_on,
        output=output,
        first_divergent_layer=first_divergent,
        layers=tuple(layer_results),
        findings=tuple(all_findings),
        thresholds={k: float(v) for k, v in asdict(thresholds).items()},
        bncheck_version=__version__,
        torch_version=torch.__version__,
        device=device,
        duration_s=round(time.perf_counter() - started, 3),
        conclusion=conclusion,
        world_size=world_size,
        input_reading=input_reading.kind if input_reading is not None else None,
        pictures=pictures,
        passes=passes,
    )
