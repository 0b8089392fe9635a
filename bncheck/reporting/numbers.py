"""Numbers as bncheck prints them, in one place: tables, messages and notes agree on digits
and on how a missing or non-finite value reads."""

from __future__ import annotations

import math
from typing import Optional


def num(value: Optional[float], digits: int = 2, missing: str = "-") -> str:
    """``value`` with ``digits`` decimals; ``missing`` for None, NaN or infinity."""
    return missing if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def pct(value: Optional[float], digits: int = 1, missing: str = "-") -> str:
    """A fraction as a percentage (``0.516`` -> ``51.6%``); ``missing`` as for ``num``."""
    return missing if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}%"
