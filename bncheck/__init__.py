"""bncheck: find the BatchNorm layers whose running statistics disagree with your data.

Public API (imports torch lazily, so ``import bncheck`` and ``bncheck --help`` stay fast)::

    from bncheck import analyze
    report = analyze(model, batches)          # -> bncheck.report.Report
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["analyze", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from .engine import analyze

        return analyze
    raise AttributeError(f"module 'bncheck' has no attribute {name!r}")
