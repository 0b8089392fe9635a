"""Orchestration of a diagnosis: ``analyze`` (with data) and ``lint`` (without).

No printing and no UI imports. Steps: find BN layers, then per batch one eval-mode
forward (deployment) and one train-mode forward (only BN layers in train mode) through
the statistics pass (``collect``), tallying the outputs of both modes (``outputs``);
then score, diagnose and rank (``scoring``), attribute the output gap to the top flagged
layers (``attribution``), and prove the model is unchanged.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .attribution import Kept, attribute_layer, attribute_layers
from .batches import (
    ImageList,
    OnDevice,
    batch_len,
    iter_batches,
    model_placement,
    split_batch,
    tensors,
    to_device,
    to_host,
)
from .capture import fingerprint
from .collect import LayerStats, statistics_pass
from .config import FAIL_ON_LEVELS, Thresholds, resolve_thresholds
from .discovery import BNLayer, find_bn_layers
from .divergence import composition, model_level_findings, noise_divergence, triggered
from .errors import InputError, InternalError, UsageError
from .outputs import OutputTally, output_gap
from .report import DataInfo, Finding, ModelInfo, OutputDivergence, Report
from .scoring import build_report

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``: stage ``batches`` (total unknown to the engine) or
``attribution`` (one step per eval batch of the attribution passes)."""

ThresholdsLike = Union[Thresholds, Mapping[str, float], None]


def _discover(model: nn.Module, ignore: Sequence[str]) -> tuple[list[BNLayer], set[str]]:
    """The BN layers, and the names the ``ignore`` globs leave out. Ignored layers still
    switch modes and run (the model must behave as in training); they are only left out
    of ranking and findings."""
    if isinstance(ignore, str):
        ignore = (ignore,)
    layers = find_bn_layers(model)
    ignored = {layer.name for layer in layers if any(fnmatch.fnmatchcase(layer.name, glob) for glob in ignore)}
    return layers, ignored


def _check_fail_on(fail_on: str) -> None:
    if fail_on not in FAIL_ON_LEVELS:
        raise UsageError(f"$fail_on must be one of {', '.join(FAIL_ON_LEVELS)}; got {fail_on!r}")


def _in_memory(layers: list[BNLayer]) -> ModelInfo:
    return ModelInfo(checkpoint=None, arch=None, format="in-memory", sha256=None, bn_layers=len(layers))


def analyze(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 32,
    num_batches: Optional[int] = None,
    device: Any = None,
    thresholds: ThresholdsLike = None,
    attribute: int = 5,
    ignore: Sequence[str] = (),
    fail_on: str = "error",
    progress: Optional[Progress] = None,
    momentum_known: bool = True,
) -> Report:
    """Compare every BN layer's running statistics with the statistics of ``data``.

    Args:
        model: any ``nn.Module`` (eager, TorchScript, or a loaded ``torch.export`` program).
        data: a tensor holding the sample (or an ``(inputs, labels)`` pair of tensors), cut
            into batches of ``batch_size``; or a ``DataLoader`` / any iterable of batches
            (tensors, ``(inputs, labels)`` pairs, dicts with an ``inputs`` key).
        batch_size: samples per forward pass when ``data`` is a tensor.
        num_batches: use at most this many batches (None: all of them).
        device: where to run (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``); None
            runs where the model is. A model moved for the run is moved back.
        thresholds: a ``Thresholds`` or a mapping overriding some defaults, e.g.
            ``{"stale_error": 0.5}`` (keys: see ``configs/default.yaml``).
        attribute: for the K highest-ranked flagged layers, one more eval pass each that
            measures the share of the output gap fixing that layer alone removes.
        ignore: layer-name globs left out of ranking and findings.
        fail_on: ``"error"``, ``"warning"`` or ``"never"``: which findings make the verdict ``fail``.
        progress: optional ``progress(stage, done, total)`` callback.
        momentum_known: False when the modules' momentum is not what training used (a
            state_dict rebuilt by a library builder with its defaults): no finding then
            reasons from momentum.

    Returns:
        A frozen ``Report``; ``report.verdict`` is ``"pass"``, ``"fail"`` or ``"no-batchnorm"``.
        The model is left bit-identical: parameters, buffers and every ``training`` flag
        (checked by fingerprint).

    >>> import torch, bncheck
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> report = bncheck.analyze(model, torch.randn(64, 4), batch_size=16)
    >>> report.layers[0].name, report.data.samples
    ('1', 64)
    """
    started = time.perf_counter()
    resolved = resolve_thresholds(thresholds)
    _check_fail_on(fail_on)
    if not isinstance(attribute, int) or attribute < 0:
        raise UsageError(f"$attribute must be a non-negative integer, got {attribute!r}")
    batches = iter_batches(data, batch_size=batch_size, num_batches=num_batches)
    layers, ignored = _discover(model, ignore)
    with OnDevice(model, device) as target:
        return _analyze(model, layers, ignored, batches, resolved, attribute, fail_on, progress, target, started,
                        momentum_known)


def _analyze(
    model: nn.Module,
    layers: list[BNLayer],
    ignored: set[str],
    batches: Any,
    thresholds: Thresholds,
    attribute: int,
    fail_on: str,
    progress: Optional[Progress],
    device: torch.device,
    started: float,
    momentum_known: bool = True,
) -> Report:
    _, float_dtype = model_placement(model)
    before = fingerprint(model)
    tally = OutputTally()
    samples = batches_seen = largest_batch = 0
    any_labels = False
    input_shape: Optional[tuple[int, ...]] = None
    # The sample stays on the host for the passes after the statistics: attribution and the
    # output-noise check (both run only when something diverges).
    keep: Kept = []
    labels_per_batch: list[Optional[Tensor]] = []
    try:
        with statistics_pass(model, layers) as stats:
            for batch in batches:
                inputs, labels = split_batch(batch)
                inputs = to_device(inputs, device, float_dtype)
                n = batch_len(inputs)
                if input_shape is None:
                    first = tensors(inputs)
                    per_sample = isinstance(inputs, ImageList)  # a list of images: each is one sample
                    input_shape = tuple(first[0].shape[0 if per_sample else 1:]) if first else None
                out_eval = stats.forward(inputs, "eval")
                out_train = stats.forward(inputs, "train")
                tally.add(out_train, out_eval, labels)
                # on the host: later passes re-read them, and accelerator memory is for the model
                keep.append((to_host(inputs), labels, to_host(out_train)))
                labels_per_batch.append(labels)
                any_labels = any_labels or labels is not None
                samples += n
                largest_batch = max(largest_batch, n)
                batches_seen += 1
                if progress is not None:
                    progress("batches", batches_seen, None)
    finally:
        after = fingerprint(model)
    if after != before:
        raise InternalError("the model's parameters, buffers or modes changed during the run; please report this bug")
    if batches_seen == 0:
        raise InputError("the data yielded no batches; point $data at a non-empty folder, file or iterable")
    data_info = DataInfo(None, samples, largest_batch, batches_seen, any_labels, 0, input_shape=input_shape)
    output = tally.result()

    def report_with(attribution: Optional[dict[str, Optional[float]]] = None,
                    extra: tuple[Finding, ...] = ()) -> Report:
        return build_report(
            stats.stats, ignored, thresholds, fail_on, _in_memory(layers), data_info, output, str(device), started,
            has_data=True, attribution=attribution, extra_findings=extra, momentum_known=momentum_known,
        )

    report = report_with()
    gap = output_gap(output)
    flagged = [
        layer.name for layer in report.layers
        if layer.score is not None and any(f.severity != "info" for f in layer.findings)
    ][:attribute]
    by_name: dict[str, LayerStats] = {entry.layer.name: entry for entry in stats.stats}
    attribution: dict[str, Optional[float]] = {}
    extra: tuple[Finding, ...] = ()
    try:
        if flagged and gap:
            for index, name in enumerate(flagged):
                if progress is not None:
                    progress("attribution", index * len(keep), len(flagged) * len(keep))
                attribution[name] = attribute_layer(model, layers, by_name[name], keep, gap, device, float_dtype)
        if triggered(output):
            if progress is not None:
                progress("output noise", 0, None)
            noise = noise_divergence(model, layers, keep, device, float_dtype)
            explained = any(layer.score is not None and any(f.severity != "info" for f in layer.findings)
                            for layer in report.layers)
            unmeasured = sum(1 for layer in report.layers if any(f.code == "unmeasurable" for f in layer.findings))
            extra = tuple(model_level_findings(output, noise, composition(labels_per_batch, stats.batch_means),
                                               largest_batch, explained, unmeasured))
        conclusion = _conclusion(model, layers, report, by_name, keep, gap, device, float_dtype)
    finally:  # one check for all the passes after the statistics
        if fingerprint(model) != before:
            raise InternalError("the model changed during attribution or the noise check; please report this bug")
    if not attribution and not extra and conclusion is None:
        return report
    return replace(report_with(attribution or None, extra), conclusion=conclusion)


STALE_CODES = ("stale-running-stats", "pseudo-frozen", "never-updated", "unconverged-running-stats")
MANY_STALE = 3
"""From this many stale layers on, the report concludes once: recalibrate them all."""


def _conclusion(
    model: nn.Module, layers: list[BNLayer], report: Report, by_name: dict[str, LayerStats], kept: Kept,
    gap: Optional[float], device: torch.device, float_dtype: Optional[torch.dtype],
) -> Optional[str]:
    """One sentence instead of many alike findings: when several layers are stale, fixing
    them all at once is the advice, and one more eval pass measures what it recovers."""
    stale = [layer.name for layer in report.layers if layer.score is not None
             and any(f.code in STALE_CODES and f.severity != "info" for f in layer.findings)]
    if len(stale) < MANY_STALE:
        return None
    measured = sum(1 for layer in report.layers if layer.score is not None)
    text = (f"{len(stale)} of {measured} measured BN layers are stale: recalibrate all BN layers together "
            "(bncheck fix, verified before it writes) rather than one at a time")
    if gap:
        share = attribute_layers(model, layers, [by_name[name] for name in stale], kept, gap, device, float_dtype)
        if share is not None:
            text += f"; recalibrating all {len(stale)} recovers {100 * share:.0f}% of the output gap (measured)"
    return text + "."


def lint(
    model: nn.Module, *, thresholds: ThresholdsLike = None, ignore: Sequence[str] = (), fail_on: str = "error",
    momentum_known: bool = True,
) -> Report:
    """What the model alone reveals, with no data: momentum 0, frozen affine saved in train
    mode, tracking disabled, never-updated, non-finite or near-zero running statistics.

    >>> import torch, bncheck
    >>> bn = torch.nn.BatchNorm2d(3, momentum=0.0)
    >>> [f.code for f in bncheck.lint(torch.nn.Sequential(bn)).findings]
    ['never-updated', 'pseudo-frozen']
    """
    started = time.perf_counter()
    resolved = resolve_thresholds(thresholds)
    _check_fail_on(fail_on)
    layers, ignored = _discover(model, ignore)
    entries = [LayerStats(layer, layer.module.training) for layer in layers]
    device, _ = model_placement(model)
    data_info = DataInfo(None, 0, 0, 0, False, 0)
    return build_report(
        entries, ignored, resolved, fail_on, _in_memory(layers), data_info, OutputDivergence(kind="none"),
        str(device), started, has_data=False, momentum_known=momentum_known,
    )
