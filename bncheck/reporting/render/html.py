"""One self-contained HTML page (no scripts, no CDN): verdict banner, the score of every
layer through network depth as an inline SVG plot (threshold lines, first divergent layer
marked), the ranked table, each finding with its hint, and the run's metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape as _html_escape
from typing import Any, Optional, Union

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
from bncheck.reporting.report import Finding, FixReport, LayerResult, Report

COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "no-batchnorm": "#0969da"}
SEVERITY_COLORS = {"error": "#cf222e", "warning": "#9a6700", "info": "#0969da"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1100px;margin:0 auto;padding:0 24px 48px}
.banner{color:#fff;padding:18px 24px;font-size:22px;font-weight:600}
.banner small{font-weight:400;font-size:14px;opacity:.9;display:block;margin-top:4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:12px 0}
dt{color:#59636e}dd{margin:0;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d8dee4;padding:4px 8px;text-align:right}
th{background:#f6f8fa;position:sticky;top:0}
td.name,th.name,td.code,th.code{text-align:left}
td.name{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.finding{border-left:4px solid;padding:6px 12px;margin:8px 0;background:#f6f8fa}
.finding .hint{color:#59636e;margin-top:4px}
.next{font-size:15px;background:#fff8c5;padding:10px 14px;border-radius:6px}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#59636e}
.legend span{display:inline-block;margin-right:16px;font-size:13px}
details.more summary{cursor:pointer;margin:10px 0;color:#0969da}
.change{font-variant-numeric:tabular-nums}.better{color:#1a7f37}.worse{color:#cf222e}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.pictures{border-collapse:separate;border-spacing:6px 4px;width:auto}
.pictures td,.pictures th{border:0;text-align:center;padding:0;font-size:12px;font-weight:400;background:none}
.pictures img{image-rendering:pixelated;display:block;border:1px solid #d0d7de;width:160px;height:auto}
.pictures td.caption{text-align:left;color:#59636e;vertical-align:middle;padding-right:8px}
"""


def escape(text: Any, quote: bool = True) -> str:
    """HTML-escaped, with control and format characters (bidi overrides that reorder what a
    name shows, zero-width characters) written as visible escapes first; newlines and tabs stay
    (tooltips use them, and HTML shows them as spaces)."""
    from bncheck.reporting.render.escape import control

    text = str(text)
    return _html_escape("\n".join(control(line) for line in text.split("\n")), quote=quote)


def _log(value: float, low: float) -> float:
    return math.log10(max(value, low))


@dataclass(frozen=True)
class Series:
    """One line of the depth plot: a value per layer (None: no point) and each point's tooltip."""

    color: str
    values: list[Optional[float]]
    tooltips: list[str]


def depth_plot(report: Report, width: int = 1040, height: int = 320) -> str:
    """Inline SVG: train-pass score (root cause) and eval-pass score (deployment) per layer
    in execution order, on a log scale, with the error/warning thresholds and the first
    divergent layer."""
    layers = sorted((la for la in report.layers if la.depth is not None), key=lambda la: la.depth or 0)
    series = [Series(color, [getattr(la, attr) for la in layers], [tooltip(la, report, attr) for la in layers])
              for attr, color in (("eval_score", "#0969da"), ("score", "#cf222e"))]
    marked = [report.non_finite(la) for la in layers]
    return _plot([la.name for la in layers], series, report.thresholds, report.first_divergent_layer, marked,
                 width, height)


def _plot(
    names: list[str], series: list[Series], t: dict[str, float], first_divergent: Optional[str],
    non_finite: list[bool], width: int = 1040, height: int = 320,
) -> str:
    if not names:
        return "<p>No BN layer was reached by the data, so there is nothing to plot.</p>"
    values = [v for line in series for v in line.values if v is not None and v > 0]
    values += [t.get("stale_error", 0.5), t.get("stale_warning", 0.25)]
    low = 10 ** math.floor(math.log10(max(min(values), 1e-3)))
    high = 10 ** math.ceil(math.log10(max(values)))
    if high <= low:
        high = low * 10
    left, right, top, bottom = 56, 16, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    count = len(names)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / count)

    def y(v: float) -> float:
        span = _log(high, low) - _log(low, low)
        return top + plot_h * (1 - (_log(v, low) - _log(low, low)) / span)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'role="img" aria-label="layer score through depth">']
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#d0d7de"/>')
    exponent = round(math.log10(low))
    while 10**exponent <= high * 1.0001:
        v = 10.0**exponent
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        exponent += 1
    for key, color, label in (("stale_error", "#cf222e", "error"), ("stale_warning", "#bf8700", "warning")):
        if key in t:
            yy = y(t[key])
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{color}" '
                         f'stroke-dasharray="6 4"/>')
            parts.append(f'<text x="{left + plot_w - 4}" y="{yy - 4:.1f}" text-anchor="end" '
                         f'style="fill:{color}">{label} threshold {t[key]:g}</text>')
    if first_divergent and first_divergent in names:
        index = names.index(first_divergent)
        xx = x(index)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#8250df" '
                     f'stroke-width="2"/>')
        anchor = "start" if index < count / 2 else "end"
        dx = 4 if anchor == "start" else -4
        parts.append(f'<text x="{xx + dx:.1f}" y="{top + 12}" text-anchor="{anchor}" style="fill:#8250df">'
                     f'first divergent: {escape(first_divergent)}</text>')
    radius = 3 if count <= 80 else 2
    for line in series:
        points = [(i, x(i), y(v)) for i, v in enumerate(line.values) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for _, px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{line.color}" stroke-width="1.5" '
                         f'stroke-opacity="0.8"/>')
        for i, px, py in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{radius}" fill="{line.color}">'
                         f'<title>{escape(line.tooltips[i])}</title></circle>')
    for i, bad in enumerate(non_finite):
        if bad:
            parts.append(f'<text x="{x(i):.1f}" y="{top + 24}" text-anchor="middle" '
                         f'style="fill:#cf222e;font-weight:700">NaN<title>{escape(names[i])}</title></text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">'
                 f'BN layers in execution order (first {escape(names[0])} … last {escape(names[-1])})'
                 f'</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'score (log scale)</text>')
    parts.append("</svg>")
    return "".join(parts)


def tooltip(layer: LayerResult, report: Report, attr: str = "score") -> str:
    """What a point of the depth plot says on hover: the layer and all its numbers."""
    finding = report.top_finding(layer)
    lines = [
        f"{layer.name or '(root)'} ({layer.type}, {layer.channels} ch, #{layer.rank} of {len(report.layers)})",
        f"{'train-pass' if attr == 'score' else 'eval-pass'} score {num(getattr(layer, attr), 3)}",
        f"score {num(layer.score)}, x noise {num(layer.drift_to_noise, 1)}, mean shift {num(layer.mean_shift)}, "
        f"scale ratio {num(layer.scale_ratio)}, eval score {num(layer.eval_score)}",
    ]
    if layer.attribution is not None:
        lines.append(f"fixing it alone recovers {share(layer.attribution)} of the output gap")
    if finding is not None:
        lines.append(f"{finding.severity}: {finding.code}")
    return "\n".join(lines)


def _layer_table(rows: list[LayerResult], report: Report) -> str:
    return (
        '<table><thead><tr><th>#</th><th class="name">layer</th><th>type</th><th>ch</th><th>score</th>'
        '<th>×noise</th><th>mean shift</th><th>scale ratio</th><th>eval score</th><th>fix</th>'
        '<th class="code">finding</th></tr></thead><tbody>'
        + "".join(_row(layer, report) for layer in rows)
        + "</tbody></table>"
    )


def _row(layer: LayerResult, report: Report) -> str:
    finding = report.top_finding(layer)
    code = ""
    if finding:
        code = f'<span style="color:{SEVERITY_COLORS[finding.severity]}">{escape(finding.code)}</span>'
    score = '<b style="color:#cf222e">NaN</b>' if report.non_finite(layer) else num(layer.score)
    cells = [
        str(layer.rank), f'<td class="name">{escape(layer.name or "(root)")}</td>', escape(layer.type),
        str(layer.channels), score, num(layer.drift_to_noise, 1), num(layer.mean_shift), num(layer.scale_ratio),
        num(layer.eval_score), share(layer.attribution), f'<td class="code">{code}</td>',
    ]
    return "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>"


def _meta(report: Report) -> str:
    m, d = report.model, report.data
    rows: list[tuple[str, Optional[str]]] = [
        ("checkpoint", m.checkpoint), ("architecture", m.arch), ("format", m.format),
        ("sha256", m.sha256), ("BN layers", str(m.bn_layers)), ("momentum from", m.momentum_from),
        ("data", d.source), ("samples", data_line(report)), ("input", input_line(report)),
        ("skipped files", str(d.skipped) if d.skipped else None),
        ("fail on", report.fail_on), ("device", report.device),
        ("bncheck / torch", f"{report.bncheck_version} / {report.torch_version}"),
        ("duration", f"{report.duration_s:.1f} s" if report.duration_s is not None else None),
        ("thresholds", ", ".join(f"{k} {v:g}" for k, v in report.thresholds.items())),
        ("IoU per class (eval / train)", _class_iou(report)),
    ]
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows if v) + "</dl>"


def _class_iou(report: Report) -> Optional[str]:
    """``0: 98% / 99%, 1: 12% / 97%, ...`` for a segmentation run with masks."""
    out = report.output
    if not out.eval_class_iou or not out.train_class_iou:
        return None

    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    return ", ".join(f"{c}: {pct(e)} / {pct(t)}" for c, (e, t) in enumerate(zip(out.eval_class_iou,
                                                                                 out.train_class_iou)))


def _pictures(report: Report) -> str:
    """The samples where the modes disagree most: input, eval mode, train mode, truth, in one
    fixed palette, with a legend of the classes shown."""
    from bncheck.reporting.png import box_color, data_uri, palette_hex

    if not report.pictures:
        return ""
    truth = any(p.truth for p in report.pictures)
    heads = ["", "input", "eval mode (deployment)", "train mode (batch statistics)"] + (["truth"] if truth else [])
    rows = []
    unit = "box" if report.output.kind == "detection" else "pixel"
    for p in report.pictures:
        cells = [f'<td class="caption">sample {p.sample}<br>{unit} agreement<br>{100 * p.agreement:.1f}%</td>']
        panels = [("input", p.image), ("eval mode", p.eval), ("train mode", p.train)] + (
            [("truth", p.truth)] if truth else [])
        for label, png in panels:
            cells.append(f'<td><img alt="{escape(label)}, sample {p.sample}" src="{data_uri(png)}"></td>' if png
                         else "<td>-</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = sorted({c for p in report.pictures for c in p.classes})
    legend = "".join(f'<span><i class="swatch" style="background:{palette_hex(box_color(c) if unit == "box" else c)}">'
                     f'</i>class {c}</span>' for c in shown[:40])
    return ('<h2>Where the modes disagree most</h2><table class="pictures"><tr>'
            + "".join(f"<th>{escape(h)}</th>" for h in heads) + "</tr>" + "".join(rows)
            + f'</table><div class="legend">{legend}</div>')


def _passes(report: Report) -> str:
    """Each pass that ran the model or was skipped (what ``--profile`` prints), folded: what a
    skipped pass would have said is not measured, and the page says so."""
    if not report.passes:
        return ""
    rows = "".join(
        f'<tr><td class="code" style="white-space:nowrap">{escape(p.name)}</td>'
        f'<td>{f"{p.seconds:.2f} s" if p.ran else "skipped"}</td><td>{p.forwards if p.ran else "-"}</td>'
        f'<td class="code">{escape(p.bought)}</td></tr>' for p in report.passes)
    ran = sum(p.seconds for p in report.passes if p.ran)
    return (f'<details class="more"><summary>Passes: {ran:.1f} s in passes that ran the model; what each measured, '
            f'or why it did not run</summary><table><tr><th class="code">pass</th><th>time</th><th>forwards</th>'
            f'<th class="code">what it bought</th></tr>{rows}</table></details>')


def _finding_html(f: Union[Finding, MoreFindings]) -> str:
    color = SEVERITY_COLORS[f.severity]
    if isinstance(f, MoreFindings):  # the rest of a group, folded
        names = ", ".join(escape(name) for name in f.layers)
        return (f'<details class="finding" style="border-color:{color}"><summary><b style="color:{color}">'
                f'{escape(f.severity)}</b> ... and {len(f.layers)} more layers with <code>{escape(f.code)}</code>'
                f'</summary>{names}</details>')
    return (f'<div class="finding" style="border-color:{color}">'
            f'<b style="color:{color}">{escape(f.severity)}</b> <code>{escape(f.code)}</code>'
            f'{" <code>" + escape(f.layer) + "</code>" if f.layer else ""}: {escape(f.message)}'
            f'<div class="hint">{escape(f.hint)}</div></div>')


def render(report: Report, *, top: int = 10, **_options: object) -> str:
    color = COLORS.get(report.verdict, "#59636e")
    title = f"bncheck: {report.verdict.upper()}"
    subject = report.model.checkpoint or report.model.arch or "in-memory model"
    findings = "".join(_finding_html(f) for f in grouped(report.findings)) or "<p>No findings.</p>"
    if report.conclusion:
        findings = f'<p class="conclusion"><b>Conclusion:</b> {escape(report.conclusion)}</p>' + findings
    shown, rest = list(report.layers[:top]), list(report.layers[top:])
    table = _layer_table(shown, report)
    if rest:  # every layer is on the page; the tail folded
        table += (f'<details class="more"><summary>{len(rest)} more layers (ranks {len(shown) + 1}–'
                  f'{len(report.layers)})</summary>{_layer_table(rest, report)}</details>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} — {escape(subject)}</title><style>{CSS}</style></head>
<body><div class="banner" style="background:{color}">{escape(title)}
<small>{escape(subject)} · {escape(output_line(report))}</small></div>
<main>
<p class="next"><b>Next:</b> {escape(next_step(report))}</p>
{_pictures(report)}
<h2>Score through depth</h2>
<div class="legend"><span><i class="swatch" style="background:#cf222e"></i>train-mode pass (root cause)</span>
<span><i class="swatch" style="background:#0969da"></i>eval-mode pass (deployment impact)</span>
<span><i class="swatch" style="background:#8250df"></i>first divergent layer</span></div>
{depth_plot(report)}
<h2>Findings</h2>{findings}
{"<h2>Baseline</h2><pre>" + escape(chr(10).join(baseline_lines(report))) + "</pre>" if report.baseline else ""}
<h2>Layers, most divergent first</h2>{table}
<h2>Run</h2>{_meta(report)}
{_passes(report)}
</main></body></html>
"""


FIX_COLORS = {"written": "#1a7f37", "dry-run": "#0969da", "refused": "#cf222e"}


def _change(before: Optional[float], after: Optional[float]) -> str:
    if before is None and after is None:
        return "-"
    css = ""
    if before is not None and after is not None:
        css = "better" if after < before else "worse" if after > before else ""
    return f'<span class="change {css}">{num(before)} → {num(after)}</span>'


def render_fix(fix: FixReport, *, top: int = 10, **_options: object) -> str:
    """``bncheck fix`` as a page: outcome, outputs before → after, the score of every layer
    before and after through depth, and each layer's change."""
    before, after = fix.before, fix.after
    color = FIX_COLORS.get(fix.outcome, "#59636e")
    title = f"bncheck fix: {fix.outcome.upper()}"
    subject = before.model.checkpoint or "in-memory model"
    target = f" → {fix.out}" if fix.out and fix.outcome != "refused" else ""
    by_name = {layer.name: layer for layer in fix.layers}
    ordered = sorted((la for la in before.layers if la.depth is not None and la.name in by_name),
                     key=lambda la: la.depth or 0)
    names = [la.name for la in ordered]

    def tip(name: str) -> str:
        change = by_name[name]
        return (f"{name}\nscore {num(change.score_before, 3)} → {num(change.score_after, 3)}\n"
                f"finding {change.finding_before or '-'} → {change.finding_after or '-'}\n"
                + (f"std err {num(change.standard_error, 3)}" if change.recalibrated else "kept (not recalibrated)"))

    series = [Series("#cf222e", [by_name[n].score_before for n in names], [tip(n) for n in names]),
              Series("#1a7f37", [by_name[n].score_after for n in names], [tip(n) for n in names])]
    plot = _plot(names, series, before.thresholds, None, [False] * len(names))
    refused = fix.outcome == "refused"
    notes = "".join(
        f'<div class="finding" style="border-color:{SEVERITY_COLORS["error" if refused else "warning"]}">'
        f'<b>{"refused" if refused else "forced"}</b>: {escape(r)}</div>' for r in fix.reasons
    ) + "".join(f'<div class="finding" style="border-color:{SEVERITY_COLORS["warning"]}"><b>warning</b>: '
                f'{escape(w)}</div>' for w in fix.warnings)
    remaining = "".join(_finding_html(f) for f in grouped(fix.remaining))

    def rows(layers: list) -> str:
        return (
            '<table><thead><tr><th class="name">layer</th><th>score before → after</th>'
            '<th class="code">finding before → after</th><th>values pooled</th><th>std err</th>'
            '<th>mean moved</th><th>var ratio</th></tr></thead><tbody>'
            + "".join(
                f'<tr><td class="name">{escape(la.name)}</td><td>{_change(la.score_before, la.score_after)}</td>'
                f'<td class="code">{escape(la.finding_before or "-")} → {escape(la.finding_after or "-")}</td>'
                f'<td>{la.values if la.values is not None else "-"}</td>'
                f'<td>{num(la.standard_error, 3) if la.recalibrated else "kept"}</td>'
                f'<td>{num(la.mean_change)}</td><td>{num(la.var_ratio)}</td></tr>'
                for la in layers)
            + "</tbody></table>"
        )

    table = rows(list(fix.layers[:top]))
    if len(fix.layers) > top:
        table += (f'<details class="more"><summary>{len(fix.layers) - top} more layers</summary>'
                  f'{rows(list(fix.layers[top:]))}</details>')
    kept = "".join(f"<li><code>{escape(k.name)}</code>: {escape(k.reason)}</li>" for k in fix.skipped)
    recalibrated = sum(1 for layer in fix.layers if layer.recalibrated)
    outputs = f"<dt>before</dt><dd>{escape(output_line(before))}</dd>"
    if after is not None:
        outputs += f"<dt>after</dt><dd>{escape(output_line(after))}</dd>"
    if fix.held_out is not None:
        outputs += f"<dt>held out</dt><dd>{escape(held_out_line(fix))}</dd>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)} — {escape(subject)}</title><style>{CSS}</style></head>
<body><div class="banner" style="background:{color}">{escape(title)}
<small>{escape(subject + target)} · {recalibrated} layers recalibrated on {fix.samples} samples ({fix.batches} batches,
exact population statistics)</small></div>
<main>
<p class="next"><b>Next:</b> {escape(fix_next_step(fix))}</p>
{notes}
<h2>Outputs, train vs eval mode</h2><dl>{outputs}</dl>
<h2>Score through depth, before and after</h2>
<div class="legend"><span><i class="swatch" style="background:#cf222e"></i>before recalibration</span>
<span><i class="swatch" style="background:#1a7f37"></i>after recalibration</span></div>
{plot}
{"<h2>Findings that remain</h2>" + remaining if remaining else ""}
<h2>Layers</h2>{table}
{"<h2>Kept unchanged</h2><ul>" + kept + "</ul>" if kept else ""}
<h2>Run</h2>{_meta(before)}
</main></body></html>
"""
