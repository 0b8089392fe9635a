"""The input-signature pass: how the first BN layer's statistics change when the input is
transformed (``judging/preprocessing.py`` says what the numbers mean).

The model runs only up to its first BN layer (a sink stops the forward there), in eval mode,
on at most ``SAMPLES`` samples of the kept sample, with every buffer and mode restored after.
Cost: for a 3-channel image model, five stem forwards (the input, each channel alone, zeros)
and three constant-channel forwards check that the stem is affine and give every moment the
fit needs; the known transforms and a free per-channel scale/offset are then scored from those
moments with no further forward. A stem that is not affine costs one stem forward per known
transform instead, and no free fit.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from bncheck.judging.metrics import channel_weights, mean_shift, normalization_error, scale_ratio, weighted_rms
from bncheck.judging.preprocessing import (
    EXPLAINED,
    PLAUSIBLE_SCALE,
    InputSignature,
    Transform,
    beyond_plausible,
    candidate_norms,
    known_settles,
    known_transforms,
)
from bncheck.measuring.batches import ImageList, forward, to_device
from bncheck.runtime import Runtime, preserved_state

SAMPLES = 8
"""Samples the fit uses (a stem's output has thousands of positions per sample per channel)."""
MAX_CHANNELS = 64
"""Inputs with more channels (features) than this get the known transforms only, no free fit."""
AFFINE_TOLERANCE = 1e-3
POSITIONS = 16384
"""Positions per channel (samples x spatial) the affine moments are taken over, evenly spaced:
a resnet50 stem gives 100k per sample, and the moments of seven such maps for 8 samples in
float64 cost 1 GB (measured); at 16k positions they cost ~60 MB."""


class _Reached(Exception):
    """Raised by the sink once the first BN layer's input is seen: the rest of the model is not run."""


class _StemSink:
    """Keeps the input of BN layer ``index`` and stops the forward there. A module-level class
    holding the value on the instance: a class defined per call is cyclic garbage, and the map
    it closed over (25 MB per resnet50 stem of 8 samples) lived until the next collection --
    +265 MiB peak RSS over the pass's ten stems (measured)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.value: Optional[Tensor] = None

    def __call__(self, at: int, value: Tensor) -> None:
        if at == self.index:
            self.value = value.detach().float()
            raise _Reached

    def from_buffers(self, *_args: Any) -> None:
        return None


def _stem(runtime: Runtime, index: int, x: Tensor, per_image: bool = False) -> Optional[Tensor]:
    """The input of BN layer ``index`` when the model runs on ``x`` (eval mode); ``per_image``:
    the model takes a list of images (a detector), given as ``x``'s rows."""
    sink = _StemSink(index)
    with runtime.observe(sink):
        try:
            forward(runtime.model, ImageList(x.unbind(0)) if per_image else x, "eval")
        except _Reached:
            pass
    value, sink.value = sink.value, None
    return value


def _flat(z: Tensor) -> Tensor:
    """``[N, K, ...]`` as ``[K, N * positions]``."""
    return z.transpose(0, 1).reshape(z.shape[1], -1)


def _score(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, weights: Tensor) -> float:
    """The layer score (as ``scoring.score_layer`` computes it) had the layer seen these moments."""
    e = normalization_error(scale_ratio(var.clamp_min(0), running_var, eps),
                            mean_shift(mean, running_mean, running_var, eps))
    value = weighted_rms(e, weights)
    return value if math.isfinite(value) else math.inf


def input_signature(runtime: Runtime, layer_index: int, inputs: Tensor, device: torch.device,
                    float_dtype: Optional[torch.dtype], per_image: bool = False) -> Optional[InputSignature]:
    """Score the first BN layer on ``inputs`` (``[N, C, ...]``) as fed, under every known
    preprocessing transform, and under the best free per-channel scale and offset when the
    path to it is affine. ``per_image``: the model takes a list of images (a detector; they are
    ``inputs``' rows, all of one size). None when the layer cannot be reached or measured this way."""
    layer = runtime.layers[layer_index]
    if layer.running_mean is None or layer.running_var is None or layer.by_buffers:
        return None
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
        return None
    x = to_device(inputs[:SAMPLES], device, float_dtype)
    if x.shape[0] < 2:
        return None
    channels = x.shape[1]
    running_mean = layer.running_mean.detach().double().cpu()
    running_var = layer.running_var.detach().double().cpu()
    eps = layer.eps
    weights = channel_weights(getattr(layer.module, "weight", None), running_mean.numel(), running_mean).cpu()

    def moments(z: Tensor) -> tuple[Tensor, Tensor]:
        flat = _flat(z).double().cpu()
        return flat.mean(1), flat.var(1, unbiased=False)

    with torch.no_grad(), preserved_state(runtime.model):
        runtime.set_mode(bn_training=False)
        fed = _stem(runtime, layer_index, x, per_image)
        if fed is None or fed.dim() < 2 or fed.shape[1] != running_mean.numel():
            return None
        baseline = _score(*moments(fed), running_mean, running_var, eps, weights)
        shape = [1, channels] + [1] * (x.dim() - 2)
        affine_parts = _affine_parts(runtime, layer_index, x, fed, per_image) if channels <= MAX_CHANNELS else None

        def transformed(t: Transform) -> float:
            scale = torch.tensor(t.scale, dtype=x.dtype, device=x.device).reshape(shape)
            offset = torch.tensor(t.offset, dtype=x.dtype, device=x.device).reshape(shape)
            if affine_parts is not None and not t.reverse:
                return _affine_score(affine_parts, torch.tensor(t.scale, dtype=torch.float64),
                                     torch.tensor(t.offset, dtype=torch.float64), running_mean, running_var, eps,
                                     weights)
            source = x.flip(1) if t.reverse else x
            z = _stem(runtime, layer_index, source * scale + offset, per_image)
            return math.inf if z is None else _score(*moments(z), running_mean, running_var, eps, weights)

        transforms = known_transforms(channels, candidate_norms(channels))
        scored = [(transformed(t), t) for t in transforms]
    best_score, best = min(scored, key=lambda item: item[0]) if scored else (None, None)
    # a known transform that already brings the layer to what correct data shows decides alone:
    # the free fit (the costly part: L-BFGS from several starts) runs only when it can matter
    settled = best_score is not None and known_settles(best_score, baseline)
    free = _free_fit(affine_parts, running_mean, running_var, eps, weights, enough=EXPLAINED * baseline) \
        if affine_parts is not None and not settled else None
    plausible = None
    if free is not None and affine_parts is not None and beyond_plausible(free[0]):
        # beyond a plausible change of scene: does one within it explain the shift as well?
        plausible = _fit_from(affine_parts, 1.0, len(free[0]), running_mean, running_var, eps, weights,
                              bound=math.log(PLAUSIBLE_SCALE))
    return InputSignature(
        layer=layer.name, baseline=baseline, samples=int(x.shape[0]), affine=affine_parts is not None,
        known=best, known_score=best_score,
        free_scale=free[0] if free else None, free_offset=free[1] if free else None,
        free_score=free[2] if free else None,
        plausible_scale=tuple(float(v) for v in plausible[1]) if plausible else None,
        plausible_offset=tuple(float(v) for v in plausible[2]) if plausible else None,
        plausible_score=plausible[0] if plausible else None,
    )


def _affine_parts(runtime: Runtime, index: int, x: Tensor, fed: Tensor,
                  per_image: bool = False) -> Optional[tuple[Tensor, Tensor]]:
    """Where the stem is affine in the input, ``stem(s*x + t) = base + sum_c s_c P_c + t_c Q_c``:
    the means ``[2C+1, K]`` and second moments ``[K, 2C+1, 2C+1]`` of the parts (``P_c`` = the
    stem on channel c alone minus the stem on zeros, ``Q_c`` the same for a constant 1 in
    channel c, and the stem on zeros), from which any per-channel transform is scored exactly.
    None when the stem is not affine (checked: the parts must add up to the stem on ``x``)."""
    channels = x.shape[1]
    total_positions = fed.numel() // fed.shape[1]
    keep = torch.linspace(0, total_positions - 1, min(total_positions, POSITIONS)).round().long().to(fed.device)

    def taken(z: Tensor) -> Tensor:  # [K, kept positions]: the same positions of every part
        return _flat(z)[:, keep]

    zero_full = _stem(runtime, index, torch.zeros_like(x), per_image)
    if zero_full is None:
        return None
    zero, fed_kept = taken(zero_full), taken(fed)
    parts: list[Tensor] = []
    for c in range(channels):
        alone = torch.zeros_like(x)
        alone[:, c] = x[:, c]
        z = _stem(runtime, index, alone, per_image)
        if z is None:
            return None
        parts.append(taken(z) - zero)
    spread = float((fed_kept - zero).norm())
    if spread == 0 or float((zero + sum(parts) - fed_kept).norm()) > AFFINE_TOLERANCE * spread:
        return None
    for c in range(channels):
        ones = torch.zeros_like(x[:1])
        ones[:, c] = 1.0
        z = _stem(runtime, index, ones, per_image)
        if z is None:
            return None
        parts.append(taken((z - zero_full[:1]).expand_as(zero_full)))
    parts.append(zero)
    stacked = torch.stack(parts).cpu()  # [2C+1, K, M], float32
    means = stacked.double().mean(2)
    second = torch.einsum("ikm,jkm->kij", stacked, stacked).double() / stacked.shape[2]
    return means, second


def _affine_moments(parts: tuple[Tensor, Tensor], scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    means, second = parts
    a = torch.cat([scale, offset, torch.ones(1, dtype=scale.dtype)])
    mean = a @ means
    var = torch.einsum("i,kij,j->k", a, second, a) - mean**2
    return mean, var


def _affine_score(parts: tuple[Tensor, Tensor], scale: Tensor, offset: Tensor, running_mean: Tensor,
                  running_var: Tensor, eps: float, weights: Tensor) -> float:
    return _score(*_affine_moments(parts, scale, offset), running_mean, running_var, eps, weights)


def _free_fit(parts: tuple[Tensor, Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
              weights: Tensor, enough: float = 0.0) -> Optional[tuple[tuple[float, ...], tuple[float, ...], float]]:
    """The per-channel scale and offset that bring the first layer closest to its running
    statistics (L-BFGS on the exact moments from a few starting scales, sign included; the
    starts far from 1 are tried only while the fit leaves more than ``enough``)."""
    channels = (parts[0].shape[0] - 1) // 2
    best: Optional[tuple[float, Tensor, Tensor]] = None
    for start in (1.0, 1 / 255, 255.0):
        if best is not None and best[0] <= enough:
            break
        fitted = _fit_from(parts, start, channels, running_mean, running_var, eps, weights)
        if fitted is not None and (best is None or fitted[0] < best[0]):
            best = fitted
    # an inverted input (negative scale) only when it fits far better: a stem whose filters are
    # near-symmetric fits a sign flip about as well, and "inverted" would be the wrong story
    flipped = _fit_from(parts, -1.0, channels, running_mean, running_var, eps, weights) \
        if best is None or best[0] > enough else None
    if flipped is not None and (best is None or flipped[0] < 0.5 * best[0]):
        best = flipped
    if best is None:
        return None
    score, scale, offset = best
    return tuple(float(v) for v in scale), tuple(float(v) for v in offset), score


def _fit_from(parts: tuple[Tensor, Tensor], start: float, channels: int, running_mean: Tensor, running_var: Tensor,
              eps: float, weights: Tensor, bound: Optional[float] = None) -> Optional[tuple[float, Tensor, Tensor]]:
    """One L-BFGS run from scale ``start`` (its sign kept; the magnitude fitted in log space,
    within ``exp(+-bound)`` when given)."""
    first = math.log(abs(start)) if bound is None else math.atanh(max(-0.999, min(0.999, math.log(abs(start)) / bound)))
    free = torch.full((channels,), first, dtype=torch.float64, requires_grad=True)
    sign = math.copysign(1.0, start)
    offset = torch.zeros(channels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([free, offset], max_iter=100, line_search_fn="strong_wolfe")

    def logs() -> Tensor:
        return free if bound is None else bound * torch.tanh(free)

    def loss() -> Tensor:
        optimizer.zero_grad()
        log_scale = logs()
        mean, var = _affine_moments(parts, sign * log_scale.exp(), offset)
        e = normalization_error(scale_ratio(var.clamp_min(1e-30), running_var, eps),
                                mean_shift(mean, running_mean, running_var, eps))
        # a small pull towards no change: a channel the stem ignores keeps scale 1, not any scale
        value = (weights * e**2).sum() / weights.sum() + 1e-4 * (log_scale**2).mean() + 1e-4 * (offset**2).mean()
        value.backward()
        return value

    try:
        with torch.enable_grad():
            optimizer.step(loss)
    except RuntimeError:
        return None
    scale = sign * logs().detach().exp()
    score = _affine_score(parts, scale, offset.detach(), running_mean, running_var, eps, weights)
    return (score, scale, offset.detach()) if math.isfinite(score) else None
