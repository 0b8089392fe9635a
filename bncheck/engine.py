"""Orchestration of a diagnosis: ``analyze`` (with data) and ``lint`` (without).

No printing and no UI imports. Steps: the model's runtime and its BN layers (``runtime``),
then per batch one eval-mode forward (deployment) and one train-mode forward (only BN layers
in train mode) through the statistics pass (``measuring.statistics``), tallying the outputs
of both modes (``measuring.outputs``); then score, judge and rank (``judging.scoring``),
attribute the output gap to the top flagged layers (``judging.attribution``), and prove the
model is unchanged.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from bncheck.config import FAIL_ON_LEVELS, Thresholds, resolve_thresholds
from bncheck.errors import InputError, InternalError, UsageError
from bncheck.judging.attribution import Kept, attribute_layer, attribute_layers, recalibrated_tally
from bncheck.judging.findings import SAMPLE
from bncheck.judging.output_divergence import (
    NoiseEstimate,
    composition,
    model_level_findings,
    noise_divergence,
    nonfinite_output_finding,
    triggered,
)
from bncheck.judging.preprocessing import InputReading, read_signature
from bncheck.judging.rules import Recovery, accuracy_gap, accuracy_gap_finding, eval_not_worse, two_readings_conclusion
from bncheck.judging.scoring import build_report
from bncheck.measuring import distributed
from bncheck.measuring.batches import (
    ImageList,
    OnDevice,
    _dataset_pair,
    batch_len,
    iter_batches,
    model_placement,
    split_batch,
    tensors,
    to_device,
    to_host,
)
from bncheck.measuring.input_signature import SAMPLES as SIGNATURE_SAMPLES
from bncheck.measuring.input_signature import input_signature
from bncheck.measuring.outputs import OutputTally, choosing, output_gap
from bncheck.measuring.pictures import PICTURES, encode
from bncheck.measuring.statistics import LayerStats, statistics_pass
from bncheck.reporting.report import STALE_CODES, DataInfo, Finding, OutputDivergence, Report, Sources
from bncheck.runtime import BNLayer, Runtime, checksum, runtime_for

KEEP_SAMPLES = 256
"""Samples kept on the host for attribution, the output-noise check and the conclusion
(whole batches; per rank under torchrun). Measured on the pseudo-frozen sample (256 images):
conv1.1's share 0.921 from all 256, 0.931 from 128, 0.955 from 64; conv5.1's 0.070 / 0.048 /
0.061 -- within a few points from 128 on, at a fraction of the cost on large samples."""
KEEP_BYTES = 96 << 20
"""...and at most this many bytes of inputs and train-mode outputs: a segmentation model's
per-pixel outputs at 512x512 are 20+ MiB a sample, and keeping 256 of them would be the run's
peak memory."""
MIN_KEPT = 4
"""...but at least this many samples (whole batches), whatever they weigh: the noise floor
needs two halves of two or more samples."""

REPLAY_BUDGET = 64 * 2**20
"""Values of train-mode outputs a ``TrainPass`` keeps on the host (256 MB in float32); beyond
that it records nothing and the second diagnosis runs its own train-mode pass."""


@dataclass
class TrainPass:
    """The train-mode half of a diagnosis, shared by two diagnoses of one model on the same
    batches when only running statistics changed in between (``fix``: before and after
    recalibrating). Train mode normalizes with batch statistics and never reads the running
    ones, so its outputs, its input statistics and the output-noise estimate are the same; the
    second diagnosis runs only the eval-mode pass. Empty until a first ``analyze`` fills it."""

    stats: Optional[dict[str, LayerStats]] = None
    """Per layer: the pooled train-mode input statistics (also what recalibration needs)."""
    outputs: list[Any] = field(default_factory=list)
    """This process's train-mode outputs per batch, on the host."""
    noise: Optional[NoiseEstimate] = None
    """The output-noise estimate, when the first diagnosis measured all of it."""
    samples: int = 0
    batches: int = 0
    complete: bool = True
    """False when the outputs went over ``REPLAY_BUDGET``, or when a layer's train mode may read
    its running statistics (not BatchNorm's own forward, or kept in eval by its parent): nothing
    to replay then."""

    @property
    def replayable(self) -> bool:
        return self.stats is not None and self.complete


Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``: stage ``batches`` (total unknown to the engine),
``attribution`` (one step per eval batch of the attribution passes), then, once each as it
starts (``done`` 0, ``total`` None): ``output noise``, ``conclusion``, ``combined evidence``,
``accuracy recovery`` (each runs a pass only when the report needs it)."""

ThresholdsLike = Union[Thresholds, Mapping[str, float], None]


def _discover(runtime: Runtime, ignore: Sequence[str]) -> set[str]:
    """The names of the BN layers the ``ignore`` globs leave out. Ignored layers still
    switch modes and run (the model must behave as in training); they are only left out
    of ranking and findings."""
    if isinstance(ignore, str):
        ignore = (ignore,)
    return {layer.name for layer in runtime.layers if any(fnmatch.fnmatchcase(layer.name, glob) for glob in ignore)}


def _check_fail_on(fail_on: str) -> None:
    if fail_on not in FAIL_ON_LEVELS:
        raise UsageError(f"$fail_on must be one of {', '.join(FAIL_ON_LEVELS)}; got {fail_on!r}")


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
    shard: Optional[bool] = None,
    sources: Optional[Sources] = None,
    train_pass: Optional[TrainPass] = None,
    output: Optional[str] = None,
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
        shard: under ``torch.distributed`` (torchrun, or inside a DDP job), whether this rank
            takes only batches ``rank, rank + world_size, ...`` of ``data``. Default: yes for
            a tensor holding the whole sample, no for a DataLoader or iterable (assumed to
            be this rank's part already, e.g. with a ``DistributedSampler``). Every rank gets
            the report of the pooled sample; ``rank-divergent-stats`` flags BN buffers that
            differ between ranks (the report then describes rank 0's buffers).
        sources: where the model and the data came from (the CLI's checkpoint and data
            source), put into the report as it is built; None: an in-memory model and data.
        train_pass: an empty ``TrainPass`` to record this run's train-mode half into, or a
            filled one to replay instead of running train mode (same model and batches, only
            running statistics changed since; ``fix`` does this before and after recalibrating).
        output: which part of the model's output to compare, a key or an index, dotted for
            nesting (``"logits"``, ``"1"``, ``"0.out"``); None: found automatically (logits
            beside probabilities, ``logits``/``out`` of a dict), and ``report.output.source``
            says where.

    Returns:
        A frozen ``Report``; ``report.verdict`` is ``"pass"``, ``"fail"`` or ``"no-batchnorm"``.
        The model is left bit-identical: parameters, buffers and every ``training`` flag
        (checked by a checksum before and after; the tests prove it with ``fingerprint``).

    >>> import torch, bncheck
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> report = bncheck.analyze(model, torch.randn(64, 4), batch_size=16)
    >>> report.layers[0].name, report.data.samples
    ('1', 64)
    """
    if output is not None:
        if not isinstance(output, str) or not output:
            raise UsageError(f"$output must be a key or an index as a string, got {output!r}")
        with choosing(output):
            return analyze(model, data, batch_size=batch_size, num_batches=num_batches, device=device,
                           thresholds=thresholds, attribute=attribute, ignore=ignore, fail_on=fail_on,
                           progress=progress, momentum_known=momentum_known, shard=shard, sources=sources,
                           train_pass=train_pass)
    started = time.perf_counter()
    resolved = resolve_thresholds(thresholds)
    _check_fail_on(fail_on)
    if not isinstance(attribute, int) or attribute < 0:
        raise UsageError(f"$attribute must be a non-negative integer, got {attribute!r}")
    batches = iter_batches(data, batch_size=batch_size, num_batches=num_batches)
    world = distributed.current()
    if world.active and (shard or (shard is None and _dataset_pair(data) is not None)):
        batches = world.shard(batches)
    runtime = runtime_for(model).measuring()  # a twin where the caller's model cannot be observed as is
    ignored = _discover(runtime, ignore)
    layers = runtime.layers
    with OnDevice(runtime.model, device) as target:
        divergent = distributed.rank_divergence(world, layers)
        own = [_bn_buffers(layer) for layer in layers] if divergent else []
        try:
            if divergent:  # one report on every rank: rank 0's buffers, restored afterwards
                distributed.broadcast_buffers_from_main(world, layers)
            return _analyze(runtime, ignored, batches, resolved, attribute, fail_on, progress, target, started,
                            momentum_known, world, tuple(_rank_findings(divergent, world)), sources=sources,
                            train_pass=train_pass)
        finally:
            if divergent:
                with torch.no_grad():
                    for layer, saved in zip(layers, own):
                        for name, value in saved.items():
                            layer.buffer(name).copy_(value)


def _analyze(
    runtime: Runtime,
    ignored: set[str],
    batches: Any,
    thresholds: Thresholds,
    attribute: int,
    fail_on: str,
    progress: Optional[Progress],
    device: torch.device,
    started: float,
    momentum_known: bool = True,
    world: Optional[distributed.World] = None,
    rank_findings: tuple[Finding, ...] = (),
    keep_samples: Optional[int] = None,
    sources: Optional[Sources] = None,
    train_pass: Optional[TrainPass] = None,
) -> Report:
    world = world or distributed.World()
    replay = train_pass if train_pass is not None and train_pass.replayable else None
    record = train_pass if train_pass is not None and replay is None else None
    recorded = 0
    keep_samples = KEEP_SAMPLES if keep_samples is None else keep_samples
    model, layers = runtime.model, runtime.layers
    if record is not None and not all(layer.native and layer.frozen_by is None
                                      for layer in layers if layer.kind == "batchnorm"):
        # a forward of its own (Batch Renorm, ghost BN, TorchScript code) or a layer kept in eval
        # by its parent (QAT freeze_bn) may read running statistics in train mode: no replay
        record.complete = False
    _, float_dtype = model_placement(model)
    before = checksum(model)
    tally = OutputTally(keep_pictures=PICTURES)
    samples = batches_seen = largest_batch = 0
    any_labels = False
    input_shape: Optional[tuple[int, ...]] = None
    # The first KEEP_SAMPLES samples (KEEP_BYTES at most) stay on the host for the passes after the statistics
    # (attribution, the output-noise check, the conclusion: all run only when something
    # diverges), with their own output tally: memory stays flat in the number of batches and
    # those passes cost at most that many samples each.
    keep: Kept = []
    kept_samples = kept_bytes = 0
    kept_tally = OutputTally()
    labels_per_batch: list[Optional[Tensor]] = []
    failure: Optional[BaseException] = None
    try:
        # recording for recalibration: its precision (the exact variance path from a smaller ratio)
        with statistics_pass(runtime, precise=record is not None) as stats:
            for batch in batches:
                inputs, labels = split_batch(batch)
                inputs = to_device(inputs, device, float_dtype)
                n = batch_len(inputs)
                if input_shape is None:
                    first = tensors(inputs)
                    per_sample = isinstance(inputs, ImageList)  # a list of images: each is one sample
                    input_shape = tuple(first[0].shape[0 if per_sample else 1:]) if first else None
                out_eval = stats.forward(inputs, "eval")
                if replay is not None:  # train mode never reads the running statistics that changed
                    if batches_seen >= len(replay.outputs):
                        raise InternalError("the replayed train-mode pass has fewer batches than the data")
                    out_train = to_device(replay.outputs[batches_seen], device, None)
                else:
                    out_train = stats.forward(inputs, "train")
                if record is not None and record.complete:
                    kept_train = to_host(out_train)
                    recorded += sum(t.numel() for t in tensors(kept_train))
                    record.outputs.append(kept_train)
                    if recorded > REPLAY_BUDGET:
                        record.complete, record.outputs = False, []
                tally.add(out_train, out_eval, labels, batch=n, inputs=inputs)
                # on the host: later passes re-read them, and accelerator memory is for the model
                if kept_samples < keep_samples and (kept_bytes < KEEP_BYTES or kept_samples < MIN_KEPT):
                    keep.append((to_host(inputs), labels, to_host(out_train)))
                    kept_tally.add(out_train, out_eval, labels, batch=n)
                    kept_samples += n
                    kept_bytes += sum(t.numel() * t.element_size() for t in (*tensors(inputs), *tensors(out_train)))
                labels_per_batch.append(labels)
                any_labels = any_labels or labels is not None
                samples += n
                largest_batch = max(largest_batch, n)
                batches_seen += 1
                if progress is not None:
                    progress("batches", batches_seen, None)
    except Exception as exc:  # every rank learns of it before the next collective
        failure = exc
    finally:
        after = checksum(model)
    world.agree(failure)
    if after != before:
        raise InternalError("the model's parameters, buffers or modes changed during the run; please report this bug")
    if world.active:  # pool every rank's part: each rank now holds the whole sample's numbers
        counts = distributed.pool(world, distributed.SampleCounts(
            samples, batches_seen, largest_batch, any_labels, input_shape, labels_per_batch))
        samples, batches_seen, largest_batch = counts.samples, counts.batches, counts.largest
        any_labels, input_shape, labels_per_batch = counts.any_labels, counts.input_shape, counts.labels_per_batch
        distributed.pool_stats(world, stats, device)
        tally = distributed.pool(world, tally)
        kept_tally = distributed.pool(world, kept_tally)
    if replay is not None:
        for entry in stats.stats:
            shared = replay.stats.get(entry.layer.name)
            if shared is not None:
                entry.train, entry.train_calls = shared.train, shared.train_calls
                entry.depth = shared.depth if entry.depth is None else entry.depth  # buffer-measured layers
    if record is not None:
        record.stats = {entry.layer.name: entry for entry in stats.stats}
        record.samples, record.batches = samples, batches_seen
    if batches_seen == 0:
        raise InputError("the data yielded no batches; point $data at a non-empty folder, file or iterable")
    sources = sources or Sources()
    data_info = sources.data_info(samples=samples, batch_size=largest_batch, batches=batches_seen, labels=any_labels,
                                  input_shape=input_shape)
    model_info = sources.model_info(len(layers))
    output = tally.result()
    pictures = tuple(encode(kept) for kept in tally.worst)
    reduce = (lambda t: distributed.pool(world, t)) if world.active else None

    reading: Optional[InputReading] = None

    def report_with(attribution: Optional[dict[str, Optional[float]]] = None,
                    extra: tuple[Finding, ...] = (), conclusion: Optional[str] = None) -> Report:
        return build_report(
            stats.stats, ignored, thresholds, fail_on, model_info, data_info, output, str(device), started,
            has_data=True, attribution=attribution, extra_findings=rank_findings + extra,
            momentum_known=momentum_known, conclusion=conclusion, world_size=world.size, input_reading=reading,
            pictures=pictures,
        )

    report = report_with()
    if not world.active:  # under torchrun each rank holds another part of the sample: no fit, one reading
        if progress is not None:
            progress("input signature", 0, None)
        reading = _input_reading(runtime, report, keep, device, float_dtype)
        if reading is not None:
            report = report_with()
    gap = output_gap(kept_tally.result())  # the passes below re-run the kept samples: their own gap
    flagged = [
        layer.name for layer in report.layers
        if layer.score is not None and any(f.severity != "info" for f in layer.findings)
    ][:attribute]
    by_name: dict[str, LayerStats] = {entry.layer.name: entry for entry in stats.stats}
    attribution: dict[str, Optional[float]] = {}
    extra: tuple[Finding, ...] = ()
    failure = None
    conclusion = None

    def stage(name: str) -> None:  # a stage after the attribution passes starts
        if progress is not None:
            progress(name, 0, None)

    broken_outputs = nonfinite_output_finding(output)
    if broken_outputs is not None:
        extra += (broken_outputs,)
    try:
        if flagged and gap:
            for index, name in enumerate(flagged):
                if progress is not None:
                    progress("attribution", index * len(keep), len(flagged) * len(keep))
                attribution[name] = attribute_layer(runtime, by_name[name], keep, gap, device, float_dtype,
                                                    reduce=reduce)
        if triggered(output):
            stage("output noise")
            if replay is not None and replay.noise is not None:
                noise = replay.noise  # train mode alone: the same as before
            else:
                noise = noise_divergence(runtime, keep, device, float_dtype, reduce=reduce, gap=output)
            if record is not None and noise is not None and noise.complete:
                record.noise = noise
            explained = any(layer.score is not None and any(f.severity != "info" for f in layer.findings)
                            for layer in report.layers)
            unmeasured = sum(1 for layer in report.layers if any(f.code == "unmeasurable" for f in layer.findings))
            extra += tuple(model_level_findings(output, noise, composition(labels_per_batch, stats.batch_means),
                                               largest_batch, explained, unmeasured))
        stage("conclusion")
        if eval_not_worse(output) and any(f.code in STALE_CODES and f.severity == "warning" for f in report.findings):
            conclusion = two_readings_conclusion(output)  # labels leave nothing to recover: advise no cure
        else:
            conclusion = _conclusion(runtime, report, by_name, keep, gap, device, float_dtype, reduce,
                                     measure=attribute > 0)
        if triggered(output) and gap:
            stage("combined evidence")
            combined = _combined_evidence(runtime, report, by_name, keep, gap, device, float_dtype, reduce,
                                          thresholds, measure=attribute > 0)
            extra += (combined,) if combined is not None else ()
        if accuracy_gap(output):
            stage("accuracy recovery")
            extra += (accuracy_gap_finding(output, _recovered_accuracy(
                runtime, report, by_name, keep, kept_tally, device, float_dtype, reduce, attribute)),)
    except Exception as exc:
        failure = exc
    world.agree(failure)
    passes_ran = bool(flagged and gap) or triggered(output) or conclusion is not None or bool(extra)
    if passes_ran and checksum(model) != before:  # a healthy model ran none: no second hash
        raise InternalError("the model changed during attribution or the noise check; please report this bug")
    if not attribution and not extra and conclusion is None:
        return report
    return report_with(attribution or None, extra, conclusion)


MANY_STALE = 3
"""From this many stale layers on, the report concludes once: recalibrate them all."""


INPUT_CODES = (*STALE_CODES, "input-distribution")


def _input_reading(runtime: Runtime, report: Report, kept: Kept, device: torch.device,
                   float_dtype: Optional[torch.dtype]) -> Optional[InputReading]:
    """When the first BN layer is flagged: what explains its shift, measured by transforming
    the input (``measuring/input_signature.py``); None when it is not flagged or cannot be fitted."""
    called = [layer for layer in report.layers if layer.depth is not None]
    if not called or not kept:
        return None
    first = min(called, key=lambda layer: layer.depth)
    if not any(f.code in INPUT_CODES and f.severity != "info" for f in first.findings):
        return None
    inputs = [k[0] for k in kept]
    if not all(isinstance(x, Tensor) for x in inputs):
        return None
    index = next((i for i, layer in enumerate(runtime.layers) if layer.name == first.name), None)
    if index is None:
        return None
    try:
        signature = input_signature(runtime, index, torch.cat(inputs)[:SIGNATURE_SAMPLES], device, float_dtype)
    except Exception:  # a model that cannot run on a part of the sample, a zero input or a batch of 1:
        return None    # no fit, and the first layer is judged by the size of its shift, as the message says
    return read_signature(signature) if signature is not None else None


def _conclusion(
    runtime: Runtime, report: Report, by_name: dict[str, LayerStats], kept: Kept,
    gap: Optional[float], device: torch.device, float_dtype: Optional[torch.dtype], reduce: Any = None,
    measure: bool = True,
) -> Optional[str]:
    """One sentence instead of many alike findings: when several layers are stale, the cure is
    what ``bncheck fix`` does -- every BN layer recalibrated together, each on the input it sees
    once the layers before it use batch statistics -- and one eval pass measures what it
    recovers. When only some layers are flagged, the flagged subset is measured too (one more
    pass): the two can differ in sign, because unflagged layers downstream were tuned to the
    flagged ones' statistics. ``measure=False`` (``--attribute 0``): no pass, and the sentence
    says so. "The gap is not in these statistics" is said only when neither closes it."""
    stale = [layer.name for layer in report.layers if layer.score is not None
             and any(f.code in STALE_CODES and f.severity != "info" for f in layer.findings)]
    every = [layer.name for layer in report.layers if layer.score is not None and layer.name in by_name]
    measured = len(every)
    many = len(stale) >= MANY_STALE or (len(stale) >= 2 and 2 * len(stale) >= measured)  # small nets: half
    if not many or any(f.code in SAMPLE and f.severity != "info" for f in report.findings):
        return None  # a sample that is off comes first: no recalibration is advised on it
    all_share = flagged_share = None
    if gap and measure:
        all_share = attribute_layers(runtime, [by_name[name] for name in every], kept, gap, device, float_dtype,
                                     reduce=reduce)
        if len(stale) < measured:
            flagged_share = attribute_layers(runtime, [by_name[name] for name in stale], kept, gap, device,
                                             float_dtype, reduce=reduce)
        else:
            flagged_share = all_share

    def pct(share: float) -> str:
        return f"{100 * share:.0f}%" if share >= 0 else f"none (the gap grows by {100 * -share:.0f}%)"

    subset = (f"; recalibrating only the {len(stale)} flagged recovers {pct(flagged_share)}"
              if flagged_share is not None and len(stale) < measured else "")
    if all_share is not None and all_share >= HELPS and (flagged_share is None or all_share >= flagged_share - 0.05):
        return (f"{_freeze_reading(report, stale, measured)}{len(stale)} of {measured} measured BN layers are "
                f"stale: recalibrate all {measured} BN layers together (what bncheck fix does, verified before it "
                f"writes): that recovers {pct(all_share)} of the output gap (measured){subset}.")
    if flagged_share is not None and flagged_share >= HELPS:
        return (f"{len(stale)} of {measured} measured BN layers are stale: recalibrating those {len(stale)} "
                f"together recovers {pct(flagged_share)} of the output gap (measured), all {measured} together "
                f"{pct(all_share) if all_share is not None else 'was not measured'}: recalibrate the flagged "
                "layers (bncheck fix --layers GLOB, verified before it writes).")
    if all_share is not None:
        # the measurement does not support recalibrating: say what was measured, advise nothing it refutes
        return (f"{len(stale)} of {measured} measured BN layers disagree with this data, but recalibrating all "
                f"{measured} on it does not close the output gap ({pct(all_share)} of it recovered, measured"
                f"{subset.replace('; recalibrating', ', recalibrating')}): the gap is not in these statistics "
                "alone -- check that this data is what the model was trained on and whether BN was kept in eval "
                "mode on purpose before changing any statistics.")
    text = (f"{len(stale)} of {measured} measured BN layers are stale: recalibrate all BN layers together "
            "(bncheck fix, verified before it writes) rather than one at a time")
    if not measure:
        text += "; what that recovers was not measured (--attribute 0)"
    return text + "."


def _freeze_reading(report: Report, stale: list[str], measured: int) -> str:
    """The forum's freeze, named when the evidence fits: from the modules (momentum 0, or affine
    frozen while saved in train mode: pseudo-frozen), or -- from weights alone, where momentum is
    not saved -- as one of two readings when most layers at every depth are stale."""
    frozen = [layer.name for layer in report.layers
              if any(f.code == "pseudo-frozen" and f.severity != "info" for f in layer.findings)]
    if frozen:
        return (f"BN 'frozen' the forum's way: the {len(frozen)} flagged layers have momentum 0 (or a frozen affine) "
                "yet ran in train mode, so their statistics never followed the data the model trained on. ")
    if report.model.momentum_from not in ("library-default", "builder") or 2 * len(stale) < measured:  # not saved
        return ""
    return ("Two readings fit statistics stale at most depths: BN statistics not updated while the model trained on "
            "data like this (momentum 0 / requires_grad=False left in train(), or SWA/EMA weights without a BN "
            "update), or data from another domain than training; `bncheck diff BASE.pt THIS.pt` against the "
            "checkpoint it was fine-tuned from proves the first (statistics identical while the weights moved), "
            "and the full module (torch.save(model)) shows momentum 0. Either way: ")


HELPS = 0.1
"""Share of the output gap that recalibrating the stale layers must recover for the conclusion to advise it."""


WEAK_DRIFT = 2.0
"""Drift-to-noise ratio from which a layer below ``thresholds.drift_to_noise`` still counts as weak evidence."""
WEAK_LAYERS = 3
"""Weak layers needed before their evidence is added up."""
COMBINED_SHARE = 0.2
"""Share of the output gap that recalibrating the weak layers together must recover (measured): the
direction test. At small batches much of the gap is batch noise that no statistic removes, so the
bar is a fifth, not a half; on healthy models the rule never gets this far (benchmarks/false_alarms.py:
no run of the slow sweep or the healthy samples has three layers at 2x their noise floor)."""


def _combined_evidence(
    runtime: Runtime, report: Report, by_name: dict[str, LayerStats], kept: Kept,
    gap: float, device: torch.device, float_dtype: Optional[torch.dtype], reduce: Any, thresholds: Any,
    measure: bool = True,
) -> Optional[Finding]:
    """Evidence weak per layer but consistent across layers: several layers each 2x-``drift_to_noise``
    above their noise floor (too close to it to flag alone: per-sample noise is large where feature
    maps are 1x1) with scores at least ``stale_warning``, none flagged, while the outputs disagree.
    Their sum counts only when it points the same way as the output gap -- recalibrating them
    together must recover at least ``COMBINED_SHARE`` of it (one eval pass over the kept sample)."""
    weak = [layer for layer in report.layers
            if layer.score is not None and layer.drift_to_noise is not None
            and WEAK_DRIFT <= layer.drift_to_noise < thresholds.drift_to_noise
            and layer.score >= thresholds.stale_warning
            and not any(f.code in (*STALE_CODES, "input-distribution") for f in layer.findings)
            and layer.name in by_name]
    if len(weak) < WEAK_LAYERS:
        return None
    names = ", ".join(layer.name for layer in weak[:6]) + (f" and {len(weak) - 6} more" if len(weak) > 6 else "")
    ratios = f"{min(layer.drift_to_noise for layer in weak):.1f}-{max(layer.drift_to_noise for layer in weak):.1f}x"
    if not measure:  # --attribute 0: no pass to test the direction, so a warning that says so
        return Finding(
            "stale-running-stats", "warning", None,
            f"{len(weak)} layers each sit {ratios} above their noise floor (under drift_to_noise "
            f"{thresholds.drift_to_noise:g}, too close to flag alone) while the outputs disagree: {names}; whether "
            "recalibrating them closes the output gap was not measured (--attribute 0).",
            "Rerun with --attribute 1 or more to measure it, or check with bncheck fix --dry-run.",
        )
    share = attribute_layers(runtime, [by_name[layer.name] for layer in weak], kept, gap, device, float_dtype,
                             reduce=reduce)
    if share is None or share < COMBINED_SHARE:
        return None
    return Finding(
        "stale-running-stats", "error", None,
        f"{len(weak)} layers each sit {ratios} above their noise floor (under drift_to_noise "
        f"{thresholds.drift_to_noise:g}, too close to flag alone): {names}; together they pull eval mode away "
        f"from train mode -- recalibrating them recovers {100 * share:.0f}% of the output gap (measured on "
        f"{sum(batch_len(k[0]) for k in kept)} samples; the rest is batch noise at this batch size or other layers).",
        "Weak evidence that adds up: recalibrate all BN layers together on representative data with bncheck fix "
        "(it verifies the result), and check how the statistics were made (per-rank BN without SyncBN, a "
        "sampler that gave ranks different data).",
    )


def _recovered_accuracy(
    runtime: Runtime, report: Report, by_name: dict[str, LayerStats], kept: Kept,
    kept_tally: OutputTally, device: torch.device, float_dtype: Optional[torch.dtype], reduce: Any, attribute: int,
) -> Optional[Recovery]:
    """The task metric on the kept labelled samples (mIoU with masks, else accuracy): eval
    mode before and after recalibrating every measured BN layer on them, and train mode (one
    eval pass; ``attribute=0`` runs none)."""
    before = kept_tally.result()
    if attribute == 0 or before.eval_accuracy is None:
        return None
    measured = [by_name[layer.name] for layer in report.layers if layer.score is not None and layer.name in by_name]
    fixed = recalibrated_tally(runtime, measured, kept, device, float_dtype, reduce)
    after = fixed.result() if fixed is not None else None
    if after is None or after.eval_accuracy is None or not after.labeled:
        return None
    if before.eval_miou is not None and after.eval_miou is not None and before.train_miou is not None:
        return Recovery("mIoU", before.eval_miou, after.eval_miou, before.train_miou, after.labeled)
    metric = "recall" if before.kind == "detection" else "accuracy"
    return Recovery(metric, before.eval_accuracy, after.eval_accuracy, before.train_accuracy, after.labeled)


def _bn_buffers(layer: BNLayer) -> dict[str, Tensor]:
    out = {}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        tensor = layer.buffer(name)
        if tensor is not None:
            out[name] = tensor.detach().clone()
    return out


def _rank_findings(divergent: list, world: distributed.World) -> list[Finding]:
    """``rank-divergent-stats``: a BN layer whose running statistics differ between ranks (DDP
    with ``broadcast_buffers=False``, or per-rank SyncBN-less training): eval results then
    depend on which rank's checkpoint is saved."""
    out = []
    for name, ranks in divergent:
        worst = max(score for _, score in ranks)
        listed = ", ".join(f"rank {rank} ({score:.2f})" for rank, score in ranks[:6])
        more = f" and {len(ranks) - 6} more" if len(ranks) > 6 else ""
        out.append(Finding(
            "rank-divergent-stats", "warning" if worst >= 0.01 else "info", name,
            f"running statistics differ from rank 0's on {listed}{more} of {world.size} ranks (RMS normalized "
            "difference); this report describes rank 0's.",
            "Each rank kept its own BN statistics (DDP with broadcast_buffers=False, or per-rank BN): use "
            "SyncBatchNorm or broadcast_buffers=True, or recalibrate the saved checkpoint on the whole data "
            "(torchrun -m bncheck fix).",
        ))
    return out


def lint(
    model: nn.Module, *, thresholds: ThresholdsLike = None, ignore: Sequence[str] = (), fail_on: str = "error",
    momentum_known: bool = True, sources: Optional[Sources] = None,
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
    runtime = runtime_for(model)
    ignored = _discover(runtime, ignore)
    layers = runtime.layers
    entries = [LayerStats(layer, layer.module.training) for layer in layers]
    device, _ = model_placement(model)
    sources = sources or Sources()
    return build_report(
        entries, ignored, resolved, fail_on, sources.model_info(len(layers)),
        DataInfo(None, 0, 0, 0, False, 0), OutputDivergence(kind="none"), str(device), started, has_data=False,
        momentum_known=momentum_known,
    )
