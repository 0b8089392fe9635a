"""``bncheck diff A B``: how two checkpoints of one architecture differ around each BN layer,
with no data.

Per BN layer (matched by name): how far the running mean moved (RMS over channels, in A's
running stds), how far the running variance moved (RMS of the log ratio), and the relative
change of the layer's affine parameters and of the weights feeding it (the nearest module
with a weight before it in module order). Two patterns are findings:

* running statistics identical while the weights around them changed: BN momentum 0 during
  a train-mode fine-tune, SWA/EMA weights without a BN update, EMA buffers never copied;
* running statistics that moved while those weights stayed frozen: a "frozen" backbone left
  in train mode, its statistics following the new data.

What it cannot tell apart: the seed bug and BN frozen on purpose in eval mode leave the same
checkpoints (identical statistics under changed weights); the hint names both readings and
how labelled data separates them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from bncheck.errors import InputError
from bncheck.reading.checkpoint import Checkpoint
from bncheck.reporting.report import DiffReport, Finding, LayerDiff, fails_gate
from bncheck.runtime import BNLayer, find_bn_layers

MOVED = 1e-6
"""Relative change below which parameters or statistics count as unchanged (float noise)."""
STATS_MOVED = 0.01
"""Running-mean movement (in running stds) or log-variance change that counts as moved."""


def _relative_change(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[float]:
    if a is None or b is None or a.shape != b.shape:
        return None
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    norm = float(a64.norm())
    return float((b64 - a64).norm()) / norm if norm > 0 else float((b64 - a64).norm())


def _feeding(model: nn.Module) -> dict[str, str]:
    """For each BN layer, the nearest module before it (in module order) that has a weight and
    is not itself a BN layer: the convolution or linear layer whose output it normalizes."""
    bn_names = {layer.name for layer in find_bn_layers(model)}
    last: Optional[str] = None
    feeding = {}
    for name, module in model.named_modules():
        if name in bn_names:
            if last is not None:
                feeding[name] = last
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and not list(module.children()):
            last = name
    return feeding


def _param(modules: dict[str, nn.Module], module_name: str, attr: str) -> Optional[Tensor]:
    """``attr`` of a submodule found by name (by ``named_modules``: every runtime kind has it)."""
    value = getattr(modules.get(module_name), attr, None)
    return value if isinstance(value, Tensor) else None


def _layer_diff(name: str, a: BNLayer, b: BNLayer, model_a: dict[str, nn.Module], model_b: dict[str, nn.Module],
                feeding: Optional[str]) -> LayerDiff:
    mean_shift = var_change = None
    identical = False
    if a.running_mean is not None and b.running_mean is not None and a.running_mean.shape == b.running_mean.shape:
        ma, mb = a.running_mean.double().cpu(), b.running_mean.double().cpu()
        va, vb = a.running_var.double().cpu(), b.running_var.double().cpu()
        shift = (mb - ma) / torch.sqrt(va + a.eps)
        log_ratio = torch.log((vb + a.eps) / (va + a.eps))
        mean_shift = float(torch.sqrt((shift**2).mean()))
        var_change = float(torch.sqrt((log_ratio**2).mean()))
        identical = bool(torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var))
    affine = [c for c in (_relative_change(a.buffer("weight"), b.buffer("weight")),
                          _relative_change(a.buffer("bias"), b.buffer("bias"))) if c is not None]
    feed = _relative_change(_param(model_a, feeding, "weight"), _param(model_b, feeding, "weight")) \
        if feeding else None
    return LayerDiff(
        name=name, type=a.type_name, channels=a.channels,
        mean_shift=_finite(mean_shift), var_log_change=_finite(var_change), stats_identical=identical,
        affine_change=max(affine) if affine else None, feeding=feeding, feeding_change=_finite(feed),
    )


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def diff_checkpoints(a: Checkpoint, b: Checkpoint, *, fail_on: str = "error") -> DiffReport:
    """Compare the BN layers of two loaded checkpoints of the same architecture."""
    layers_a = {layer.name: layer for layer in find_bn_layers(a.module)}
    layers_b = {layer.name: layer for layer in find_bn_layers(b.module)}
    common = [name for name in layers_a if name in layers_b]
    if not common:
        raise InputError(
            f"{a.info.checkpoint} and {b.info.checkpoint} share no BN layer name: diff compares two checkpoints "
            "of the same architecture (pass the same --arch for both)"
        )
    feeding = _feeding(a.module)
    modules_a, modules_b = dict(a.module.named_modules()), dict(b.module.named_modules())
    diffs = [_layer_diff(n, layers_a[n], layers_b[n], modules_a, modules_b, feeding.get(n)) for n in common]
    findings = _findings(diffs)
    diffs.sort(key=_ranking({f.layer: f.severity for f in findings}))
    position = {d.name: i for i, d in enumerate(diffs)}
    findings.sort(key=lambda f: position.get(f.layer or "", len(position)))
    return DiffReport(
        a=a.info, b=b.info, layers=tuple(diffs), findings=tuple(findings),
        only_in_a=tuple(n for n in layers_a if n not in layers_b),
        only_in_b=tuple(n for n in layers_b if n not in layers_a),
        verdict="fail" if fails_gate(findings, fail_on) else "pass", fail_on=fail_on,
    )


def _ranking(severity: dict[Optional[str], str]):
    """Flagged layers first (errors, then warnings), each by the size of what its finding is
    about: how far the weights moved around identical statistics, or how far the statistics
    moved; then the rest by how far their statistics moved."""
    order = {"error": 0, "warning": 1}

    def key(d: LayerDiff) -> tuple[int, float]:
        flagged = severity.get(d.name)
        if flagged and d.stats_identical:
            size = max(d.affine_change or 0.0, d.feeding_change or 0.0)
        else:
            size = (d.mean_shift or 0.0) + (d.var_log_change or 0.0)
        return order.get(flagged, 2), -size

    return key


def _moved(value: Optional[float]) -> bool:
    return value is not None and value > MOVED


def _findings(diffs: list[LayerDiff]) -> list[Finding]:
    frozen_stats = [d for d in diffs if d.stats_identical and (_moved(d.affine_change) or _moved(d.feeding_change))]
    moved_stats = [
        d for d in diffs
        if not d.stats_identical and ((d.mean_shift or 0.0) >= STATS_MOVED or (d.var_log_change or 0.0) >= STATS_MOVED)
        and not _moved(d.affine_change) and not _moved(d.feeding_change)
        and (d.affine_change is not None or d.feeding_change is not None)
    ]
    findings = []
    for d in frozen_stats:
        what = "its affine parameters" if _moved(d.affine_change) else f"the weights feeding it ({d.feeding})"
        change = d.affine_change if _moved(d.affine_change) else d.feeding_change
        findings.append(Finding(
            "stats-not-updated", "error", d.name,
            f"running statistics are identical in both checkpoints while {what} changed by {100 * change:.1f}%: "
            "the statistics do not describe the new weights.",
            "Two readings fit: statistics never updated (BN momentum 0 during a train-mode fine-tune, SWA/EMA "
            "weights without a BN update, EMA buffers never copied) -> recalibrate the second checkpoint with "
            "bncheck fix; or BN deliberately kept in eval mode while fine-tuning -> keep them. The checkpoints "
            "cannot tell these apart: run bncheck on labelled data (eval-mode accuracy above train-mode "
            "accuracy means frozen on purpose).",
        ))
    for d in moved_stats:
        findings.append(Finding(
            "stats-moved-frozen-weights", "warning", d.name,
            f"running statistics moved (mean by {d.mean_shift:.2f} stds, log-variance by {d.var_log_change:.2f}) "
            "while the weights around them stayed frozen: a frozen part of the model was left in train mode.",
            "If the part was meant to be frozen, keep its BN layers in eval mode (bncheck.freeze_batchnorm) "
            "and check eval-mode accuracy of the second checkpoint.",
        ))
    return findings
