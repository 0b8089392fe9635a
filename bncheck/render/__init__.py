"""Renderers: each turns a ``Report`` into text. They only read the report.

A format registers by name in ``RENDERERS``; adding one touches one file plus one line
here. Modules load lazily so rendering JSON never imports rich.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ..report import Report

Renderer = Callable[..., str]

RENDERERS: dict[str, str] = {
    "table": "bncheck.render.table",
    "json": "bncheck.render.json_format",
    "markdown": "bncheck.render.markdown",
    "html": "bncheck.render.html",
    "junit": "bncheck.render.junit",
    "github": "bncheck.render.github",
}


def get_renderer(name: str) -> Renderer:
    """The ``render(report, *, top, ...)`` function of a registered format."""
    try:
        module = importlib.import_module(RENDERERS[name])
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(sorted(RENDERERS))}") from None
    return module.render


def render(report: Report, fmt: str, **options: object) -> str:
    """``report`` in format ``fmt``, its names (from the checkpoint and the data) escaped for
    that format first (``escape.py``)."""
    from .escape import for_format

    return get_renderer(fmt)(for_format(report, fmt), **options)
