"""GitHub-flavoured Markdown for PR comments and ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

from bncheck.reporting.render.summary import (
    MoreFindings,
    baseline_lines,
    data_line,
    grouped,
    input_line,
    next_step,
    num,
    output_line,
    share,
)
from bncheck.reporting.report import DiffReport, Finding, Report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_INLINE = str.maketrans({ch: "\\" + ch for ch in "\\[]"})


def _text(text: str) -> str:
    """Prose outside a code span (messages, hints, folded layer lists): names a file chose
    never become links or images (no unescaped ``[``/``]``) or bare autolinks (``http://``,
    ``www.``); HTML is already entities."""
    escaped = _cell(text.translate(_INLINE))
    return escaped.replace("://", ":\\/\\/").replace("www.", "www\\.")


def _finding_lines(findings: tuple[Finding, ...]) -> list[str]:
    """A bullet per finding, each (severity, code) group folded after its first two."""
    lines = []
    for f in grouped(findings):
        if isinstance(f, MoreFindings):
            lines.append(f"- **{f.severity}** {_text(f.text(limit=8))}")
            continue
        where = f" `{f.layer}`" if f.layer else ""
        lines.append(f"- **{f.severity}** `{f.code}`{where}: {_text(f.message)} *{_text(f.hint)}*")
    return lines


def render(report: Report, *, top: int = 10, **_options: object) -> str:
    icon = {"pass": "✅", "fail": "❌"}.get(report.verdict, "ℹ️")
    lines = [
        f"## {icon} bncheck: {report.verdict}",
        "",
        f"- **Model**: `{report.model.checkpoint or report.model.arch or 'in-memory'}` "
        f"({report.model.bn_layers} BN layers)",
        f"- **Data**: `{report.data.source or 'in-memory'}` ({data_line(report)})",
        *([f"- **Input**: {input_line(report)}"] if input_line(report) else []),
        f"- **Output**: {output_line(report)}",
        f"- **First divergent layer (eval pass)**: `{report.first_divergent_layer or 'none'}`",
        *([f"- **Conclusion**: {_text(report.conclusion)}"] if report.conclusion else []),
        "",
    ]
    if report.layers:
        lines += [
            "| rank | layer | type | ch | score | drift/noise | mean shift | scale ratio | eval score | fix "
            "| finding |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for layer in report.layers[:top]:
            finding = report.top_finding(layer)
            score = "NaN" if report.non_finite(layer) else num(layer.score)
            lines.append(
                f"| {layer.rank} | `{_cell(layer.name)}` | {_text(layer.type)} | {layer.channels} | {score} | "
                f"{num(layer.drift_to_noise, 1)} | {num(layer.mean_shift)} | {num(layer.scale_ratio)} | "
                f"{num(layer.eval_score)} | {share(layer.attribution)} | "
                f"{finding.code if finding else ''} |"
            )
        lines.append("")
    if report.findings:
        lines.append("### Findings")
        lines += _finding_lines(report.findings)
        lines.append("")
    comparison = baseline_lines(report)
    if comparison:
        lines += ["### Baseline", "", "```", *comparison, "```", ""]
    lines.append(f"**Next:** {_text(next_step(report))}")
    return "\n".join(lines) + "\n"


def render_diff(diff: DiffReport, *, top: int = 10, **_options: object) -> str:
    icon = {"pass": "✅", "fail": "❌"}.get(diff.verdict, "ℹ️")
    lines = [f"## {icon} bncheck diff: {diff.verdict}", "",
             f"- **A**: `{diff.a.checkpoint}`", f"- **B**: `{diff.b.checkpoint}`", "",
             "| layer | mean moved | var moved | affine | feeding weights |", "|---|---:|---:|---:|---:|"]
    for d in diff.layers[:top]:
        same = "same" if d.stats_identical else None
        lines.append(f"| `{_cell(d.name)}` | {same or num(d.mean_shift)} | {same or num(d.var_log_change)} | "
                     f"{'-' if d.affine_change is None else f'{100 * d.affine_change:.1f}%'} | "
                     f"{'-' if d.feeding_change is None else f'{100 * d.feeding_change:.1f}%'} |")
    lines.append("")
    if diff.findings:
        lines.append("### Findings")
        lines += _finding_lines(diff.findings)
        lines.append("")
    return "\n".join(lines) + "\n"
