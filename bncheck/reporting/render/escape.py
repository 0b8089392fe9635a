"""Escaping the names a checkpoint or a data folder chose before any format prints them.

Layer names, type names, file and folder names come from files a stranger may have written:
a newline in a layer name can start a line with ``::stop-commands::`` (which switches off
GitHub's workflow commands) or a Markdown heading; an ESC or OSC sequence reaches the
terminal raw; control bytes make XML invalid. Each format says which characters are unsafe
for it, and ``escape_strings`` applies that to every string of a result before its renderer
reads it, so no renderer has to remember which of its fields came from outside. HTML
escapes in its own renderer; JSON escapes by construction.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Any, Callable

_INVISIBLE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
"""Unicode categories printed as escapes: controls (C0, C1, DEL: newline, ESC), format
characters (bidi overrides, zero-width), line/paragraph separators, surrogates, unassigned."""


def control(text: str) -> str:
    """``text`` with every control, format or separator character written as a visible escape
    (``\\n``, ``\\x1b``, ``\\u202e``): one line, no terminal sequences, no reordering."""
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _INVISIBLE else ch
        for ch in text
    )


def markdown(text: str) -> str:
    """As ``control``, and no raw HTML (``<img onerror>``, ``<script>``) or code-span breakout:
    ``<``, ``>`` and ``&`` become entities, a backtick a look-alike (inside a code span nothing
    can escape one)."""
    return control(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "\u02cb")


SANITIZERS: dict[str, Callable[[str], str]] = {
    "table": control,
    "github": control,
    "junit": control,
    "profile": control,
    "markdown": markdown,
}
"""Per format; a format not named here escapes for itself (html, json)."""


def escape_strings(value: Any, escape: Callable[[str], str]) -> Any:
    """``value`` (a frozen result dataclass, or anything inside one) with ``escape`` applied to
    every string in it, keys of mappings included."""
    if isinstance(value, str):
        return escape(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            if not field.init:
                continue
            old = getattr(value, field.name)
            new = escape_strings(old, escape)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, tuple):
        items = tuple(escape_strings(item, escape) for item in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, list):
        return [escape_strings(item, escape) for item in value]
    if isinstance(value, dict):
        return {escape_strings(k, escape): escape_strings(v, escape) for k, v in value.items()}
    return value


def for_format(value: Any, fmt: str) -> Any:
    """``value`` ready for format ``fmt`` (unchanged for formats that escape for themselves)."""
    escape = SANITIZERS.get(fmt)
    return value if escape is None else escape_strings(value, escape)
