"""The model-level conclusions drawn from passes that recalibrate several layers at once: when
many layers are stale, one sentence (recalibrate them all, with the measured share of the output
gap that recovers) instead of many alike findings; when several layers are each just under the
noise bar, whether together they pull eval mode away. Pure: the engine runs the passes
(``measuring.passes``) and hands the measured shares in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from bncheck.judging.findings import SAMPLE
from bncheck.measuring.passes import BETWEEN_BATCHES
from bncheck.reporting.report import STALE_CODES, Finding, Report

MANY_STALE = 3
"""From this many stale layers on, the report concludes once: recalibrate them all."""
HELPS = 0.1
"""Share of the output gap that recalibrating the stale layers must recover for the conclusion to advise it."""
WEAK_DRIFT = 2.0
"""Drift-to-noise ratio from which a layer below ``thresholds.drift_to_noise`` still counts as weak evidence."""
WEAK_LAYERS = 3
"""Weak layers needed before their evidence is added up."""
COMBINED_SHARE = 0.2
"""Share of the output gap that recalibrating the weak layers together must recover (measured): the
direction test. At small batches much of the gap is batch noise that no statistic removes, so the
bar is a fifth, not a half; on healthy models the rule never gets this far (benchmarks/false_alarms.py:
no run of the slow sweep or the healthy samples has three layers at 2x their noise floor)."""


SETTLE_Z = 3.0
"""The recalibrate-all pass stops once the share it measures is this many standard errors on one
side of ``HELPS`` (the advice cannot turn on the batches left)."""
SETTLE_SAMPLES = 8
"""...and not before this many samples."""


def share_settled(values: list[float], gap: float, bar: float = HELPS) -> bool:
    """Whether the share of the output gap a recalibrated pass closes is surely on one side of
    ``bar``, from the batches run so far: ``values`` are their samples' KL after recalibrating,
    ``gap`` the same samples' mean KL before. The share is ``1 - mean(values) / gap``; its standard
    error comes from the values' spread (inflated by ``BETWEEN_BATCHES`` for what a batch's
    samples share; the before-values' own spread is left out, which errs long when the two move
    together, as they do)."""
    n = len(values)
    if n < SETTLE_SAMPLES or not gap or gap <= 0:
        return False
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) * BETWEEN_BATCHES / gap
    share = 1.0 - mean / gap
    return share - SETTLE_Z * spread >= bar or share + SETTLE_Z * spread < bar


@dataclass(frozen=True)
class Subjects:
    """The layers a 'recalibrate them all' conclusion is about."""

    stale: tuple[str, ...]
    """Layers flagged stale (not info), in rank order."""
    measured: tuple[str, ...]
    """Every layer with a score (what recalibrating all of them means)."""


def conclusion_subjects(report: Report, measurable: set[str]) -> Optional[Subjects]:
    """When several layers are stale (``MANY_STALE``, or half of a small net's) and the sample
    itself is not off: the layers a conclusion speaks of. None otherwise (no conclusion)."""
    stale = tuple(layer.name for layer in report.layers if layer.score is not None
                  and any(f.code in STALE_CODES and f.severity != "info" for f in layer.findings))
    measured = tuple(layer.name for layer in report.layers if layer.score is not None and layer.name in measurable)
    many = len(stale) >= MANY_STALE or (len(stale) >= 2 and 2 * len(stale) >= len(measured))  # small nets: half
    if not many or any(f.code in SAMPLE and f.severity != "info" for f in report.findings):
        return None  # a sample that is off comes first: no recalibration is advised on it
    return Subjects(stale, measured)


def recalibrate_all_explains(subjects: Subjects, all_share: Optional[float], flagged_share: Optional[float]) -> bool:
    """Whether the conclusion advises recalibrating every layer on a measured share: then what
    each layer alone would recover cannot change the advice."""
    return all_share is not None and all_share >= HELPS and (flagged_share is None or all_share >= flagged_share - 0.05)


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%" if share >= 0 else f"none (the gap grows by {100 * -share:.0f}%)"


def conclusion_text(report: Report, subjects: Subjects, all_share: Optional[float],
                    flagged_share: Optional[float], measure: bool = True, measured_on: str = "") -> str:
    """One sentence instead of many alike findings: when several layers are stale, the cure is
    what ``bncheck fix`` does -- every BN layer recalibrated together, each on the input it sees
    once the layers before it use batch statistics -- with the share of the output gap that
    recovers (one eval pass). When only some layers are flagged, the flagged subset is measured
    too: the two can differ in sign, because unflagged layers downstream were tuned to the
    flagged ones' statistics. ``measure=False`` (``--attribute 0``): nothing measured, and the
    sentence says so. "The gap is not in these statistics" is said only when neither closes it.
    ``measured_on`` (e.g. " on 16 of 64 kept samples") says so when the pass stopped early."""
    stale, measured = len(subjects.stale), len(subjects.measured)
    subset = (f"; recalibrating only the {stale} flagged recovers {_pct(flagged_share)}"
              if flagged_share is not None and stale < measured else "")
    if recalibrate_all_explains(subjects, all_share, flagged_share):
        return (f"{_freeze_reading(report, subjects)}{stale} of {measured} measured BN layers are "
                f"stale: recalibrate all {measured} BN layers together (what bncheck fix does, verified before it "
                f"writes): that recovers {_pct(all_share)} of the output gap (measured{measured_on}){subset}.")
    if flagged_share is not None and flagged_share >= HELPS:
        return (f"{stale} of {measured} measured BN layers are stale: recalibrating those {stale} "
                f"together recovers {_pct(flagged_share)} of the output gap (measured), all {measured} together "
                f"{_pct(all_share) if all_share is not None else 'was not measured'}: recalibrate the flagged "
                "layers (bncheck fix --layers GLOB, verified before it writes).")
    if all_share is not None:
        # the measurement does not support recalibrating: say what was measured, advise nothing it refutes
        return (f"{stale} of {measured} measured BN layers disagree with this data, but recalibrating all "
                f"{measured} on it does not close the output gap ({_pct(all_share)} of it recovered, "
                f"measured{measured_on}"
                f"{subset.replace('; recalibrating', ', recalibrating')}): the gap is not in these statistics "
                "alone -- check that this data is what the model was trained on and whether BN was kept in eval "
                "mode on purpose before changing any statistics.")
    text = (f"{stale} of {measured} measured BN layers are stale: recalibrate all BN layers together "
            "(bncheck fix, verified before it writes) rather than one at a time")
    if not measure:
        text += "; what that recovers was not measured (--attribute 0)"
    return text + "."


def _freeze_reading(report: Report, subjects: Subjects) -> str:
    """The forum's freeze, named when the evidence fits: from the modules (momentum 0, or affine
    frozen while saved in train mode: pseudo-frozen), or -- from weights alone, where momentum is
    not saved -- as one of two readings when most layers at every depth are stale."""
    frozen = [layer.name for layer in report.layers
              if any(f.code == "pseudo-frozen" and f.severity != "info" for f in layer.findings)]
    if frozen:
        return (f"BN 'frozen' the forum's way: the {len(frozen)} flagged layers have momentum 0 (or a frozen affine) "
                "yet ran in train mode, so their statistics never followed the data the model trained on. ")
    if report.model.momentum_from not in ("library-default", "builder") \
            or 2 * len(subjects.stale) < len(subjects.measured):  # momentum not saved
        return ""
    return ("Two readings fit statistics stale at most depths: BN statistics not updated while the model trained on "
            "data like this (momentum 0 / requires_grad=False left in train(), or SWA/EMA weights without a BN "
            "update), or data from another domain than training; `bncheck diff BASE.pt THIS.pt` against the "
            "checkpoint it was fine-tuned from proves the first (statistics identical while the weights moved), "
            "and the full module (torch.save(model)) shows momentum 0. Either way: ")


def weak_layers(report: Report, measurable: set[str], thresholds: Any) -> tuple[str, ...]:
    """Layers each ``WEAK_DRIFT``-``drift_to_noise`` above their noise floor (too close to flag
    alone: per-sample noise is large where feature maps are 1x1) with scores at least
    ``stale_warning``, none flagged; empty unless there are ``WEAK_LAYERS`` of them."""
    weak = tuple(layer.name for layer in report.layers
                 if layer.score is not None and layer.drift_to_noise is not None
                 and WEAK_DRIFT <= layer.drift_to_noise < thresholds.drift_to_noise
                 and layer.score >= thresholds.stale_warning
                 and not any(f.code in (*STALE_CODES, "input-distribution") for f in layer.findings)
                 and layer.name in measurable)
    return weak if len(weak) >= WEAK_LAYERS else ()


def combined_evidence_finding(report: Report, weak: tuple[str, ...], share: Optional[float], samples: int,
                              thresholds: Any, measure: bool = True) -> Optional[Finding]:
    """Evidence weak per layer but consistent across layers, while the outputs disagree: their sum
    counts only when it points the same way as the output gap -- recalibrating them together
    recovers at least ``COMBINED_SHARE`` of it (``share``, measured on ``samples``)."""
    by_name = {layer.name: layer for layer in report.layers}
    ratios = [by_name[name].drift_to_noise for name in weak]
    names = ", ".join(weak[:6]) + (f" and {len(weak) - 6} more" if len(weak) > 6 else "")
    span = f"{min(ratios):.1f}-{max(ratios):.1f}x"
    if not measure:  # --attribute 0: no pass to test the direction, so a warning that says so
        return Finding(
            "stale-running-stats", "warning", None,
            f"{len(weak)} layers each sit {span} above their noise floor (under drift_to_noise "
            f"{thresholds.drift_to_noise:g}, too close to flag alone) while the outputs disagree: {names}; whether "
            "recalibrating them closes the output gap was not measured (--attribute 0).",
            "Rerun with --attribute 1 or more to measure it, or check with bncheck fix --dry-run.",
        )
    if share is None or share < COMBINED_SHARE:
        return None
    return Finding(
        "stale-running-stats", "error", None,
        f"{len(weak)} layers each sit {span} above their noise floor (under drift_to_noise "
        f"{thresholds.drift_to_noise:g}, too close to flag alone): {names}; together they pull eval mode away "
        f"from train mode -- recalibrating them recovers {100 * share:.0f}% of the output gap (measured on "
        f"{samples} samples; the rest is batch noise at this batch size or other layers).",
        "Weak evidence that adds up: recalibrate all BN layers together on representative data with bncheck fix "
        "(it verifies the result), and check how the statistics were made (per-rank BN without SyncBN, a "
        "sampler that gave ranks different data).",
    )
