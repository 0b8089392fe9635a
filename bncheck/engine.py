"""Orchestration of a diagnosis: ``analyze`` (with data) and ``lint`` (without).

No printing and no UI imports. Steps: the model's runtime and its BN layers (``runtime``),
then per batch one eval-mode forward (deployment) and one train-mode forward (only BN layers
in train mode) through the statistics pass (``measuring.statistics``), tallying the outputs
of both modes (``measuring.outputs``); then score, judge and rank (``judging.scoring``); then
the plan of passes (``measuring.passes``): each pass that re-runs the kept sample -- the input
signature, the recalibrate-all conclusion, per-layer attribution, the output-noise check, the
combined evidence of weak layers, the accuracy recovery -- runs only where ``judging`` says its
answer can change the verdict or the advice, and is recorded (time, forwards, what it bought,
or why it was skipped) in ``report.passes``; finally prove the model is unchanged.
"""

from __future__ import annotations

import fnmatch
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from bncheck.config import FAIL_ON_LEVELS, Thresholds, resolve_thresholds
from bncheck.errors import InputError, InternalError, UsageError
from bncheck.judging.attribution import gap_share
from bncheck.judging.conclusion import (
    combined_evidence_finding,
    conclusion_subjects,
    conclusion_text,
    recalibrate_all_explains,
    share_settled,
    weak_layers,
)
from bncheck.judging.findings import SAMPLE
from bncheck.judging.output_divergence import (
    composition,
    model_level_findings,
    noise_decides_at,
    nonfinite_output_finding,
    triggered,
    unmeasured_noise_finding,
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
    forwards_run,
    iter_batches,
    model_placement,
    split_batch,
    tensors,
    to_device,
    to_host,
)
from bncheck.measuring.distributed import combine
from bncheck.measuring.input_signature import SAMPLES as SIGNATURE_SAMPLES
from bncheck.measuring.input_signature import input_signature
from bncheck.measuring.outputs import OutputTally, choosing, gap_value, output_gap
from bncheck.measuring.passes import Kept, NoiseEstimate, Plan, noise_divergence
from bncheck.measuring.pictures import PICTURES, encode
from bncheck.measuring.statistics import LayerStats, statistics_pass
from bncheck.reporting.report import STALE_CODES, DataInfo, Finding, OutputDivergence, Report, Sources, fails_gate
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
    thorough: bool = False,
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
        thorough: run every pass over every kept batch whatever its value: per-layer
            attribution even when recalibrating all layers together already explains the gap,
            the output-noise pass even when flagged layers already fail the gate, the
            recalibrate-all pass past the batch that settles it. By default a pass runs only
            where its answer can change the verdict or the advice; ``report.passes`` says which
            ran, what each cost and bought, and why the others did not.

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
                           train_pass=train_pass, thorough=thorough)
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
                            train_pass=train_pass, thorough=thorough)
        finally:
            if divergent:
                with torch.no_grad():
                    for layer, saved in zip(layers, own):
                        for name, value in saved.items():
                            layer.buffer(name).copy_(value)


@dataclass
class Measured:
    """What the statistics pass leaves for the judgement and the passes after it."""

    stats: Any
    """The ``statistics_pass`` recorder: per-layer statistics (``stats.stats``) and batch means."""
    tally: OutputTally
    """Both modes' outputs over the whole data."""
    kept: Kept
    """The first ``KEEP_SAMPLES`` samples (``KEEP_BYTES`` at most) on the host, for the later passes."""
    kept_tally: OutputTally
    """Both modes' outputs over the kept samples alone (the later passes' own gap)."""
    labels_per_batch: list[Optional[Tensor]]
    kept_tallies: list[OutputTally] = field(default_factory=list)
    """The same, per kept batch (this process's): the gap of the first batches, for a pass that
    stops early."""
    samples: int = 0
    batches: int = 0
    largest_batch: int = 0
    any_labels: bool = False
    input_shape: Optional[tuple[int, ...]] = None
    forwards: int = 0
    seconds: float = 0.0


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
    thorough: bool = False,
) -> Report:
    world = world or distributed.World()
    replay = train_pass if train_pass is not None and train_pass.replayable else None
    record = train_pass if train_pass is not None and replay is None else None
    model, layers = runtime.model, runtime.layers
    if record is not None and not all(layer.native and layer.frozen_by is None
                                      for layer in layers if layer.kind == "batchnorm"):
        # a forward of its own (Batch Renorm, ghost BN, TorchScript code) or a layer kept in eval
        # by its parent (QAT freeze_bn) may read running statistics in train mode: no replay
        record.complete = False
    _, float_dtype = model_placement(model)
    before = checksum(model)
    measured = _measure(runtime, batches, device, float_dtype, progress, replay, record, before, world,
                        KEEP_SAMPLES if keep_samples is None else keep_samples)
    stats = measured.stats
    if replay is not None:
        for entry in stats.stats:
            shared = replay.stats.get(entry.layer.name)
            if shared is not None:
                entry.train, entry.train_calls = shared.train, shared.train_calls
                entry.depth = shared.depth if entry.depth is None else entry.depth  # buffer-measured layers
    if record is not None:
        record.stats = {entry.layer.name: entry for entry in stats.stats}
        record.samples, record.batches = measured.samples, measured.batches
    if measured.batches == 0:
        raise InputError("the data yielded no batches; point $data at a non-empty folder, file or iterable")
    sources = sources or Sources()
    data_info = sources.data_info(samples=measured.samples, batch_size=measured.largest_batch,
                                  batches=measured.batches, labels=measured.any_labels,
                                  input_shape=measured.input_shape)
    model_info = sources.model_info(len(layers))
    output = measured.tally.result()
    pictures = tuple(encode(kept) for kept in measured.tally.worst)
    reduce = (lambda t: distributed.pool(world, t)) if world.active else None
    plan = Plan(progress)
    plan.record("statistics", measured.seconds, measured.forwards, measured.samples,
                f"eval- and train-mode statistics of {len(layers)} BN layers over {measured.samples} samples in "
                f"{measured.batches} batches" + (" (train mode replayed)" if replay is not None else ""))
    kept = measured.kept
    kept_samples = sum(batch_len(k[0]) for k in kept)
    reading: Optional[InputReading] = None

    def report_with(attribution: Optional[dict[str, Optional[float]]] = None,
                    extra: tuple[Finding, ...] = (), conclusion: Optional[str] = None) -> Report:
        return build_report(
            stats.stats, ignored, thresholds, fail_on, model_info, data_info, output, str(device), started,
            has_data=True, attribution=attribution, extra_findings=rank_findings + extra,
            momentum_known=momentum_known, conclusion=conclusion, world_size=world.size, input_reading=reading,
            pictures=pictures, passes=tuple(plan.records),
        )

    report = report_with()
    first = _first_flagged(runtime, report)
    if world.active:  # under torchrun each rank holds another part of the sample: no fit, one reading
        plan.skip("input signature", "not under torchrun: each rank holds another part of the sample")
    elif first is None or not kept:
        plan.skip("input signature", "the first BN layer is not flagged")
    else:
        reading = plan.run("input signature",
                           lambda: _input_reading(runtime, first, kept, device, float_dtype),
                           lambda r: f"the first layer's shift reads as {r.kind}" if r is not None
                           else "no transform of the input explains the first layer's shift (or no fit)",
                           samples=min(kept_samples, SIGNATURE_SAMPLES))
        if reading is not None:
            report = report_with()
    failure: Optional[BaseException] = None
    try:
        followed = _follow_up(runtime, report, measured, plan, output, thresholds, attribute, fail_on, device,
                              float_dtype, reduce, replay, record, thorough)
    except Exception as exc:
        failure, followed = exc, None
    world.agree(failure)
    if followed is None:
        raise InternalError("the passes after the statistics pass failed; please report this bug")
    attribution, extra, conclusion = followed
    ran = any(r.ran and r.forwards and r.name != "statistics" for r in plan.records)
    if ran and checksum(model) != before:  # a healthy model ran none: no second hash
        raise InternalError("the model changed during attribution or the noise check; please report this bug")
    return report_with(attribution or None, extra, conclusion)


def _measure(
    runtime: Runtime, batches: Any, device: torch.device, float_dtype: Optional[torch.dtype],
    progress: Optional[Progress], replay: Optional[TrainPass], record: Optional[TrainPass], before: Any,
    world: distributed.World, keep_samples: int,
) -> Measured:
    """The statistics pass: per batch one eval-mode forward (deployment) and one train-mode
    forward (or the replayed train-mode outputs), tallying both modes' outputs and keeping the
    first samples on the host for the passes after it; pooled over ranks under torchrun."""
    start, calls = time.perf_counter(), forwards_run()
    model = runtime.model
    recorded = 0
    tally = OutputTally(keep_pictures=PICTURES)
    # The first KEEP_SAMPLES samples (KEEP_BYTES at most) stay on the host for the passes after the
    # statistics (attribution, the output-noise check, the conclusion: all run only when something
    # diverges), with their own output tally: memory stays flat in the number of batches and those
    # passes cost at most that many samples each.
    measured = Measured(None, tally, [], OutputTally(), [])
    kept_bytes = kept_samples = 0
    failure: Optional[BaseException] = None
    try:
        # recording for recalibration: its precision (the exact variance path from a smaller ratio)
        with statistics_pass(runtime, precise=record is not None) as stats:
            measured.stats = stats
            for batch in batches:
                inputs, labels = split_batch(batch)
                inputs = to_device(inputs, device, float_dtype)
                n = batch_len(inputs)
                if measured.input_shape is None:
                    first = tensors(inputs)
                    per_sample = isinstance(inputs, ImageList)  # a list of images: each is one sample
                    measured.input_shape = tuple(first[0].shape[0 if per_sample else 1:]) if first else None
                out_eval = stats.forward(inputs, "eval")
                if replay is not None:  # train mode never reads the running statistics that changed
                    if measured.batches >= len(replay.outputs):
                        raise InternalError("the replayed train-mode pass has fewer batches than the data")
                    out_train = to_device(replay.outputs[measured.batches], device, None)
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
                    measured.kept.append((to_host(inputs), labels, to_host(out_train)))
                    part = OutputTally()
                    part.add(out_train, out_eval, labels, batch=n)
                    measured.kept_tallies.append(part)
                    kept_samples += n
                    kept_bytes += sum(t.numel() * t.element_size() for t in (*tensors(inputs), *tensors(out_train)))
                measured.labels_per_batch.append(labels)
                measured.any_labels = measured.any_labels or labels is not None
                measured.samples += n
                measured.largest_batch = max(measured.largest_batch, n)
                measured.batches += 1
                if progress is not None:
                    progress("batches", measured.batches, None)
    except Exception as exc:  # every rank learns of it before the next collective
        failure = exc
    finally:
        after = checksum(model)
    world.agree(failure)
    if after != before:
        raise InternalError("the model's parameters, buffers or modes changed during the run; please report this bug")
    measured.kept_tally = combine(measured.kept_tallies) if measured.kept_tallies else OutputTally()
    if world.active:  # pool every rank's part: each rank now holds the whole sample's numbers
        counts = distributed.pool(world, distributed.SampleCounts(
            measured.samples, measured.batches, measured.largest_batch, measured.any_labels, measured.input_shape,
            measured.labels_per_batch))
        measured.samples, measured.batches, measured.largest_batch = counts.samples, counts.batches, counts.largest
        measured.any_labels, measured.input_shape = counts.any_labels, counts.input_shape
        measured.labels_per_batch = counts.labels_per_batch
        distributed.pool_stats(world, measured.stats, device)
        measured.tally = distributed.pool(world, tally)
        measured.kept_tally = distributed.pool(world, measured.kept_tally)
    measured.forwards, measured.seconds = forwards_run() - calls, time.perf_counter() - start
    return measured


def _follow_up(
    runtime: Runtime, report: Report, measured: Measured, plan: Plan, output: OutputDivergence,
    thresholds: Thresholds, attribute: int, fail_on: str, device: torch.device,
    float_dtype: Optional[torch.dtype], reduce: Any, replay: Optional[TrainPass], record: Optional[TrainPass],
    thorough: bool,
) -> tuple[dict[str, Optional[float]], tuple[Finding, ...], Optional[str]]:
    """The passes after the statistics pass, each run only where its answer can change the report
    (``measuring.passes.STEPS``): the conclusion first (recalibrating every stale layer at once),
    then per-layer attribution unless that already explains the gap, the output-noise pass unless
    flagged layers already fail the gate, the combined evidence of weak layers, and the accuracy
    recovery (sharing the conclusion's pass). Returns attribution, model-level findings, conclusion."""
    kept, stats = measured.kept, measured.stats
    kept_samples = sum(batch_len(k[0]) for k in kept)
    gap = output_gap(measured.kept_tally.result())  # the passes below re-run the kept samples: their own gap
    by_name: dict[str, LayerStats] = {entry.layer.name: entry for entry in stats.stats}
    extra: tuple[Finding, ...] = ()
    broken_outputs = nonfinite_output_finding(output)
    if broken_outputs is not None:
        extra += (broken_outputs,)

    def gap_of(batches: int) -> Optional[float]:
        """The output gap of the first ``batches`` kept batches (all of them: pooled over ranks)."""
        if batches >= len(kept):
            return gap
        return output_gap(combine(measured.kept_tallies[:batches]).result())

    def share_of(names: tuple[str, ...], settle: bool = False) -> tuple[Optional[float], int]:
        """The share of the gap that recalibrating ``names`` closes, and the kept batches it ran;
        ``settle``: stop once the share is surely on one side of the advice's bar."""
        if not gap:
            return None, 0

        def enough(tally: OutputTally, batches: int) -> bool:
            return share_settled(tally.values, gap_of(batches) or 0.0)

        done = plan.recalibrated(runtime, [by_name[name] for name in names], kept, device, float_dtype, reduce,
                                 enough=enough if settle else None)
        if done.empty or done.tally is None:
            return None, done.batches
        part_gap = gap_of(done.batches)
        return (gap_share(done.tally, part_gap) if part_gap else None), done.batches

    def pct(share: Optional[float]) -> str:
        return f"{100 * share:.0f}%" if share is not None else "not measurable"

    # conclusion: every stale layer recalibrated at once
    conclusion: Optional[str] = None
    explains_all = False
    subjects = conclusion_subjects(report, set(by_name))
    if eval_not_worse(output) and any(f.code in STALE_CODES and f.severity == "warning" for f in report.findings):
        conclusion = two_readings_conclusion(output)  # labels leave nothing to recover: advise no cure
        plan.skip("conclusion", "labels show eval mode doing as well as train mode: no cure to measure")
    elif subjects is None:
        off = next((f.code for f in report.findings if f.code in SAMPLE and f.severity != "info"), None)
        plan.skip("conclusion", f"the sample is off ({off}): no recalibration is advised on it" if off
                  else "fewer than 3 layers (or half of a small net's) are stale: no model-level conclusion")
    elif not gap or attribute == 0:
        conclusion = conclusion_text(report, subjects, None, None, measure=attribute > 0)
        plan.skip("conclusion", "--attribute 0" if attribute == 0 else "train and eval mode give the same outputs")
    else:
        one_set = len(subjects.stale) == len(subjects.measured)

        def conclude() -> tuple[Optional[float], Optional[float], int]:
            # one set of layers: stop once its share is surely on one side of the bar; two: the
            # advice compares them, so both run over every kept batch
            every, ran = share_of(subjects.measured, settle=one_set and not thorough)
            subset = every if one_set else share_of(subjects.stale)[0]
            return every, subset, ran

        def bought(shares: tuple[Optional[float], Optional[float], int]) -> str:
            text = f"recalibrating all {len(subjects.measured)} layers recovers {pct(shares[0])} of the output gap"
            if not one_set:
                text += f", the {len(subjects.stale)} flagged {pct(shares[1])}"
            return text + (f" (settled after {shares[2]} of {len(kept)} batches)" if shares[2] < len(kept) else "")

        all_share, flagged_share, ran = plan.run("conclusion", conclude, bought, samples=kept_samples)
        measured_on = ""
        if ran < len(kept):
            measured_on = f" on {sum(batch_len(k[0]) for k in kept[:ran])} of {kept_samples} kept samples"
        conclusion = conclusion_text(report, subjects, all_share, flagged_share, measured_on=measured_on)
        explains_all = subjects is not None and recalibrate_all_explains(subjects, all_share, flagged_share)

    # attribution: each flagged layer fixed alone
    flagged = [layer.name for layer in report.layers
               if layer.score is not None and layer.name in by_name
               and any(f.severity != "info" for f in layer.findings)][:attribute]
    attribution: dict[str, Optional[float]] = {}
    if not flagged:
        plan.skip("attribution", "--attribute 0" if attribute == 0 else "no flagged layer to attribute")
    elif not gap:
        plan.skip("attribution", "train and eval mode give the same outputs: no gap to attribute")
    elif explains_all and not thorough:
        plan.skip("attribution", f"recalibrating all {len(subjects.measured)} layers together already explains the "
                                 "gap (the conclusion): a share per layer would not change the advice "
                                 "(--thorough measures it)")
    else:
        def attribute_each() -> dict[str, Optional[float]]:
            shares = {}
            for index, name in enumerate(flagged):
                if plan.progress is not None:
                    plan.progress("attribution", index * len(kept), len(flagged) * len(kept))
                shares[name] = share_of((name,))[0]
            return shares

        attribution = plan.run(
            "attribution", attribute_each,
            lambda shares: "fixing each alone recovers " + ", ".join(f"{name} {pct(share)}"
                                                                     for name, share in shares.items()),
            samples=kept_samples)

    # output noise: drift or batch noise?
    if triggered(output):
        explained = any(layer.score is not None and any(f.severity != "info" for f in layer.findings)
                        for layer in report.layers)
        unmeasured = sum(1 for layer in report.layers if any(f.code == "unmeasurable" for f in layer.findings))
        batches = composition(measured.labels_per_batch, stats.batch_means)
        layer_findings = [f for layer in report.layers for f in layer.findings]
        settled = explained and fails_gate([*layer_findings, *extra], fail_on)
        noise: Optional[NoiseEstimate] = None
        if batches.unrepresentative:
            plan.skip("output noise", f"batch composition explains the disagreement ({batches.evidence})")
        elif replay is not None and replay.noise is not None:
            noise = replay.noise  # train mode alone: the same as before
            plan.record("output noise", 0.0, 0, noise.samples, "replayed from the diagnosis before: "
                        + noise.describe().strip())
        elif settled and not thorough:
            plan.skip("output noise", "flagged layers already fail the gate: what batch noise explains could not "
                                      "change the verdict or the advice (--thorough measures it)")
        else:
            noise = plan.run("output noise", lambda: noise_divergence(runtime, kept, device, float_dtype, reduce=reduce,
                                                                       decides_at=noise_decides_at(output)),
                             lambda estimate: f"batch noise alone gives {gap_value(estimate.divergence) or 0:.3g}"
                             f"{estimate.describe()}"
                             if estimate is not None else "not measurable (inputs that cannot be re-batched)",
                             samples=kept_samples)
            if record is not None and noise is not None and noise.complete:
                record.noise = noise
        if settled and not thorough and noise is None and not batches.unrepresentative:
            extra += (unmeasured_noise_finding(output),)
        else:
            extra += tuple(model_level_findings(output, noise, batches, measured.largest_batch, explained,
                                                unmeasured))
    else:
        plan.skip("output noise", "train and eval mode agree: no disagreement to explain")

    # combined evidence: weak layers that add up
    weak = weak_layers(report, set(by_name), thresholds) if triggered(output) and gap else ()
    if not weak:
        plan.skip("combined evidence", "fewer than 3 layers sit just under the noise bar while the outputs disagree")
    elif attribute == 0:
        plan.skip("combined evidence", "--attribute 0")
        found = combined_evidence_finding(report, weak, None, kept_samples, thresholds, measure=False)
        extra += (found,) if found is not None else ()
    else:
        share = plan.run("combined evidence", lambda: share_of(weak)[0],
                         lambda s: f"recalibrating the {len(weak)} weak layers together recovers {pct(s)}",
                         samples=kept_samples)
        found = combined_evidence_finding(report, weak, share, kept_samples, thresholds)
        extra += (found,) if found is not None else ()

    # accuracy recovery: the task metric after recalibrating every measured layer
    if accuracy_gap(output):
        before = measured.kept_tally.result()
        every = tuple(layer.name for layer in report.layers if layer.score is not None and layer.name in by_name)
        if attribute == 0 or before.eval_accuracy is None or not every:
            plan.skip("accuracy recovery", "--attribute 0" if attribute == 0 else "no labelled kept sample")
            recovery = None
        else:
            recovery = plan.run("accuracy recovery", lambda: _recovery(before, plan.recalibrated(
                runtime, [by_name[name] for name in every], kept, device, float_dtype, reduce).tally),
                lambda r: f"eval {r.metric} {100 * r.before:.1f}% -> {100 * r.after:.1f}% after recalibrating"
                if r is not None else "not measurable", samples=kept_samples)
        extra += (accuracy_gap_finding(output, recovery),)
    else:
        plan.skip("accuracy recovery", "labels show no accuracy gap" if output.train_accuracy is not None
                  else "no labels")
    return attribution, extra, conclusion


def _first_flagged(runtime: Runtime, report: Report) -> Optional[int]:
    """The index (in ``runtime.layers``) of the first BN layer in execution order when it is
    flagged for its input; None otherwise."""
    called = [layer for layer in report.layers if layer.depth is not None]
    if not called:
        return None
    first = min(called, key=lambda layer: layer.depth)
    if not any(f.code in INPUT_CODES and f.severity != "info" for f in first.findings):
        return None
    return next((i for i, layer in enumerate(runtime.layers) if layer.name == first.name), None)


INPUT_CODES = (*STALE_CODES, "input-distribution")


def _input_reading(runtime: Runtime, index: int, kept: Kept, device: torch.device,
                   float_dtype: Optional[torch.dtype]) -> Optional[InputReading]:
    """What explains the first BN layer's shift, measured by transforming the input
    (``measuring/input_signature.py``); None when it cannot be fitted."""
    inputs = [k[0] for k in kept]
    per_image = all(isinstance(x, ImageList) for x in inputs)
    if per_image:  # a detector's images, fed as a list: those of the most common size (photos differ)
        images = [image for x in inputs for image in x]
        if not all(isinstance(t, Tensor) for t in images):
            return None
        sizes = Counter(tuple(t.shape) for t in images)
        size, count = sizes.most_common(1)[0]
        if count < 2:
            return None
        inputs = [torch.stack([t for t in images if tuple(t.shape) == size][:SIGNATURE_SAMPLES])]
    if not all(isinstance(x, Tensor) for x in inputs):
        return None
    try:
        signature = input_signature(runtime, index, torch.cat(inputs)[:SIGNATURE_SAMPLES], device, float_dtype,
                                    per_image)
    except Exception:  # a model that cannot run on a part of the sample, a zero input or a batch of 1:
        return None    # no fit, and the first layer is judged by the size of its shift, as the message says
    return read_signature(signature) if signature is not None else None


def _recovery(before: Any, fixed: Optional[OutputTally]) -> Optional[Recovery]:
    """The task metric on the kept labelled samples (mIoU with masks, else accuracy, recall for
    detectors): eval mode before and after recalibrating every measured BN layer, and train mode."""
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
