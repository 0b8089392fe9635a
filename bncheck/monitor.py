"""Catching BN drift while a model trains: ``check_drift`` runs the diagnosis on a held sample
between training steps and leaves the training state exactly as it was (parameters, buffers,
modes, gradients, and the random number generators, so a seeded run stays reproducible).

No logging and no framework imports: the Lightning callback (``integrations.lightning``) and
plain loops use the same ``DriftCheck`` result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from bncheck.reporting.numbers import num
from bncheck.reporting.report import SEVERITY_ORDER, Finding, Report

SEVERITIES_FOR_LEVEL = {"never": None, None: None, "info": "info", "warning": "warning", "error": "error"}


@dataclass(frozen=True)
class DriftCheck:
    """One check of a model during training."""

    report: Report
    step: Optional[int]
    """The training step or epoch the caller passed (None when not given)."""
    max_score: Optional[float]
    """Largest finite layer score (train-pass divergence, in train-mode output stds as
    metrics.normalization_error); None without a measured layer."""
    output_agreement: Optional[float]
    """Top-1 agreement of train- and eval-mode outputs (classifiers), else None."""
    worst_layers: tuple[tuple[str, float], ...]
    """The highest-scoring layers, ``(name, score)``, most divergent first."""
    fail_on: Optional[str]
    warn_on: Optional[str]

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.report.findings

    @property
    def failed(self) -> bool:
        """A finding reached ``fail_on``."""
        return self._reaches(self.fail_on)

    @property
    def should_warn(self) -> bool:
        """A finding reached ``warn_on`` (or ``fail_on``)."""
        return self.failed or self._reaches(self.warn_on)

    def _reaches(self, level: Optional[str]) -> bool:
        level = SEVERITIES_FOR_LEVEL.get(level)
        return level is not None and any(SEVERITY_ORDER[f.severity] >= SEVERITY_ORDER[level] for f in self.findings)

    def metrics(self, prefix: str = "bncheck/") -> dict[str, float]:
        """Numbers for a logger: max score, output agreement, each worst layer's score."""
        out: dict[str, float] = {}
        if self.max_score is not None:
            out[f"{prefix}max_score"] = self.max_score
        if self.output_agreement is not None:
            out[f"{prefix}output_agreement"] = self.output_agreement
        for name, score in self.worst_layers:
            out[f"{prefix}layer/{name or '(root)'}"] = score
        return out

    @property
    def message(self) -> str:
        """One line: where, the most severe finding and how many more."""
        when = f" at step {self.step}" if self.step is not None else ""
        top = self.report.top_finding()
        if top is None:
            agreement = (f", train/eval top-1 agreement {100 * self.output_agreement:.1f}%"
                         if self.output_agreement is not None else "")
            return f"bncheck{when}: no BN drift (max layer score {_num(self.max_score)}{agreement})"
        where = f" {top.layer}" if top.layer else ""
        more = len(self.findings) - 1
        extra = f" (+{more} more finding{'s' if more != 1 else ''})" if more else ""
        return f"bncheck{when}: {top.severity} {top.code}{where}: {top.message}{extra}"


def _num(value: Optional[float]) -> str:
    return num(value)


def check_levels(fail_on: Optional[str], warn_on: Optional[str]) -> None:
    """The ``fail_on``/``warn_on`` a training callback accepts; ValueError naming the bad one."""
    for name, level in (("fail_on", fail_on), ("warn_on", warn_on)):
        if level not in SEVERITIES_FOR_LEVEL:
            raise ValueError(f"{name} must be 'error', 'warning', 'info' or None; got {level!r}")


class CheckHistory:
    """What a training callback keeps: every ``DriftCheck`` of the run, oldest first."""

    checks: list[DriftCheck]

    @property
    def last_check(self) -> Optional[DriftCheck]:
        return self.checks[-1] if self.checks else None

    @property
    def last_report(self) -> Optional[Report]:
        return self.checks[-1].report if self.checks else None


def check_drift(
    model: Any,
    sample: Any,
    *,
    step: Optional[int] = None,
    batch_size: int = 32,
    num_batches: Optional[int] = None,
    fail_on: Optional[str] = "error",
    warn_on: Optional[str] = "warning",
    top: int = 5,
    attribute: int = 0,
    thresholds: Any = None,
    ignore: Sequence[str] = (),
) -> DriftCheck:
    """Diagnose ``model`` on ``sample`` in the middle of training; returns a ``DriftCheck``.

    Call it every N steps of a plain loop (or use ``integrations.lightning.BNDriftCallback``).
    ``sample`` is what ``analyze`` takes: a tensor, an ``(inputs, labels)`` pair, a
    DataLoader or a list of batches; it runs on the model's device. The model's parameters,
    buffers, train/eval modes and ``.grad`` are left as they were, and the CPU and CUDA
    random number generators are restored, so training continues exactly as without the
    check. ``fail_on``/``warn_on``: the severity at which ``.failed``/``.should_warn`` turn
    true (``None`` or ``"never"``: never). Attribution is off by default (it costs one eval
    pass per flagged layer).

    >>> import torch, bncheck
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> check = bncheck.check_drift(model, torch.randn(64, 4) * 5 + 3, step=100, batch_size=16)
    >>> check.failed, check.worst_layers[0][0]
    (True, '1')
    """
    import torch

    from bncheck.config import FAIL_ON_LEVELS
    from bncheck.engine import analyze

    gate = fail_on if fail_on in FAIL_ON_LEVELS else "never"
    devices = _cuda_devices(model) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad():
        report = analyze(model, sample, batch_size=batch_size, num_batches=num_batches, attribute=attribute,
                         thresholds=thresholds, ignore=ignore, fail_on=gate)
    scored = [(layer.name, layer.score) for layer in report.layers
              if layer.score is not None and math.isfinite(layer.score)]
    scored.sort(key=lambda item: -item[1])
    return DriftCheck(
        report=report,
        step=step,
        max_score=scored[0][1] if scored else None,
        output_agreement=report.output.top1_agreement,
        worst_layers=tuple(scored[:top]),
        fail_on=fail_on,
        warn_on=warn_on,
    )


def _cuda_devices(model: Any) -> list[int]:
    seen = {t.device.index for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cuda"}
    return sorted(index for index in seen if index is not None)
