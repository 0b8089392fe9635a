"""The JSON document (schema ``bncheck/run/v1``): the single source of truth."""

from __future__ import annotations

from bncheck.reporting.report import DiffReport, FixReport, Report, dumps, dumps_diff, dumps_fix


def render(report: Report, **_options: object) -> str:
    return dumps(report)


def render_fix(fix: FixReport, **_options: object) -> str:
    """Schema ``bncheck/fix/v1``."""
    return dumps_fix(fix)


def render_diff(diff: DiffReport, **_options: object) -> str:
    """Schema ``bncheck/diff/v1``."""
    return dumps_diff(diff)
