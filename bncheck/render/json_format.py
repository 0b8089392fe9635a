"""The JSON document (schema ``bncheck/run/v1``): the single source of truth."""

from __future__ import annotations

from ..report import Report, dumps


def render(report: Report, **_options: object) -> str:
    return dumps(report)
