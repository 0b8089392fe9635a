"""The terminal report: a header with the verdict and output divergence, the ranked
table, the findings, and one line saying what to do next. The only rich importer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..report import LayerResult, Report
from .summary import baseline_lines, next_step, num, output_line, share

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
VERDICT_STYLE = {"pass": "bold green", "fail": "bold red", "no-batchnorm": "bold cyan"}


def _score_text(layer: LayerResult, report: Report) -> Text:
    finding = report.top_finding(layer)
    if layer.score is None:
        broken = report.non_finite(layer)
        return Text("NaN" if broken else "-", style="bold red" if broken else "dim")
    style = SEVERITY_STYLE.get(finding.severity, "") if finding and finding.severity != "info" else ""
    return Text(num(layer.score), style=style)


def build(report: Report, top: int) -> list:
    """Rich renderables, in order."""
    verdict = Text.assemble(
        ("bncheck ", "bold"), (report.verdict.upper(), VERDICT_STYLE.get(report.verdict, "bold"))
    )
    model = report.model
    header = [
        verdict,
        Text(f"model  {model.checkpoint or model.arch or 'in-memory'}"
             f"{f'  [{model.arch}]' if model.checkpoint and model.arch else ''}"
             f"  ({model.format}, {model.bn_layers} BN layers)"),
        Text(f"data   {report.data.source}  ({report.data.samples} samples = "
             f"{report.data.batches} batches of {report.data.batch_size}"
             f"{f', {report.data.skipped} unreadable files skipped' if report.data.skipped else ''})"
             if report.data.source else "data   none: only the checkpoint was checked (no --data)"),
        Text(f"output {output_line(report)}"),
        Text(f"first divergent layer (eval pass): {report.first_divergent_layer or 'none'}"),
    ]
    parts: list = [*header, Text("")]
    if report.layers:
        table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("#", justify="right")
        table.add_column("layer", overflow="fold")
        table.add_column("type")
        table.add_column("ch", justify="right")
        table.add_column("score", justify="right")
        table.add_column("×noise", justify="right")
        table.add_column("shift", justify="right")
        table.add_column("scale", justify="right")
        table.add_column("eval", justify="right")
        table.add_column("fix", justify="right")
        table.add_column("finding", no_wrap=True)
        for layer in report.layers[:top]:
            finding = report.top_finding(layer)
            table.add_row(
                str(layer.rank),
                layer.name or "(root)",
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
    for finding in report.findings:
        where = f" {finding.layer}" if finding.layer else ""
        parts.append(
            Text.assemble(
                (f"{finding.severity:<7} ", SEVERITY_STYLE[finding.severity]),
                (finding.code, "bold"),
                (where + ": " + finding.message, ""),
            )
        )
    if report.findings:
        parts.append(Text(""))
    for line in baseline_lines(report):
        parts.append(Text(line))
    if report.baseline is not None:
        parts.append(Text(""))
    parts.append(Text.assemble(("next: ", "bold"), next_step(report)))
    return parts


def render(report: Report, *, top: int = 10, width: Optional[int] = None, color: bool = False,
           **_options: object) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width or 120,
        force_terminal=color,
        no_color=not color,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )
    for part in build(report, top):
        console.print(part)
    return buffer.getvalue()


@contextmanager
def progress_bar(total: Optional[int], *, enabled: bool) -> Iterator[Callable[[str, int, Optional[int]], None]]:
    """A progress bar on stderr for the batches, then the attribution passes; a no-op
    callback when disabled (stderr not a terminal, or --quiet)."""
    if not enabled:
        yield lambda _stage, _done, _total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("batches", total=total)

        def update(stage: str, done: int, stage_total: Optional[int]) -> None:
            progress.update(task, description=stage, completed=done,
                            total=stage_total if stage_total is not None else total)

        yield update
