"""Orchestration: run the model in both modes over the sample and build a ``Report``.

No printing and no UI imports. Steps: find BN layers, snapshot the model, then per batch
one eval-mode forward (deployment) and one train-mode forward (only BN layers in train
mode) with input hooks pooling per-sample statistics, restoring the buffers after each
batch; finally score the layers, diagnose, rank, and prove the model is unchanged.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import __version__
from .capture import fingerprint, input_hooks, preserved_state, set_bn_train_mode
from .config import Settings, load_settings
from .diagnose import LayerFacts, layer_findings, model_findings
from .discovery import BNLayer, find_bn_layers
from .errors import InputError, InternalError
from .metrics import (
    ChannelMoments,
    channel_weights,
    gaussian_kl,
    mean_shift,
    noise_floor,
    normalization_error,
    scale_ratio,
    softmax_divergence,
    squared_norms,
    weighted_geometric_mean,
    weighted_rms,
)
from .report import (
    SEVERITY_ORDER,
    ChannelDrift,
    DataInfo,
    Finding,
    LayerResult,
    ModelInfo,
    OutputDivergence,
    Report,
    fails_gate,
)

WORST_CHANNELS = 5
Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``: stage ``batches`` (total unknown to the engine) or
``attribution`` (one step per eval batch of the attribution passes)."""


# Above this ratio of squared mean to variance, E[x^2] - mean^2 in float32 loses more than
# ~0.1% of the variance to cancellation; such inputs take the exact (slower) path.
_CANCELLATION_RATIO = 1e4


def per_sample_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance of each sample's channel over its positions: ``[N, C]`` each,
    plus positions per sample. An ``[N, C]`` input has one value per sample (variance 0).

    Fast path: the mean and ``||x||`` per row are plain reductions that run at memory speed
    (``torch.var_mean``'s Welford pass is ~15x slower on CPU); the variance is then
    ``||x||^2 / n - mean^2``. Rows whose mean dwarfs their spread would lose precision to
    cancellation, so then the exact two-pass ``var_mean`` is used. Reduced in float32
    (float64 stays float64); pooled in float64 by ``ChannelMoments``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.dim() == 2:
        return x, torch.zeros_like(x), 1
    n, c = x.shape[0], x.shape[1]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows, dim = x.permute(0, 2, 3, 1).reshape(n, -1, c), 1  # reduce without a copy
    else:
        rows, dim = x.reshape(n, c, -1), 2
    positions = rows.shape[dim]
    mean = rows.mean(dim)
    second = torch.linalg.vector_norm(rows, dim=dim) ** 2 / positions
    var = (second - mean**2).clamp_min_(0.0)
    if bool((mean**2 > _CANCELLATION_RATIO * var).any()):
        var, mean = torch.var_mean(rows, dim=dim, correction=0)
    return mean, var, positions


@dataclass
class _LayerRun:
    layer: BNLayer
    saved_training: bool
    train: Optional[ChannelMoments] = None
    eval: Optional[ChannelMoments] = None
    depth: Optional[int] = None
    scripted_before: Optional[tuple[Tensor, Tensor, int]] = None


class _Collector:
    """The hook target: routes each BN input to the current pass's accumulator."""

    def __init__(self, runs: list[_LayerRun]) -> None:
        self.runs = runs
        self.mode = "eval"
        self._next_depth = 0

    def mark_called(self, run: _LayerRun) -> None:
        if run.depth is None:
            run.depth = self._next_depth
            self._next_depth += 1

    def add(self, run: _LayerRun, means: Tensor, variances: Tensor, per_group: int) -> None:
        attr = self.mode
        moments = getattr(run, attr)
        if means.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64: pool on the host
            means, variances = means.cpu(), variances.cpu()
        if moments is None:
            moments = ChannelMoments(means.shape[1], device=means.device)
            setattr(run, attr, moments)
        moments.add_groups(means, variances, per_group)

    def __call__(self, index: int, x: Tensor) -> None:
        run = self.runs[index]
        self.mark_called(run)
        if x.dim() < 2 or x.shape[0] == 0:
            return
        self.add(run, *per_sample_stats(x))


@dataclass
class _OutputTally:
    """Output divergence between modes, summed over batches."""

    kind: Optional[str] = None
    samples: int = 0
    kl: float = 0.0
    js: float = 0.0
    agree: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    labeled: int = 0
    train_correct: int = 0
    eval_correct: int = 0

    def add(self, out_train: Any, out_eval: Any, labels: Optional[Tensor]) -> None:
        if _is_logits(out_train) and _is_logits(out_eval) and out_train.shape == out_eval.shape:
            kind = "classifier"
        else:
            kind = "tensor"
        if self.kind not in (None, kind):
            self.kind = "none"
        if self.kind == "none":
            return
        self.kind = kind
        if kind == "classifier":
            kl, js, agree = softmax_divergence(out_train, out_eval)
            self.kl += float(kl.sum())
            self.js += float(js.sum())
            self.agree += float(agree.sum())
            self.samples += out_train.shape[0]
            self._add_tensor_pair(out_train, out_eval)
            if labels is not None and labels.dim() == 1 and labels.shape[0] == out_train.shape[0]:
                labels = labels.to(out_train.device)
                self.labeled += labels.shape[0]
                self.train_correct += int((out_train.argmax(-1) == labels).sum())
                self.eval_correct += int((out_eval.argmax(-1) == labels).sum())
            return
        train_parts, eval_parts = _tensors(out_train), _tensors(out_eval)
        if not train_parts or len(train_parts) != len(eval_parts) or any(
            a.shape != b.shape for a, b in zip(train_parts, eval_parts)
        ):
            self.kind = "none"
            return
        for a, b in zip(train_parts, eval_parts):
            self._add_tensor_pair(a, b)

    def _add_tensor_pair(self, a: Tensor, b: Tensor) -> None:
        if a.is_floating_point() or a.is_complex():
            diff, ref = squared_norms(a, b)
            self.diff_sq += diff
            self.ref_sq += ref

    def result(self) -> OutputDivergence:
        if self.kind in (None, "none"):
            return OutputDivergence(kind="none")
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else None
        if self.kind == "tensor":
            return OutputDivergence(kind="tensor", relative_l2=rel)
        n = max(self.samples, 1)
        return OutputDivergence(
            kind="classifier",
            kl=self.kl / n,
            js=self.js / n,
            top1_agreement=self.agree / n,
            relative_l2=rel,
            train_accuracy=self.train_correct / self.labeled if self.labeled else None,
            eval_accuracy=self.eval_correct / self.labeled if self.labeled else None,
        )


def _is_logits(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 2 and value.shape[1] >= 2


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in a (nested) model output: dicts by key, sequences in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _split_batch(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """``(inputs, labels)`` from a tensor, an ``(inputs, labels)`` pair or a dict."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        labels = batch[1] if isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "x", "pixel_values"):
            if key in batch:
                labels = next((batch[k] for k in ("label", "labels", "target", "targets", "y") if k in batch), None)
                return batch[key], labels if isinstance(labels, Tensor) else None
    raise InputError(
        f"cannot use a batch of type {type(batch).__name__}; yield tensors, (inputs, labels) "
        "pairs or dicts with an 'input' key"
    )


def _batch_len(inputs: Any) -> int:
    first = _tensors(inputs)
    return int(first[0].shape[0]) if first and first[0].dim() else 0


def _to_device(value: Any, device: torch.device, float_dtype: Optional[torch.dtype]) -> Any:
    """Move inputs to the model's device; floating inputs also take the model's float dtype
    (a half-precision model fed float32 images would otherwise fail in its first layer)."""
    if isinstance(value, Tensor):
        if float_dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=float_dtype)
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device, float_dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_to_device(v, device, float_dtype) for v in value])
    return value


def _export_hint(model: nn.Module) -> str:
    """For torch.export programs: the input shape they were exported with (often baked in)."""
    example = getattr(model, "example_inputs", None)
    shapes = [tuple(t.shape) for t in _tensors(example)] if example is not None else []
    if not shapes or not shapes[0]:
        return ""
    return (
        f"; the program was exported with input shape {shapes[0]} and may only accept that batch size "
        f"(try --batch-size {shapes[0][0]}, or re-export with dynamic shapes)"
    )


def _forward(model: nn.Module, inputs: Any, mode: str) -> Any:
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        shapes = [tuple(t.shape) for t in _tensors(inputs)]
        integer = next((t.dtype for t in _tensors(inputs) if not (t.is_floating_point() or t.is_complex())), None)
        if integer is not None and ("type" in first_line.lower() or "dtype" in first_line.lower()):
            first_line += (
                f" (the data is {integer}: tensor files are fed to the model as stored; save them as float, "
                "normalized as in training)"
            )
        if "Expected more than 1 value per channel" in first_line:
            raise InputError(
                f"a BN layer got a single value per channel in train mode (input shape {shapes}); "
                "use --batch-size 2 or more"
            ) from None
        raise InputError(
            f"the model's {mode}-mode forward pass failed on input of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}: {first_line}; check that the data "
            f"matches the model (size, channels, transforms, --arch-kwargs){_export_hint(model)}"
        ) from None


def _to_host(value: Any) -> Any:
    """Detached CPU copies of every tensor in a (nested) value."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_to_host(v) for v in value])
    return value


def _rebuild(sequence: Any, items: list) -> Any:
    """A list, tuple or namedtuple of the same type holding ``items``."""
    if hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)


def _model_placement(model: nn.Module) -> tuple[torch.device, Optional[torch.dtype]]:
    """The device of the model's first tensor, and the dtype of its first floating parameter."""
    device, dtype = None, None
    for tensor in (*model.parameters(), *model.buffers()):
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            continue
        device = device or tensor.device
        if dtype is None and isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            dtype = tensor.dtype
    return device or torch.device("cpu"), dtype


def _scripted_before(layer: BNLayer) -> tuple[Tensor, Tensor, int]:
    tracked = layer.buffer("num_batches_tracked")
    return (
        layer.running_mean.detach().clone(),
        layer.running_var.detach().clone(),
        int(tracked) if tracked is not None else 0,
    )


def _recover_scripted(collector: _Collector, run: _LayerRun, batch_len: int) -> None:
    """Batch statistics of a TorchScript BN layer from its buffer update (no hooks there):
    ``mu_B = (r_new - (1 - m) r_old) / m``, same for the (unbiased) variance. The number of
    values per channel is unknown inside the graph, so the variance is left unbiased
    (an over-estimate by n/(n-1): under 1% once n = N*H*W > 100)."""
    layer = run.layer
    mean_old, var_old, tracked_old = run.scripted_before
    momentum = layer.momentum
    if momentum is None:
        momentum = 1.0 / (tracked_old + 1)
    mean_new, var_new = layer.running_mean.detach(), layer.running_var.detach()
    if momentum <= 0.0 or torch.equal(mean_new, mean_old) and torch.equal(var_new, var_old):
        return  # momentum 0 (or the layer was not called): the update carries no statistics
    collector.mark_called(run)
    batch_mean = (mean_new.double() - (1.0 - momentum) * mean_old.double()) / momentum
    batch_var = (var_new.double() - (1.0 - momentum) * var_old.double()) / momentum
    collector.add(run, batch_mean[None], batch_var.clamp_min(0.0)[None], max(batch_len, 1))


@dataclass(frozen=True)
class _Scores:
    score: Optional[float]
    mean_shift: Optional[float]
    max_abs_mean_shift: Optional[float]
    scale_ratio: Optional[float]
    kl: Optional[float]
    max_error: Optional[float]
    noise_floor: Optional[float]
    drift_to_noise: Optional[float]
    batch_noise: Optional[float]
    worst: tuple[ChannelDrift, ...]
    nonfinite_batch: int
    dead_blowup: int
    dead_both: int


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _score(layer: BNLayer, moments: ChannelMoments, dead_var: float) -> _Scores:
    running_mean = layer.running_mean.detach().to(moments.device, torch.float64)
    running_var = layer.running_var.detach().to(moments.device, torch.float64)
    eps = layer.eps
    weights = channel_weights(layer.weight, moments.channels, running_mean)
    a = scale_ratio(moments.var, running_var, eps)
    b = mean_shift(moments.mean, running_mean, running_var, eps)
    e = normalization_error(a, b)
    kl = gaussian_kl(a, b)
    score = weighted_rms(e, weights)
    floor = noise_floor(moments, running_var, eps, weights, moments.values)
    # Batch-to-batch jitter of train mode is about batch vs population statistics, so it is
    # measured against the pooled variance (the running stats play no part in it).
    per_batch = noise_floor(moments, moments.var, eps, weights, moments.values / moments.batches)
    ranked = torch.nan_to_num(e, nan=math.inf).argsort(descending=True)[:WORST_CHANNELS]
    worst = tuple(
        ChannelDrift(int(c), _finite(float(e[c])), _finite(float(b[c])), _finite(float(a[c])))
        for c in ranked.tolist()
    )
    batch_finite = torch.isfinite(moments.mean) & torch.isfinite(moments.var)
    drift = score / floor if math.isfinite(score) and math.isfinite(floor) and floor > 0 else math.nan
    return _Scores(
        score=_finite(score),
        mean_shift=_finite(weighted_rms(b, weights)),
        max_abs_mean_shift=_finite(float(b.abs().max())) if b.numel() else None,
        scale_ratio=_finite(weighted_geometric_mean(a, weights)),
        kl=_finite(float((weights * kl).sum() / weights.sum())),
        max_error=_finite(float(e.max())) if e.numel() else None,
        noise_floor=_finite(floor),
        drift_to_noise=_finite(drift),
        batch_noise=_finite(per_batch),
        worst=worst,
        nonfinite_batch=int((~batch_finite).sum()),
        dead_blowup=int(((running_var <= dead_var) & (moments.var > 100.0 * (running_var + eps))).sum()),
        dead_both=int(((running_var <= dead_var) & (moments.var <= dead_var)).sum()),
    )


_NO_SCORES = _Scores(None, None, None, None, None, None, None, None, None, (), 0, 0, 0)


def _facts(run: _LayerRun, s: _Scores, batch_size: int, dead_var: float) -> LayerFacts:
    layer = run.layer
    rm, rv = layer.running_mean, layer.running_var
    nonfinite_running = 0
    default = False
    if rm is not None and rv is not None:
        nonfinite_running = int((~(torch.isfinite(rm) & torch.isfinite(rv))).sum())
        default = bool((rm == 0).all()) and bool((rv == 1).all())
    tracked = layer.buffer("num_batches_tracked")
    affine = [p for p in (getattr(layer.module, "weight", None), getattr(layer.module, "bias", None))
              if isinstance(p, nn.Parameter)]
    return LayerFacts(
        name=layer.name,
        type_name=layer.type_name,
        kind=layer.kind,
        channels=layer.channels,
        depth=run.depth,
        score=s.score,
        max_abs_mean_shift=s.max_abs_mean_shift,
        drift_to_noise=s.drift_to_noise,
        batch_noise=s.batch_noise,
        batch_size=batch_size,
        momentum=layer.momentum,
        track_running_stats=layer.track_running_stats,
        nonfinite_running=nonfinite_running,
        nonfinite_batch=s.nonfinite_batch,
        default_buffers=default,
        num_batches_tracked=int(tracked) if tracked is not None and tracked.numel() == 1 else None,
        dead_blowup=s.dead_blowup,
        dead_both=s.dead_both,
        dead_running=int((rv <= dead_var).sum()) if rv is not None else 0,
        affine_frozen=bool(affine) and not any(p.requires_grad for p in affine),
        saved_training=run.saved_training,
        eps=layer.eps,
    )


def _rank_key(item: tuple[LayerFacts, _Scores]) -> tuple:
    facts, scores = item
    broken = facts.nonfinite_running or facts.nonfinite_batch
    if broken:
        return (0, 0.0, facts.depth if facts.depth is not None else 10**9)
    if scores.score is not None:
        return (1, -scores.score, 0)
    return (2, 0.0, facts.depth if facts.depth is not None else 10**9)


def _discover(
    model: nn.Module, settings: Settings, model_info: Optional[ModelInfo]
) -> tuple[list[BNLayer], set[str], ModelInfo]:
    """The BN layers, the names the ``ignore`` globs leave out, and the model info with the
    layer count. Ignored layers still switch modes and run (the model must behave as in
    training); they are only left out of ranking and findings."""
    layers = find_bn_layers(model)
    ignored = {
        layer.name for layer in layers
        if any(fnmatch.fnmatchcase(layer.name, glob) for glob in settings.ignore)
    }
    info = replace(model_info or ModelInfo(None, None, "in-memory", None, 0), bn_layers=len(layers))
    return layers, ignored, info


def analyze(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    settings: Optional[Settings] = None,
    model_info: Optional[ModelInfo] = None,
    data_source: Optional[str] = None,
    skipped_files: int = 0,
    progress: Optional[Progress] = None,
) -> Report:
    """Compare every BN layer's running statistics with the statistics of ``batches``.

    ``batches`` yields tensors, ``(inputs, labels)`` pairs or dicts; inputs are moved to the
    model's device. The model is left bit-identical (checked by fingerprint). With
    ``settings.attribute = K`` the K highest-ranked flagged layers each get one more
    eval-mode pass over the sample (see ``_attribute``); the sample and the train-mode
    outputs are kept in memory for it.
    """
    started = time.perf_counter()
    settings = settings or load_settings()
    layers, ignored, model_info = _discover(model, settings, model_info)
    device, float_dtype = _model_placement(model)
    before = fingerprint(model)
    runs = [_LayerRun(layer, layer.module.training) for layer in layers]
    collector = _Collector(runs)
    tally = _OutputTally()
    samples = batches_seen = largest_batch = 0
    any_labels = False
    keep: Optional[list[tuple[Any, Optional[Tensor], Any]]] = [] if settings.attribute > 0 else None
    try:
        with torch.no_grad(), preserved_state(model) as snapshot, input_hooks(layers, collector):
            for run in runs:
                if run.layer.scripted and run.layer.track_running_stats:
                    run.scripted_before = _scripted_before(run.layer)
            for batch in batches:
                inputs, labels = _split_batch(batch)
                inputs = _to_device(inputs, device, float_dtype)
                n = _batch_len(inputs)
                collector.mode = "eval"
                set_bn_train_mode(model, layers, bn_training=False)
                out_eval = _forward(model, inputs, "eval")
                collector.mode = "train"
                set_bn_train_mode(model, layers, bn_training=True)
                out_train = _forward(model, inputs, "train")
                for run in runs:
                    if run.scripted_before is not None:
                        _recover_scripted(collector, run, n)
                snapshot.restore_buffers()
                tally.add(out_train, out_eval, labels)
                if keep is not None:
                    # on the host: attribution re-reads them once per layer, and accelerator
                    # memory is for the model
                    keep.append((_to_host(inputs), labels, _to_host(out_train)))
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
        raise InputError("the data yielded no batches; point --data at a non-empty folder or file")
    data_info = DataInfo(data_source, samples, largest_batch, batches_seen, any_labels, skipped_files)
    output = tally.result()
    report = _build_report(runs, ignored, settings, model_info, data_info, output, str(device), started,
                           has_data=True)
    if keep is None:
        return report
    gap = _gap(output)
    flagged = [
        layer.name for layer in report.layers
        if layer.score is not None and any(f.severity != "info" for f in layer.findings)
    ][: settings.attribute]
    if not flagged or not gap:
        return report
    by_name = {run.layer.name: run for run in runs}
    attribution = {}
    try:
        for index, name in enumerate(flagged):
            if progress is not None:
                progress("attribution", index * len(keep), len(flagged) * len(keep))
            attribution[name] = _attribute(model, layers, by_name[name], keep, gap, device, float_dtype)
    finally:  # one check for all attribution passes
        if fingerprint(model) != before:
            raise InternalError("the model changed during attribution; please report this bug")
    return _build_report(runs, ignored, settings, model_info, data_info, output, str(device), started,
                         has_data=True, attribution=attribution)


def _gap(output: OutputDivergence) -> Optional[float]:
    """The output gap between modes that attribution tries to close: mean KL for
    classifiers, relative L2 otherwise."""
    value = output.kl if output.kind == "classifier" else output.relative_l2
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _attribute(
    model: nn.Module,
    layers: list[BNLayer],
    run: _LayerRun,
    kept: list[tuple[Any, Optional[Tensor], Any]],
    gap: float,
    device: torch.device,
    float_dtype: Optional[torch.dtype],
) -> Optional[float]:
    """Share of the output gap removed by fixing this one layer: one eval-mode pass over the
    sample with the layer's running statistics replaced by the population statistics its
    input had in the train-mode pass (what recalibrating it would do). 1 = the gap closes;
    0 = no effect; negative = fixing it alone makes the outputs diverge more."""
    moments = run.train
    layer = run.layer
    if moments is None or layer.running_mean is None or layer.scripted:
        return None
    tally = _OutputTally()
    with torch.no_grad(), preserved_state(model):
        set_bn_train_mode(model, layers, bn_training=False)
        layer.running_mean.copy_(moments.mean.to(layer.running_mean))
        layer.running_var.copy_(moments.var.to(layer.running_var))
        for inputs, labels, out_train in kept:
            out_eval = _forward(model, _to_device(inputs, device, float_dtype), "eval")
            tally.add(out_train, _to_host(out_eval), labels)
    fixed = _gap(tally.result())
    return 1.0 - (fixed or 0.0) / gap


def lint(
    model: nn.Module, *, settings: Optional[Settings] = None, model_info: Optional[ModelInfo] = None
) -> Report:
    """What the model alone reveals, with no data: momentum 0, frozen affine saved in train
    mode, tracking disabled, never-updated, non-finite or near-zero running statistics."""
    started = time.perf_counter()
    settings = settings or load_settings()
    layers, ignored, model_info = _discover(model, settings, model_info)
    runs = [_LayerRun(layer, layer.module.training) for layer in layers]
    device, _ = _model_placement(model)
    data_info = DataInfo(None, 0, 0, 0, False, 0)
    return _build_report(
        runs, ignored, settings, model_info, data_info, OutputDivergence(kind="none"), str(device), started,
        has_data=False,
    )


def _build_report(
    runs: list[_LayerRun],
    ignored: set[str],
    settings: Settings,
    model_info: ModelInfo,
    data_info: DataInfo,
    output: OutputDivergence,
    device: str,
    started: float,
    *,
    has_data: bool,
    attribution: Optional[dict[str, Optional[float]]] = None,
) -> Report:
    """Score, diagnose and rank the layers; decide the verdict."""
    thresholds = settings.thresholds
    largest_batch = data_info.batch_size
    scored = []
    for run in runs:
        if run.layer.name in ignored:
            continue
        if run.train is not None and run.layer.running_mean is not None:
            scores = _score(run.layer, run.train, thresholds.dead_channel_var)
        else:
            scores = _NO_SCORES
        facts = _facts(run, scores, largest_batch, thresholds.dead_channel_var)
        if attribution and run.layer.name in attribution:
            facts = replace(facts, attribution=attribution[run.layer.name])
        scored.append((facts, scores))
    scored.sort(key=_rank_key)

    called = [f for f, _ in scored if f.depth is not None]
    input_layer = min(called, key=lambda f: f.depth).name if called else None
    findings_by_layer = {
        f.name: layer_findings(f, thresholds, is_input_layer=f.name == input_layer, has_data=has_data)
        for f, _ in scored
    }
    eval_scores = {
        run.layer.name: _score(run.layer, run.eval, thresholds.dead_channel_var)
        for run in runs
        if run.eval is not None and run.layer.running_mean is not None
    }
    layer_by_name = {run.layer.name: run.layer for run in runs}
    layer_results = []
    for rank, (facts, s) in enumerate(scored, start=1):
        layer = layer_by_name[facts.name]
        ev = eval_scores.get(facts.name)
        layer_results.append(
            LayerResult(
                name=facts.name,
                type=facts.type_name,
                channels=facts.channels,
                rank=rank,
                depth=facts.depth,
                score=s.score,
                mean_shift=s.mean_shift,
                scale_ratio=s.scale_ratio,
                kl=s.kl,
                max_error=s.max_error,
                noise_floor=s.noise_floor,
                drift_to_noise=s.drift_to_noise,
                batch_noise=s.batch_noise,
                eval_score=ev.score if ev else None,
                attribution=facts.attribution,
                momentum=facts.momentum,
                eps=layer.eps,
                track_running_stats=facts.track_running_stats,
                worst_channels=s.worst,
                findings=tuple(findings_by_layer[facts.name]),
            )
        )

    first_divergent = None
    for facts, _ in sorted(((f, s) for f, s in scored if f.depth is not None), key=lambda fs: fs[0].depth):
        ev = eval_scores.get(facts.name)
        if ev is None:
            continue
        diverged = ev.score is None or (
            ev.score >= thresholds.divergence
            and (ev.drift_to_noise is None or ev.drift_to_noise >= thresholds.drift_to_noise)
        )
        if diverged:
            first_divergent = facts.name
            break

    all_findings: list[Finding] = [f for r in layer_results for f in r.findings]
    all_findings += model_findings([f for f, _ in scored], thresholds)
    all_findings.sort(key=lambda f: -SEVERITY_ORDER[f.severity])
    if not runs:
        verdict = "no-batchnorm"
    elif fails_gate(all_findings, settings.fail_on):
        verdict = "fail"
    else:
        verdict = "pass"
    return Report(
        model=model_info,
        data=data_info,
        verdict=verdict,
        fail_on=settings.fail_on,
        output=output,
        first_divergent_layer=first_divergent,
        layers=tuple(layer_results),
        findings=tuple(all_findings),
        thresholds={k: float(v) for k, v in asdict(thresholds).items()},
        bncheck_version=__version__,
        torch_version=torch.__version__,
        device=device,
        duration_s=round(time.perf_counter() - started, 3),
    )
