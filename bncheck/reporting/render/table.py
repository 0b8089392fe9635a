"""The terminal report: a header with the verdict and output divergence, the ranked
table, the findings, and one line saying what to do next. The only rich importer."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bncheck.reporting.render.summary import (
    MoreFindings,
    baseline_lines,
    data_line,
    fix_next_step,
    grouped,
    held_out_line,
    input_line,
    next_step,
    num,
    output_line,
    share,
)
from bncheck.reporting.report import DiffReport, Finding, FixReport, LayerResult, Report

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
VERDICT_STYLE = {"pass": "bold green", "fail": "bold red", "no-batchnorm": "bold cyan"}


def _score_text(layer: LayerResult, report: Report) -> Text:
    finding = report.top_finding(layer)
    if layer.score is None:
        broken = report.non_finite(layer)
        return Text("NaN" if broken else "-", style="bold red" if broken else "dim")
    style = SEVERITY_STYLE.get(finding.severity, "") if finding and finding.severity != "info" else ""
    return Text(num(layer.score), style=style)


def _finding_lines(findings: tuple[Finding, ...]) -> list[Text]:
    """One line per finding, each (severity, code) group folded after its first two."""
    lines = []
    for finding in grouped(findings):
        label = (f"{finding.severity:<7} ", SEVERITY_STYLE[finding.severity])
        if isinstance(finding, MoreFindings):
            lines.append(Text.assemble(label, (finding.text(), "dim")))
            continue
        where = f" {finding.layer}" if finding.layer else ""
        lines.append(Text.assemble(label, (finding.code, "bold"), where + ": " + finding.message))
    return lines


def wrap_name(name: str, width: int) -> str:
    """A layer name in lines of at most ``width``, broken after a dot where it can be
    (``backbone.layer4.`` / ``2.bn3``), else after an underscore, inside a word only when the
    word alone is wider than the column."""
    if len(name) <= width:
        return name
    lines, line = [], ""
    for segment in re.findall(r"[^.]*\.|[^.]+$", name):
        words = re.findall(r"[^_]*_|[^_]+$", segment) if len(segment) > width else [segment]
        for word in words:
            if line and len(line) + len(word) > width:
                lines.append(line)
                line = ""
            while len(line) + len(word) > width:  # a word wider than the column: cut it
                room = width - len(line)
                lines.append(line + word[:room])
                line, word = "", word[room:]
            line += word
    return "\n".join([*lines, line] if line else lines)


TABLE_FIXED = ("#", "type", "ch", "score", "×noise", "shift", "scale", "eval", "fix", "finding")
NAME_MIN = 10
"""The layer column never gets narrower than this (the other columns give way first)."""


def _name_width(rows: list[list[str]], width: int) -> int:
    """Room left for the layer column at a console ``width``: the other columns as wide as
    their widest cell, three characters between columns."""
    others = sum(max(len(head), *(len(row[i]) for row in rows)) for i, head in enumerate(TABLE_FIXED))
    return max(NAME_MIN, width - others - 3 * len(TABLE_FIXED))


def build(report: Report, top: int, width: int = 120) -> list:
    """Rich renderables, in order (``width``: the console's, to fit layer names to)."""
    verdict = Text.assemble(
        ("bncheck ", "bold"), (report.verdict.upper(), VERDICT_STYLE.get(report.verdict, "bold"))
    )
    model = report.model
    picked = (f"; weights {model.weights_key!r} of {1 + len(model.other_weights)} models"
              if model.other_weights else "")
    header = [
        verdict,
        Text(f"model  {model.checkpoint or model.arch or 'in-memory'}"
             f"{f'  [{model.arch}]' if model.checkpoint and model.arch else ''}"
             f"  ({model.format}, {model.bn_layers} BN layers"
             f"{picked})"),
        Text(f"data   {report.data.source or 'in-memory'}  ({data_line(report)})"
             if report.data.samples else "data   none: only the checkpoint was checked (no --data)"),
        *([Text(f"input  {input_line(report)}")] if input_line(report) else []),
        Text(f"output {output_line(report)}"),
        Text(f"first divergent layer (eval pass): {report.first_divergent_layer or 'none'}"),
        *([Text.assemble(("conclusion ", "bold"), report.conclusion)] if report.conclusion else []),
    ]
    parts: list = [*header, Text("")]
    if report.layers:
        table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
        shown = report.layers[:top]
        cells = [[str(la.rank), la.type, str(la.channels), _score_text(la, report).plain, num(la.drift_to_noise, 1),
                  num(la.mean_shift), num(la.scale_ratio), num(la.eval_score), share(la.attribution),
                  (report.top_finding(la).code if report.top_finding(la) else "")] for la in shown]
        room = _name_width(cells, width)
        table.add_column("#", justify="right")
        table.add_column("layer", overflow="fold", min_width=min(room, max(len(la.name or "(root)") for la in shown)))
        table.add_column("type")
        table.add_column("ch", justify="right")
        table.add_column("score", justify="right")
        table.add_column("×noise", justify="right")
        table.add_column("shift", justify="right")
        table.add_column("scale", justify="right")
        table.add_column("eval", justify="right")
        table.add_column("fix", justify="right")
        table.add_column("finding", no_wrap=True)
        for layer in shown:
            finding = report.top_finding(layer)
            table.add_row(
                str(layer.rank),
                wrap_name(layer.name or "(root)", room),
                layer.type,
                str(layer.channels),
                _score_text(layer, report),
                num(layer.drift_to_noise, 1),
                num(layer.mean_shift),
                num(layer.scale_ratio),
                num(layer.eval_score),
                share(layer.attribution),
                Text(finding.code, style=SEVERITY_STYLE[finding.severity]) if finding else Text(""),
            )
        parts.append(table)
        hidden = len(report.layers) - top
        if hidden > 0:
            parts.append(Text(f"... {hidden} more layers (--top N, or bncheck report --json)", style="dim"))
        parts.append(Text(""))
    parts += _finding_lines(report.findings)
    if report.findings:
        parts.append(Text(""))
    for line in baseline_lines(report):
        parts.append(Text(line))
    if report.baseline is not None:
        parts.append(Text(""))
    parts.append(Text.assemble(("next: ", "bold"), next_step(report)))
    return parts


def _to_text(parts: list, width: Optional[int], color: bool) -> str:
    """Print rich renderables into a string: plain text unless ``color`` (a terminal)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width or 120, force_terminal=color, no_color=not color,
                      highlight=False, emoji=False, soft_wrap=False)
    for part in parts:
        console.print(part)
    return buffer.getvalue()


def render(report: Report, *, top: int = 10, width: Optional[int] = None, color: bool = False,
           **_options: object) -> str:
    return _to_text(build(report, top, width or 120), width, color)


@contextmanager
def progress_bar(
    total: Optional[int], *, enabled: bool, batch_size: Optional[int] = None
) -> Iterator[Callable[[str, int, Optional[int]], None]]:
    """A progress bar on stderr for the batches, then the attribution passes, with samples/s
    and the time left; a no-op callback when disabled (stderr not a terminal, or --quiet)."""
    if not enabled:
        yield lambda _stage, _done, _total: None
        return
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("batches", total=total, rate="")
        started = {"stage": "batches", "at": time.perf_counter()}

        def update(stage: str, done: int, stage_total: Optional[int]) -> None:
            now = time.perf_counter()
            if stage != started["stage"]:
                started.update(stage=stage, at=now)
            elapsed = now - started["at"]
            rate = ""
            if stage == "batches" and batch_size and done and elapsed > 0:
                rate = f"{done * batch_size / elapsed:,.0f} samples/s"
            progress.update(task, description=stage, completed=done,
                            total=stage_total if stage_total is not None else total, rate=rate)

        yield update


OUTCOME_STYLE = {"written": "bold green", "dry-run": "bold cyan", "refused": "bold red"}


def _arrow(before: Optional[float], after: Optional[float]) -> str:
    return f"{num(before)} -> {num(after)}"


def build_fix(fix: FixReport, top: int = 15) -> list:
    before, after = fix.before, fix.after
    parts: list = []
    where = f" {fix.out}" if fix.out and fix.outcome != "refused" else ""
    parts.append(Text.assemble(("bncheck fix ", "bold"), (fix.outcome.upper(), OUTCOME_STYLE[fix.outcome]), where))
    parts.append(Text(f"model  {before.model.checkpoint or 'in-memory'}  ({before.model.format}, "
                      f"{before.model.bn_layers} BN layers)"))
    recalibrated = sum(1 for layer in fix.layers if layer.recalibrated)
    parts.append(Text(f"stats  {recalibrated} layers recalibrated on {fix.samples} samples "
                      f"({fix.batches} batches; exact population statistics)"))
    parts.append(Text(f"before {output_line(before)}"))
    if after is not None:
        parts.append(Text(f"after  {output_line(after)}"))
    if fix.held_out is not None:
        parts.append(Text(f"held   {held_out_line(fix)}"))
    parts.append(Text(""))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name, justify in (("layer", "left"), ("score before -> after", "right"), ("finding before -> after", "left"),
                          ("std err", "right")):
        table.add_column(name, justify=justify)
    for layer in fix.layers[:top]:
        findings = f"{layer.finding_before or '-'} -> {layer.finding_after or '-'}"
        table.add_row(layer.name, _arrow(layer.score_before, layer.score_after), findings,
                      num(layer.standard_error, 3) if layer.recalibrated else "kept")
    parts.append(table)
    if len(fix.layers) > top:
        parts.append(Text(f"... {len(fix.layers) - top} more layers (--json for all)", style="dim"))
    for skipped in fix.skipped[:5]:
        parts.append(Text(f"kept    {skipped.name}: {skipped.reason}", style="dim"))
    if len(fix.skipped) > 5:
        parts.append(Text(f"kept    ... and {len(fix.skipped) - 5} more layers", style="dim"))
    for reason in fix.reasons:
        style = "bold red" if fix.outcome == "refused" else "yellow"
        parts.append(Text.assemble(("refused " if fix.outcome == "refused" else "forced  ", style), reason))
    for warning in fix.warnings:
        parts.append(Text.assemble(("warning ", "yellow"), warning))
    for finding in fix.remaining[:5]:
        at = f" {finding.layer}" if finding.layer else ""
        parts.append(Text.assemble((f"remains {finding.severity} ", SEVERITY_STYLE[finding.severity]),
                                   (finding.code, "bold"), f"{at}: {finding.message}"))
    parts.append(Text(""))
    parts.append(Text.assemble(("next: ", "bold"), fix_next_step(fix)))
    return parts




def render_fix(fix: FixReport, *, top: int = 15, width: Optional[int] = None, color: bool = False) -> str:
    return _to_text(build_fix(fix, top), width, color)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def build_diff(diff: DiffReport, top: int = 10) -> list:
    parts: list = [Text.assemble(("bncheck diff ", "bold"), (diff.verdict.upper(), VERDICT_STYLE[diff.verdict]))]
    parts.append(Text(f"A      {diff.a.checkpoint}  ({diff.a.format})"))
    parts.append(Text(f"B      {diff.b.checkpoint}  ({diff.b.format})"))
    identical = sum(1 for d in diff.layers if d.stats_identical)
    parts.append(Text(f"layers {len(diff.layers)} BN layers in both; running stats identical in {identical}"
                      + (f"; only in A: {len(diff.only_in_a)}" if diff.only_in_a else "")
                      + (f"; only in B: {len(diff.only_in_b)}" if diff.only_in_b else "")))
    parts.append(Text(""))
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name, justify in (("layer", "left"), ("mean moved", "right"), ("var moved", "right"), ("affine", "right"),
                          ("feeding weights", "right"), ("finding", "left")):
        table.add_column(name, justify=justify)
    codes = {f.layer: f.code for f in diff.findings}
    for d in diff.layers[:top]:
        table.add_row(d.name, "same" if d.stats_identical else num(d.mean_shift),
                      "same" if d.stats_identical else num(d.var_log_change), _pct(d.affine_change),
                      _pct(d.feeding_change), codes.get(d.name, ""))
    parts.append(table)
    if len(diff.layers) > top:
        parts.append(Text(f"... {len(diff.layers) - top} more layers (--top N, or --json)", style="dim"))
    parts.append(Text(""))
    parts += _finding_lines(diff.findings)
    if diff.findings:
        parts.append(Text(""))
        parts.append(Text.assemble(("next: ", "bold"), diff.findings[0].hint))
    else:
        parts.append(Text.assemble(("next: ", "bold"), "Statistics and weights moved together (or not at all): "
                                   "nothing inconsistent between the two checkpoints."))
    return parts


def render_diff(diff: DiffReport, *, top: int = 10, width: Optional[int] = None, color: bool = False) -> str:
    return _to_text(build_diff(diff, top), width, color)
