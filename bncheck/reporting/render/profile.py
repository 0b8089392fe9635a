"""``--profile``: each pass that ran the model (or was skipped), its time, forwards and what
it bought -- plain text, one pass a line, for stderr."""

from __future__ import annotations

from bncheck.reporting.report import Report


def render(report: Report) -> str:
    if not report.passes:
        return "profile: no pass ran the model (no data)\n"
    total = sum(p.seconds for p in report.passes if p.ran)
    width = max(len(p.name) for p in report.passes)
    lines = [f"profile: {total:.2f} s in passes that ran the model ({report.duration_s or 0:.2f} s in all)"]
    for p in report.passes:
        if p.ran:
            share = f"{100 * p.seconds / total:3.0f}%" if total > 0 else "  -"
            cost = f"{p.seconds:7.2f} s {share}  {p.forwards:4d} forwards"
            lines.append(f"  {p.name:<{width}}  {cost}  {p.bought}")
        else:
            lines.append(f"  {p.name:<{width}}  {'skipped':>28}  {p.bought}")
    return "\n".join(lines) + "\n"
