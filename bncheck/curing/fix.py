"""``bncheck fix``: diagnose, recalibrate, diagnose again, then write -- or refuse.

Refusals exist because recalibration can hide a bug or break a good model:

* ``input-distribution`` before: the data itself looks wrongly preprocessed; new running
  statistics would bake that into the checkpoint.
* ``traced-in-train-mode`` before: a TorchScript trace or ``torch.export`` program with
  ``training=True`` frozen into its BN calls never reads its running statistics; writing new ones would only
  look like a cure.
* with labels, a lower eval-mode accuracy (mIoU, recall) after than before: BN kept in eval
  mode on purpose during a fine-tune leaves running statistics that disagree with the new
  data, yet the layers after them learned with exactly those statistics.
* with labels and two or more batches, the same on held-out samples: statistics recalibrated
  on the other batches must not lower the metric on the last quarter, which they never saw
  (the in-sample check alone flatters statistics fitted to the very samples they are judged on).

``force`` overrides both, and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional

from bncheck.config import Thresholds
from bncheck.curing.recalibration import RecalibrationResult, recalibrate, recalibrate_measured
from bncheck.engine import TrainPass, analyze
from bncheck.reading.checkpoint import Checkpoint
from bncheck.reporting.numbers import pct
from bncheck.reporting.report import FixReport, HeldOut, LayerFix, Report, SkippedLayer, Sources, fails_gate

# Eval-mode accuracy may drop by at most this many samples' worth before it counts as harm
# (one flipped sample on a small labelled sample is noise, not harm).
_HARM_SAMPLES = 1


def _fmt_pct(value: Optional[float]) -> str:
    return pct(value, missing="n/a")


def run_fix(
    checkpoint: Checkpoint,
    recalibration_data: Optional[Iterable[Any]],
    verification_data: Callable[[], Iterable[Any]],
    *,
    out: Optional[Path],
    layers: Optional[list[str]] = None,
    num_samples: Optional[int] = None,
    batch_size: int = 32,
    thresholds: Optional[Thresholds] = None,
    attribute: int = 0,
    ignore: tuple[str, ...] = (),
    fail_on: str = "error",
    dry_run: bool = False,
    force: bool = False,
    sources: Optional[Sources] = None,
) -> FixReport:
    """Diagnose ``checkpoint.module`` on ``verification_data()``, recalibrate it (in place:
    the checkpoint object is bncheck's own copy) on ``recalibration_data``, diagnose again,
    and write ``out`` unless refused or ``dry_run``. ``sources`` describes the data (default:
    only the checkpoint).

    ``recalibration_data=None``: recalibrate on the verification data itself. Then the passes
    are shared: train mode never reads running statistics, so the first diagnosis's train-mode
    pass gives the recalibration its statistics and the second diagnosis its train-mode
    outputs; what runs is one eval pass and one train pass before, and one eval pass after --
    what a careful script does by hand (an eval pass, ``update_bn``, an eval pass)."""
    model = checkpoint.module
    common = dict(batch_size=batch_size, thresholds=thresholds, attribute=attribute, ignore=ignore, fail_on=fail_on,
                  momentum_known=checkpoint.info.momentum_from != "library-default",
                  sources=sources or Sources(model=checkpoint.info))
    shared = TrainPass()
    before = analyze(model, verification_data(), **common, train_pass=shared)
    reasons: list[str] = []
    warnings: list[str] = []
    blocking: list[str] = []

    bad_input = [f for f in before.findings if f.code == "input-distribution"]
    if bad_input:
        message = bad_input[0].message
        evidence = message[message.index("these inputs look"):].rstrip(".") if "these inputs look" in message else ""
        evidence = evidence or (message.split("; ", 1)[1].rstrip(".") if "; " in message else "")
        blocking.append(
            f"the data looks wrongly preprocessed for this model (input-distribution on {bad_input[0].layer}"
            f"{': ' + evidence if evidence else ''}): recalibrating on it would bake that into the checkpoint; fix "
            "the preprocessing first"
        )

    from bncheck.judging.findings import SAMPLE
    from bncheck.judging.rules import eval_mode_is_better

    ran = [layer for layer in before.layers if layer.depth is not None]
    first = min(ran, key=lambda layer: layer.depth).name if ran else None
    first_stale = any(f.code == "stale-running-stats" and f.layer == first for f in before.findings)
    if first_stale and before.input_reading != "domain":
        # no transform of the input explained the first layer's shift (a known preprocessing bug
        # would be input-distribution and block above; a fitted domain change is no warning)
        what = {"unexplained": "no known preprocessing mistake explains the first BN layer's shift ({}), nor a "
                               "simple change of brightness or colour",
                "ambiguous": "the first BN layer's shift ({}) fits a units or normalization mismatch about as well "
                             "as a change of scene"}.get(
            before.input_reading or "",
            "the first BN layer's shift ({}) could not be tested against known preprocessing mistakes")
        warnings.append(
            what.format(first) + ": if this data went through another pipeline than training (resizing, cropping, "
            "scaling, mean/std, channel order), fix that instead -- recalibration would bake it in"
        )
    if eval_mode_is_better(before.output):
        blocking.append(
            f"with these labels eval mode is more accurate than train mode ({_fmt_pct(before.output.eval_accuracy)} "
            f"vs {_fmt_pct(before.output.train_accuracy)}): BN was kept in eval mode on purpose while training, "
            "and the layers after it rely on its statistics; keep the checkpoint as it is"
        )
    off_sample = [f for f in before.findings if f.code in SAMPLE and f.severity != "info"]
    if off_sample:
        blocking.append(
            f"the sample looks off ({off_sample[0].code}: {off_sample[0].message.rstrip('.')}); statistics "
            "recalibrated on it would fit it and not the population: use a representative sample"
        )

    traced = [f for f in before.findings if f.code == "traced-in-train-mode"]
    if traced:
        blocking.append(
            f"{len(traced)} BN layer(s) were traced or exported in train mode (first: {traced[0].layer}): they "
            "normalize with batch statistics even after .eval(), so new running statistics change nothing; "
            "re-export the model after model.eval()"
        )

    # statistics from three quarters of the verification batches, judged on the last quarter: the
    # written model's statistics come from all the data, but whether statistics fitted to some
    # samples carry over to others is what this sample can tell
    held_out = _held_out(model, list(verification_data()), layers, batch_size, common) \
        if before.output.labeled else None

    if recalibration_data is None and num_samples is None and shared.stats is not None:
        result = recalibrate_measured(model, shared.stats, shared.samples, shared.batches, layers=layers)
    else:
        data = verification_data() if recalibration_data is None else recalibration_data
        result = recalibrate(model, data, layers=layers, num_samples=num_samples, batch_size=batch_size,
                             in_place=True)
    after = analyze(model, verification_data(), **common, train_pass=shared) if result.layers else None

    if after is not None:
        blocking += _harm(before, after)
        if held_out is not None and held_out.after < held_out.before - _tolerance(held_out):
            blocking.append(
                f"on {held_out.samples} held-out samples that the statistics did not see, recalibration lowers "
                f"eval-mode {held_out.metric} from {_fmt_pct(held_out.before)} to {_fmt_pct(held_out.after)}: the "
                "new statistics fit this sample, not the data the model meets; use more (and representative) data"
            )
        if before.output.eval_accuracy is None:
            warnings.append(_unverified(before, after))
    if not result.layers:
        blocking.append("no BN layer could be recalibrated (see skipped)")
    needed = result.samples_for_stable_statistics()
    if needed is not None:
        warnings.append(
            f"{result.samples} samples are few for stable statistics: the worst layer's new statistics carry an "
            f"expected error of {result.worst_standard_error:.3f} output stds; about {needed} samples would bring "
            "every layer under 0.05"
        )

    if blocking and force:
        warnings += [f"FORCED despite: {reason}" for reason in blocking]
        reasons = [f"overridden by force: {reason}" for reason in blocking]
        blocking = []
    refused = bool(blocking)
    reasons = blocking or reasons
    if refused:
        outcome = "refused"
    elif dry_run:
        outcome = "dry-run"
    else:
        from bncheck.measuring.distributed import current

        if current().main:  # under torchrun every rank holds the same buffers; one writes
            checkpoint.write(out, force=force)
        outcome = "written"
    remaining = tuple(
        f for f in (after.findings if after is not None else before.findings) if fails_gate([f], fail_on)
    )
    return FixReport(
        outcome=outcome,
        out=str(out) if out is not None else None,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
        samples=result.samples,
        batches=result.batches,
        layers=_layer_table(before, after, result),
        skipped=tuple(SkippedLayer(name, why) for name, why in result.skipped),
        before=before,
        after=after,
        remaining=remaining,
        verdict="fail" if refused or remaining else "pass",
        held_out=held_out,
    )


HELD_OUT_SHARE = 4
"""The held-out check measures on the last 1/4 of the verification batches (at least one)."""


def _tolerance(held: HeldOut) -> float:
    """How far the held-out metric may fall before it counts: a point of mIoU, one sample's worth
    of accuracy or recall."""
    return 0.01 if held.metric == "mIoU" else _HARM_SAMPLES / max(held.samples, 1)


def _held_out(model: Any, batches: list, layers: Optional[list[str]], batch_size: int,
              common: dict) -> Optional[HeldOut]:
    """The task metric on the last quarter of the batches, before and after recalibrating on
    the rest (the model's buffers restored afterwards): what the fix does to samples its
    statistics never saw. None with fewer than two batches or no labelled metric."""
    from bncheck.judging.rules import task_metric
    from bncheck.runtime import preserved_state

    if len(batches) < 2:
        return None
    k = max(1, len(batches) // HELD_OUT_SHARE)
    fit, held = batches[:-k], batches[-k:]
    quick = {**common, "attribute": 0}
    before = analyze(model, held, **quick)
    metric, _, value_before = task_metric(before.output)
    if value_before is None:
        return None
    with preserved_state(model):
        fitted = recalibrate(model, fit, layers=layers, batch_size=batch_size, in_place=True)
        after = analyze(model, held, **quick)
    value_after = task_metric(after.output)[2]
    if value_after is None:
        return None
    return HeldOut(metric, value_before, value_after, samples=before.data.samples, fitted=fitted.samples)


def _harm(before: Report, after: Report) -> list[str]:
    miou_before, miou_after = before.output.eval_miou, after.output.eval_miou
    if miou_before is not None and miou_after is not None and miou_after < miou_before - 0.01:
        return [
            f"recalibration lowers eval-mode mIoU on these masks from {_fmt_pct(miou_before)} to "
            f"{_fmt_pct(miou_after)}: the running statistics look deliberately kept (BN frozen in eval mode while "
            "fine-tuning); keep the checkpoint as it is"
        ]
    acc_before, acc_after = before.output.eval_accuracy, after.output.eval_accuracy
    if acc_before is None or acc_after is None:
        return []
    labelled = max(before.data.samples, 1)
    if acc_after < acc_before - _HARM_SAMPLES / labelled:
        return [
            f"recalibration lowers eval-mode accuracy on this data from {_fmt_pct(acc_before)} to "
            f"{_fmt_pct(acc_after)}: the running statistics look deliberately kept (BN frozen in eval mode "
            "while fine-tuning), and the layers after them rely on them; keep the checkpoint as it is"
        ]
    return []


def _unverified(before: Report, after: Report) -> str:
    agree_before, agree_after = before.output.top1_agreement, after.output.top1_agreement
    moved = ""
    if agree_before is not None and agree_after is not None:
        moved = (f"; train/eval top-1 agreement went from {_fmt_pct(agree_before)} to {_fmt_pct(agree_after)}")
    elif before.output.relative_l2 is not None and after.output.relative_l2 is not None:
        moved = (f"; train/eval relative output difference went from {before.output.relative_l2:.3f} to "
                 f"{after.output.relative_l2:.3f}")
    return ("the data has no labels, so whether eval-mode accuracy improved could not be verified"
            f"{moved}; check held-out accuracy before deploying")


def _layer_table(before: Report, after: Optional[Report], result: RecalibrationResult) -> tuple[LayerFix, ...]:
    after_by_name = {layer.name: layer for layer in after.layers} if after is not None else {}
    recal = {layer.name: layer for layer in result.layers}
    rows = []
    for layer in before.layers:
        later = after_by_name.get(layer.name)
        top_before = before.top_finding(layer)
        top_after = after.top_finding(later) if after is not None and later is not None else None
        r = recal.get(layer.name)
        rows.append(LayerFix(
            name=layer.name,
            score_before=layer.score,
            score_after=later.score if later is not None else None,
            finding_before=top_before.code if top_before else None,
            finding_after=top_after.code if top_after else None,
            recalibrated=r is not None,
            values=r.values if r else None,
            standard_error=r.standard_error if r else None,
            mean_change=r.mean_change if r else None,
            var_ratio=r.var_ratio if r else None,
        ))
    return tuple(rows)
