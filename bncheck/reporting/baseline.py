"""Compare a run with an accepted baseline run: per-layer score changes, and which
findings are new, worsened or resolved. Pure functions on ``Report``; no torch.

A team accepts a known drift by keeping the run that shows it as the baseline; the gate
then fails only for findings that are new, more severe, or on a layer whose score grew by
more than ``thresholds.baseline_worsen`` (relative) since the baseline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from bncheck.errors import UsageError
from bncheck.reporting.report import SEVERITY_ORDER, BaselineComparison, Finding, LayerChange, Report, gate_verdict


def _keyed(findings: tuple[Finding, ...]) -> dict[tuple[str, Optional[str], int], Finding]:
    """Findings by (code, layer, occurrence): two findings with one code on one layer (NaN in
    the running and in the batch statistics, say) stay two."""
    seen: dict[tuple[str, Optional[str]], int] = {}
    keyed = {}
    for finding in findings:
        base = (finding.code, finding.layer)
        seen[base] = seen.get(base, 0) + 1
        keyed[(*base, seen[base])] = finding
    return keyed


def check_same_model(baseline: Report, current: Report, source: str) -> None:
    """A baseline of another model compares nothing: refuse it (a usage error) instead of
    passing every finding as new."""
    before = {layer.name for layer in baseline.layers}
    after = {layer.name for layer in current.layers}
    if before and after and not before & after:
        raise UsageError(
            f"baseline {source} is from another model: none of its {len(before)} BN layer names is among this "
            f"run's {len(after)} (it has {', '.join(sorted(before)[:3])}; this run has "
            f"{', '.join(sorted(after)[:3])}); pass a run of this model as the baseline"
        )


def compare(baseline: Report, current: Report, source: str, worsen: float) -> BaselineComparison:
    check_same_model(baseline, current, source)
    before_findings = _keyed(baseline.findings)
    after_findings = _keyed(current.findings)
    before_scores = {layer.name: layer.score for layer in baseline.layers}
    after_scores = {layer.name: layer.score for layer in current.layers}

    def grew(layer: Optional[str]) -> bool:
        if layer is None:
            return False
        old, new = before_scores.get(layer), after_scores.get(layer)
        if old is None or new is None:
            return old is not None and new is None  # finite before, non-finite now
        return new > old * (1.0 + worsen)

    new, worsened = [], []
    for key, finding in after_findings.items():
        old = before_findings.get(key)
        if old is None:
            new.append(finding)
        elif SEVERITY_ORDER[finding.severity] > SEVERITY_ORDER[old.severity] or grew(finding.layer):
            worsened.append(finding)
    resolved = [f for key, f in before_findings.items() if key not in after_findings]
    changes = []
    for name in dict.fromkeys([*after_scores, *before_scores]):
        old, new_score = before_scores.get(name), after_scores.get(name)
        delta = new_score - old if old is not None and new_score is not None else None
        changes.append(LayerChange(name, old, new_score, delta))
    changes.sort(key=lambda c: -(abs(c.delta) if c.delta is not None else float("inf")))
    return BaselineComparison(source, tuple(new), tuple(worsened), tuple(resolved), tuple(changes))


def apply_baseline(current: Report, baseline: Report, source: str) -> Report:
    """``current`` with the comparison attached and the verdict decided by new or worsened
    findings only (a ``no-batchnorm`` verdict stays when nothing fails)."""
    worsen = current.thresholds.get("baseline_worsen", 0.25)
    comparison = compare(baseline, current, source, worsen)
    compared = replace(current, baseline=comparison)
    return replace(compared, verdict=gate_verdict(compared, current.fail_on))
