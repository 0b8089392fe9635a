"""Plain-text phrases shared by renderers (no rich, no markup)."""

from __future__ import annotations

import math
from typing import Optional

from ..report import SEVERITY_ORDER, Report


def num(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def pct(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def share(value: Optional[float]) -> str:
    """An attribution share as a percentage, '-' when not measured."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f}%"


def baseline_lines(report: Report, limit: int = 5) -> list[str]:
    """Plain lines describing the comparison with a baseline run (empty without one)."""
    comparison = report.baseline
    if comparison is None:
        return []
    lines = [
        f"baseline {comparison.source}: {len(comparison.new)} new, {len(comparison.worsened)} worsened, "
        f"{len(comparison.resolved)} resolved findings"
    ]
    for label, items in (("new", comparison.new), ("worse", comparison.worsened), ("resolved", comparison.resolved)):
        for f in items[:limit]:
            lines.append(f"  {label:<8} {f.severity} {f.code}{' ' + f.layer if f.layer else ''}")
        if len(items) > limit:
            lines.append(f"  {label:<8} ... and {len(items) - limit} more")
    moved = [c for c in comparison.changes if c.delta is not None and abs(c.delta) >= 0.01][:limit]
    if moved:
        lines.append("  largest score changes: " + ", ".join(
            f"{c.name} {num(c.before)} -> {num(c.after)}" for c in moved))
    return lines


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else ("es" if word.endswith("ch") else "s"))


def data_line(report: Report) -> str:
    """``128 samples = 4 batches of 32``, with what fell short and what was skipped."""
    d = report.data
    uneven = d.batches > 1 and d.samples != d.batches * d.batch_size
    text = f"{plural(d.samples, 'sample')} = {plural(d.batches, 'batch')} of {'up to ' if uneven else ''}{d.batch_size}"
    if d.requested is not None and d.samples < d.requested:
        text += f"; the data held fewer than the {d.requested} asked for"
    if d.skipped:
        text += f", {plural(d.skipped, 'unreadable file')} skipped"
    return text


def input_line(report: Report) -> Optional[str]:
    """The shape fed to the model and the preprocessing that made it."""
    d = report.data
    if d.input_shape is None and d.preprocessing is None:
        return None
    shape = f"{list(d.input_shape)} per sample" if d.input_shape is not None else "shape unknown"
    return f"{shape}; {d.preprocessing}" if d.preprocessing else shape


def output_line(report: Report) -> str:
    out = report.output
    if out.kind == "classifier":
        text = f"top-1 agreement train vs eval {pct(out.top1_agreement)}, KL {num(out.kl, 3)} nats"
        if out.train_accuracy is not None:
            text += f"; accuracy train-mode {pct(out.train_accuracy)} vs eval-mode {pct(out.eval_accuracy)}"
        return text
    if report.data.samples == 0:
        return "not measured: no data (lint of the checkpoint only)"
    if out.kind == "tensor":
        return f"relative L2 between train- and eval-mode outputs {num(out.relative_l2, 3)}"
    return "output divergence not measured (outputs not comparable)"


def next_step(report: Report) -> str:
    """One line: what to do next."""
    if report.verdict == "no-batchnorm":
        return "No BatchNorm layers: train/eval statistics cannot drift in this model."
    if report.baseline is not None:
        regressions = (*report.baseline.new, *report.baseline.worsened)
        if not regressions:
            return f"No new or worsened findings against the baseline {report.baseline.source}."
        worst = max(regressions, key=lambda f: SEVERITY_ORDER[f.severity])
        where = f" ({worst.layer})" if worst.layer else ""
        return f"new or worse since the baseline: {worst.code}{where}: {worst.hint}"
    if report.data.samples == 0 and not any(f.severity == "error" for f in report.findings):
        return "No data given: only the checkpoint was checked; run with --data to measure drift."
    if report.findings:
        worst = report.findings[0]
        where = f" ({worst.layer})" if worst.layer else ""
        return f"{worst.code}{where}: {worst.hint}"
    return "Running statistics match this data; nothing to do."
