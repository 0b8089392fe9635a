"""bncheck: find the BatchNorm layers whose running statistics disagree with your data.

Public API (torch is imported lazily, so ``import bncheck`` and ``bncheck --help`` stay fast)::

    import bncheck
    report = bncheck.analyze(model, data)            # diagnose: -> bncheck.Report
    report = bncheck.lint(model)                     # what the buffers alone reveal
    result = bncheck.recalibrate(model, data)        # exact population statistics, in place
    handle = bncheck.freeze_batchnorm(model)         # BN stays in eval after model.train()
    check = bncheck.check_drift(model, sample)       # every N steps while training
    ckpt = bncheck.open_checkpoint("model.pt", arch="torchvision:resnet18")
    ckpt.write("fixed.pt")                           # same format, atomic

``data`` is a tensor, a ``DataLoader`` or any iterable of batches. ``bncheck.testing``
holds ``assert_no_bn_drift`` and ``assert_bn_frozen`` for your test suite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "analyze": "engine",
    "lint": "engine",
    "recalibrate": "curing.recalibration",
    "RecalibrationResult": "curing.recalibration",
    "freeze_batchnorm": "curing.freeze",
    "unfreeze_batchnorm": "curing.freeze",
    "open_checkpoint": "reading.checkpoint",
    "check_drift": "monitor",
    "DriftCheck": "monitor",
    "Checkpoint": "reading.checkpoint",
    "Report": "reporting.report",
    "Finding": "reporting.report",
    "LayerResult": "reporting.report",
    "Thresholds": "config",
    "BncheckError": "errors",
    "UsageError": "errors",
    "InputError": "errors",
}
__all__ = [
    "BncheckError", "Checkpoint", "DriftCheck", "Finding", "InputError", "LayerResult", "RecalibrationResult", "Report",
    "Thresholds", "UsageError", "__version__", "analyze", "check_drift", "freeze_batchnorm", "lint", "open_checkpoint",
    "recalibrate", "unfreeze_batchnorm",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from bncheck.config import Thresholds
    from bncheck.curing.freeze import freeze_batchnorm, unfreeze_batchnorm
    from bncheck.curing.recalibration import RecalibrationResult, recalibrate
    from bncheck.engine import analyze, lint
    from bncheck.errors import BncheckError, InputError, UsageError
    from bncheck.monitor import DriftCheck, check_drift
    from bncheck.reading.checkpoint import Checkpoint, open_checkpoint
    from bncheck.reporting.report import Finding, LayerResult, Report


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bncheck' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return __all__
