"""GitHub Actions workflow commands: one annotation per group of findings, so a pull request
shows them without extra setup (``::error title=…::message``).

GitHub shows at most 10 annotations of each kind per step, so findings with the same
severity and code become one annotation naming their layers; with a baseline only the new
and worsened findings are annotated (the accepted ones are not news). Severity ``info``
becomes a ``notice``.
"""

from __future__ import annotations

from bncheck.reporting.render.summary import plural
from bncheck.reporting.report import STALE_CODES, Finding, Report

COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}
MAX_LAYERS = 8


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, title: str, message: str) -> str:
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"


def _annotated(report: Report) -> list[Finding]:
    if report.baseline is not None:
        return [*report.baseline.new, *report.baseline.worsened]
    return list(report.findings)


def render(report: Report, **_options: object) -> str:
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in _annotated(report):
        groups.setdefault((finding.severity, finding.code), []).append(finding)
    subject = report.model.checkpoint or report.model.arch or "model"
    lines = []
    for (severity, code), findings in groups.items():
        first = findings[0]
        layers = [f.layer for f in findings if f.layer]
        if len(findings) == 1:
            title = f"bncheck {code}" + (f" {first.layer}" if first.layer else "")
            message = f"{subject}: {first.message} {first.hint}"
        else:
            title = f"bncheck {code} on {plural(len(findings), 'layer')}"
            named = ", ".join(layers[:MAX_LAYERS]) + (f" and {len(layers) - MAX_LAYERS} more" if
                                                      len(layers) > MAX_LAYERS else "")
            message = f"{subject}: {first.layer}: {first.message} {first.hint}\nLayers: {named}"
        if report.conclusion and code in STALE_CODES:
            message += f"\nConclusion: {report.conclusion}"
        lines.append(command(COMMANDS[severity], title, message.strip()))
    if report.verdict == "fail" and not any(severity in ("error", "warning") for severity, _ in groups):
        lines.append(command("error", "bncheck FAIL", f"{subject}: the gate failed (fail on {report.fail_on})"))
    return "".join(line + "\n" for line in lines)
