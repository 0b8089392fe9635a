"""Assertions for users' own test suites (pytest or unittest): fail with a readable
message that lists the worst layers.

    from bncheck.testing import assert_no_bn_drift, assert_bn_frozen

    def test_checkpoint_has_no_bn_drift():
        assert_no_bn_drift(model, validation_batches, max_score=0.5)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncheck.curing.freeze import is_frozen
from bncheck.engine import analyze
from bncheck.reporting.report import Report, fails_gate


def _worst(report: Report, limit: int = 5) -> str:
    lines = []
    for layer in report.layers[:limit]:
        top = report.top_finding(layer)
        score = "NaN" if layer.score is None else f"{layer.score:.3f}"
        lines.append(f"  {layer.name} ({layer.type}): score {score}" + (f", {top.code}" if top else ""))
    return "\n".join(lines)


def assert_no_bn_drift(
    model: nn.Module, data: Any, *, max_score: Optional[float] = None, fail_on: str = "error", **options: Any
) -> Report:
    """Fail when ``analyze(model, data, **options)`` finds findings at or above ``fail_on``,
    or when any layer's score exceeds ``max_score``. Returns the report when it passes.

    >>> import torch
    >>> from bncheck.testing import assert_no_bn_drift
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> model[1].running_mean += 5.0   # stale statistics
    >>> assert_no_bn_drift(model, torch.randn(64, 4), batch_size=16)
    Traceback (most recent call last):
    ...
    AssertionError: BatchNorm drift: 1 finding(s) at or above 'error' ...
    """
    report = analyze(model, data, fail_on=fail_on, **options)
    problems = []
    if report.verdict == "fail":
        failing = [f for f in report.findings if fails_gate([f], fail_on)]
        codes = sorted({f.code for f in failing})
        problems.append(f"{len(failing)} finding(s) at or above {fail_on!r} ({', '.join(codes)})")
    if max_score is not None:
        over = [layer for layer in report.layers if layer.score is None or layer.score > max_score]
        if over:
            problems.append(f"{len(over)} layer(s) score above max_score={max_score}")
    if problems:
        raise AssertionError(f"BatchNorm drift: {'; '.join(problems)}; worst layers:\n{_worst(report)}")
    return report


def assert_bn_frozen(model: nn.Module, *, affine: bool = True) -> None:
    """Fail unless every BatchNorm layer will normalize with its running statistics (eval
    mode, or frozen by ``freeze_batchnorm``) and, with ``affine``, has no trainable
    gamma/beta. Call it after ``model.train()`` in a fine-tuning script's tests."""
    bad = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        why = []
        if not is_frozen(module):
            why.append("in train mode (normalizes with batch statistics)")
        if affine and any(isinstance(p, nn.Parameter) and p.requires_grad
                          for p in (getattr(module, "weight", None), getattr(module, "bias", None))):
            why.append("affine parameters require grad")
        if why:
            bad.append(f"  {name or '(model)'}: {' and '.join(why)}")
    if bad:
        raise AssertionError(
            f"{len(bad)} BatchNorm layer(s) are not frozen (use bncheck.freeze_batchnorm(model)):\n"
            + "\n".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        )
