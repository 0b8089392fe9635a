"""Renderers: each turns a result -- a ``Report`` (run), a ``FixReport`` or a ``DiffReport`` --
into text. They only read it.

A format registers by name in ``RENDERERS``; adding one touches one file plus one line here.
A format module renders a run with ``render``, a fix with ``render_fix`` and a diff with
``render_diff`` (each only where the format has one). Modules load lazily so rendering JSON
never imports rich. Every result is escaped for its format (``escape.py``) before its renderer
reads it: names from checkpoints and data folders never reach an output raw.
"""

from __future__ import annotations

import importlib
from typing import Callable, Union

from bncheck.reporting.report import DiffReport, FixReport, Report

Renderer = Callable[..., str]

RENDERERS: dict[str, str] = {
    "table": "bncheck.reporting.render.table",
    "json": "bncheck.reporting.render.json_format",
    "markdown": "bncheck.reporting.render.markdown",
    "html": "bncheck.reporting.render.html",
    "junit": "bncheck.reporting.render.junit",
    "github": "bncheck.reporting.render.github",
    "profile": "bncheck.reporting.render.profile",
}


FUNCTION_FOR = {Report: "render", FixReport: "render_fix", DiffReport: "render_diff"}
"""Which function of a format module renders which kind of result."""


def get_renderer(name: str, kind: type = Report) -> Renderer:
    """The function of a registered format that renders results of ``kind``."""
    try:
        module = importlib.import_module(RENDERERS[name])
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(sorted(RENDERERS))}") from None
    function = getattr(module, FUNCTION_FOR[kind], None)
    if function is None:
        raise ValueError(f"format {name!r} has no renderer for a {kind.__name__}")
    return function


def render(result: Union[Report, FixReport, DiffReport], fmt: str, **options: object) -> str:
    """``result`` in format ``fmt``, its names (from the checkpoint and the data) escaped for
    that format first (``escape.py``)."""
    from bncheck.reporting.render.escape import for_format

    return get_renderer(fmt, type(result))(for_format(result, fmt), **options)
