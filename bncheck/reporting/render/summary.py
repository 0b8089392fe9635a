"""Plain-text phrases shared by renderers (no rich, no markup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from bncheck.judging.findings import SAMPLE
from bncheck.judging.labels import labels_elsewhere
from bncheck.reporting.numbers import num, pct
from bncheck.reporting.report import SEVERITY_ORDER, Finding, FixReport, Report


def share(value: Optional[float]) -> str:
    """An attribution share as a percentage, '-' when not measured."""
    return pct(value, 0)


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


@dataclass(frozen=True)
class MoreFindings:
    """The rest of a group of findings with one code and severity, as one line."""

    severity: str
    code: str
    layers: tuple[str, ...]

    def text(self, limit: int = 4) -> str:
        names = ", ".join(self.layers[:limit]) + (", ..." if len(self.layers) > limit else "")
        return f"... and {plural(len(self.layers), 'more layer')} with {self.code}: {names}"


def grouped(findings: tuple[Finding, ...], shown: int = 2) -> list[Union[Finding, MoreFindings]]:
    """Findings in their order, but each (severity, code) group shows its first ``shown``
    and then one line for the rest: 56 unmeasurable layers read as a conclusion, not a wall."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.severity, finding.code), []).append(finding)
    out: list[Union[Finding, MoreFindings]] = []
    for finding in findings:
        group = groups[(finding.severity, finding.code)]
        index = next(i for i, f in enumerate(group) if f is finding)
        if index < shown or len(group) <= shown + 1:
            out.append(finding)
        elif index == shown:
            rest = tuple(f.layer or "(model)" for f in group[shown:])
            out.append(MoreFindings(finding.severity, finding.code, rest))
    return out


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
    text = _output_text(report)
    source = report.output.source
    return f"{text} [compared: {source}]" if source and report.output.kind != "none" else text


def _output_text(report: Report) -> str:
    out = report.output
    if out.kind == "classifier" and out.per == "pixel":
        text = f"pixel agreement train vs eval {pct(out.top1_agreement)}, per-pixel KL {num(out.kl, 3)} nats"
        if out.binary:
            text += " (binary masks: one sigmoid score per pixel)"
        if out.eval_miou is not None:
            return (f"{text}; mIoU train-mode {pct(out.train_miou)} vs eval-mode {pct(out.eval_miou)} (pixel accuracy "
                    f"{pct(out.train_accuracy)} vs {pct(out.eval_accuracy)}, {out.labeled} images with masks)")
        return f"{text} ({out.classes} classes per pixel; no masks given, so no mIoU)"
    if out.kind == "classifier":
        text = f"top-1 agreement train vs eval {pct(out.top1_agreement)}, KL {num(out.kl, 3)} nats"
        if out.train_accuracy is not None:
            text += f"; accuracy train-mode {pct(out.train_accuracy)} vs eval-mode {pct(out.eval_accuracy)}"
        return text
    if out.kind == "detection":
        text = (f"box agreement train vs eval {pct(out.box_agreement)} ({out.boxes_matched} boxes found in both, "
                f"{out.boxes_train} in train mode, {out.boxes_eval} in eval mode, score >= 0.5; mean score shift "
                f"{num(out.score_shift, 3)})")
        if out.eval_map50 is not None:
            text += (f"; mAP@0.5 train-mode {pct(out.train_map50)} vs eval-mode {pct(out.eval_map50)} "
                     f"(mAP@[.5:.95] {pct(out.train_map)} vs {pct(out.eval_map)})")
        if out.eval_accuracy is not None:
            text += (f"; recall of {out.objects} target boxes {pct(out.train_accuracy)} vs {pct(out.eval_accuracy)} "
                     f"on {out.labeled} images")
            elsewhere = labels_elsewhere(out)
            if elsewhere is not None:
                text += (f" -- but train mode's boxes sit on {pct(elsewhere)} of the target boxes under other labels: "
                         "the targets are not numbered as the model's classes, so recall and mAP say nothing here; "
                         "renumber them (a COCO file: --box-labels index for 0-based classes, index+1 with 0 the "
                         "background)")
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
    first = next((f for f in report.findings if f.code in SAMPLE and f.severity != "info"), None)
    if first is not None:  # the sample is off: that comes before any layer's advice
        return f"{first.code}: {first.hint}"
    if report.conclusion is not None:
        return report.conclusion
    if report.findings:
        share = {layer.name: layer.attribution for layer in report.layers}
        helpful = [f for f in report.findings if not (share.get(f.layer) is not None and share[f.layer] < 0)]
        if not helpful or helpful[0].severity != report.findings[0].severity:
            return ("fixing any single flagged layer alone widens the output gap (the layers after it were tuned "
                    "to its statistics): recalibrate all BN layers together with bncheck fix, which verifies the "
                    "result before writing it.")
        worst = helpful[0]
        where = f" ({worst.layer})" if worst.layer else ""
        return f"{worst.code}{where}: {worst.hint}"
    return "Running statistics match this data; nothing to do."


def fix_next_step(fix: FixReport) -> str:
    """The one next step after `bncheck fix`."""
    if fix.outcome == "refused":
        return "Nothing was written. Address the reason above (or pass --force if you are sure)."
    if fix.outcome == "dry-run":
        return "Nothing was written (--dry-run); rerun with --out NEW to write the recalibrated checkpoint."
    if fix.remaining:
        return f"Written, but findings remain: bncheck run {fix.out} ... to see them."
    if fix.held_out is not None:
        h = fix.held_out
        return (f"Written; on {h.samples} held-out samples eval-mode {h.metric} went {pct(h.before)} -> "
                f"{pct(h.after)}. Check it on your own validation set before deploying.")
    return f"Written; check held-out accuracy of {fix.out} before deploying."


def held_out_line(fix: FixReport) -> str:
    """``eval-mode mIoU 21.4% -> 80.3% on 16 samples the statistics did not see (fitted on 48)``."""
    h = fix.held_out
    if h is None:
        return ""
    return (f"eval-mode {h.metric} {pct(h.before)} -> {pct(h.after)} on {h.samples} samples the statistics did not "
            f"see (fitted on {h.fitted})")
