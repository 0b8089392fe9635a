"""Preprocessing bug, domain change, or neither: decided by what explains the first BN layer's
shift, never by the layer's position alone.

The first BN layer sees a function of the model's input alone (nothing before it normalizes),
so a transform ``T`` applied to the input predicts exactly what the layer would see had the
data been ``T(x)``. A common preprocessing bug is one such transform, fixed by the pipeline and
not by the data: a rescale (``x*255``, ``x/255``), a missing or doubled mean/std
normalization, ``[0,1]`` against ``[-1,1]`` (normalization with mean 0.5 and std 0.5), or
reversed channel order. A domain change (lighting, a colour cast, another sensor, inverted
images) can also look like a per-channel scale and offset, but a mild one.

So the measuring pass (``measuring/input_signature.py``) scores the first layer on the data as
fed, on the data under every known transform, and -- where the path to the first layer is
affine in the input (a convolution or linear layer, as in nearly every stem) -- under the best
free per-channel scale and offset. This module reads those numbers:

- a known transform that removes most of the shift names the bug and the implied pipeline;
- a free fit that removes it with a scale beyond what a physical change gives (8x either way:
  raw CT intensities, unscaled tabular features) names a units/normalization mismatch;
- a free fit that removes it with a mild scale and offset is a domain change: stale statistics,
  with the fitted change reported;
- nothing that removes it: the shift is not a simple transform of the input; stale statistics
  with both readings.

Thresholds were set on measurements (tests/judging/test_preprocessing.py): a correctly
preprocessed sample leaves the first layer at a score of 0.05-0.2, a known bug at 2-60, and the
right inverse transform brings it back under 0.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

EXPLAINED = 0.25
"""A transform explains the first layer's shift when it leaves at most this share of the score."""
AS_GOOD = 1.5
"""A known transform counts only when it explains nearly as well as the best free per-channel fit
(its score at most this multiple of the free fit's, plus ``SLACK``) or leaves less than
``MATCHED``: a lighting change that a known transform happens to halve is not that transform.
(The free fit has twice the channels' parameters and absorbs some of what makes this sample
differ from training, so it can sit below what the right transform leaves: measured 0.06 vs
0.20 on a 16-channel stem with 8 samples.)"""
SLACK = 0.05
MATCHED = 0.25
"""A first-layer score this low after a transform is what correctly preprocessed data shows
(measured 0.02-0.20 on the test models; the default ``stale_warning`` is 0.25)."""
PLAUSIBLE_SCALE = 8.0
"""A brightness, contrast or sensor change scales inputs by less than this either way."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Transform:
    """``expected = scale * fed + offset`` per input channel (``reverse``: channel order
    reversed first), with what it says about the pipeline."""

    name: str
    """Short name (``x/255``)."""
    meaning: str
    """What the inputs look like, for the report."""
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    reverse: bool = False


Norm = tuple[tuple[float, ...], tuple[float, ...], str]
"""A normalization: (mean, std, name)."""


def known_transforms(channels: int, norms: list[Norm]) -> list[Transform]:
    """The common preprocessing mistakes for inputs with ``channels`` channels, each as the
    transform that undoes it. ``norms`` are the (mean, std, name) normalizations that could be
    involved (ImageNet's, and 0.5/0.5, which is [-1, 1])."""
    ones, zeros = (1.0,) * channels, (0.0,) * channels
    out = [
        Transform("x/255", "255x too large: 0..255 where the model expects 0..1",
                  (1 / 255,) * channels, zeros),
        Transform("x*255", "255x too small: 0..1 where the model expects 0..255", (255.0,) * channels, zeros),
    ]
    for mean, std, label in norms:
        if len(mean) != channels:
            continue
        m, s = mean, std

        def affine(scale: tuple[float, ...], offset: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
            return tuple(scale), tuple(offset)

        cases = [
            (f"not normalized ({label})", f"0..1 pixels that were never normalized with the {label} mean/std "
             "the model was trained with", affine([1 / v for v in s], [-a / b for a, b in zip(m, s)])),
            (f"normalized twice or not expected ({label})", f"normalized with the {label} mean/std where the "
             "model expects them without it (or normalized twice)", affine(list(s), list(m))),
            (f"0..255 not normalized ({label})", f"0..255 pixels where the model expects them /255 and normalized "
             f"with the {label} mean/std", affine([1 / (255 * v) for v in s], [-a / b for a, b in zip(m, s)])),
            (f"normalized without /255 ({label})", f"normalized with the {label} mean/std without dividing by 255 "
             "first", affine([1 / 255] * channels, [(a / 255 - a) / b for a, b in zip(m, s)])),
            (f"normalized, expects 0..255 ({label})", f"normalized with the {label} mean/std where the model "
             "expects 0..255 pixels", affine([255 * v for v in s], [255 * a for a in m])),
        ]
        out += [Transform(name, meaning, scale, offset) for name, meaning, (scale, offset) in cases]
    for fed_mean, fed_std, fed_label in norms:  # normalized one way where the model expects another
        for mean, std, label in norms:
            if label == fed_label or len(mean) != channels or len(fed_mean) != channels:
                continue
            out.append(Transform(
                f"{fed_label} normalization, expects {label}",
                f"normalized with the {fed_label} mean/std where the model expects the {label} one",
                tuple(fs / s for fs, s in zip(fed_std, std)),
                tuple((fm - m) / s for fm, m, s in zip(fed_mean, mean, std))))
    if channels == 3:
        out.append(Transform("channels reversed", "in reversed channel order (BGR where the model expects RGB, "
                             "or the other way round)", ones, zeros, reverse=True))
        for mean, std, label in norms:  # reversed before a per-channel normalization: each channel's own stats
            if len(mean) == 3 and (len(set(mean)) > 1 or len(set(std)) > 1):
                out.append(Transform(
                    f"channels reversed before normalizing ({label})",
                    f"in reversed channel order (BGR where the model expects RGB, or the other way round), then "
                    f"normalized with the {label} mean/std",
                    tuple(std[2 - c] / std[c] for c in range(3)),
                    tuple((mean[2 - c] - mean[c]) / std[c] for c in range(3)), reverse=True))
    return out


def candidate_norms(channels: int) -> list[Norm]:
    """The normalizations a mistake could involve, in that channel count: ImageNet's and
    0.5/0.5 (which is [-1, 1] inputs)."""
    norms: list[Norm] = []
    if channels == 3:
        norms.append((IMAGENET_MEAN, IMAGENET_STD, "ImageNet"))
    elif channels == 1:
        norms.append(((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,), "ImageNet"))
    norms.append(((0.5,) * channels, (0.5,) * channels, "[-1, 1]"))
    return norms


@dataclass(frozen=True)
class InputSignature:
    """What the first BN layer's shift looks like as a transform of the input (measured)."""

    layer: str
    baseline: float
    """The first layer's score on the data as fed (on the sample the fit used)."""
    samples: int
    affine: bool
    """The path from the input to the first layer is affine (the free fit was possible)."""
    known: Optional[Transform] = None
    """The known transform that explains the shift best."""
    known_score: Optional[float] = None
    free_scale: Optional[tuple[float, ...]] = None
    """Best per-channel scale (expected = scale * fed + offset); None when not affine."""
    free_offset: Optional[tuple[float, ...]] = None
    free_score: Optional[float] = None
    plausible_scale: Optional[tuple[float, ...]] = None
    """When the free fit rescales a channel beyond ``PLAUSIBLE_SCALE``: the best fit whose every
    scale stays within it (a change of scene or sensor), to tell a channel the stem barely reads
    (loosely fitted) from a real units mismatch."""
    plausible_offset: Optional[tuple[float, ...]] = None
    plausible_score: Optional[float] = None


@dataclass(frozen=True)
class InputReading:
    """The decision: ``preprocessing`` (a named transform), ``units`` (an extreme free scale that
    no plausible change matches), ``domain`` (a mild per-channel change), ``ambiguous`` (an
    extreme scale fits best, a plausible one nearly as well: both readings), or ``unexplained``."""

    kind: str
    evidence: str
    """One sentence: what was fitted and what it left."""


def _scale_text(scale: tuple[float, ...], offset: tuple[float, ...]) -> str:
    def fmt(values: tuple[float, ...]) -> str:
        return ", ".join(f"{v:.3g}" for v in values[:4]) + (", ..." if len(values) > 4 else "")

    return f"scale {fmt(scale)}, offset {fmt(offset)}"


def beyond_plausible(scale: tuple[float, ...]) -> bool:
    """Some channel rescaled by ``PLAUSIBLE_SCALE`` or more either way (a zero scale counts)."""
    return max(abs(math.log(abs(s))) if s != 0 else math.inf for s in scale) >= math.log(PLAUSIBLE_SCALE)


def known_settles(known_score: float, baseline: float) -> bool:
    """A known transform that brings the first layer back to what correct data shows (under
    ``MATCHED``, and at most half the shift) decides the reading whatever a free fit would say."""
    return known_score <= MATCHED and known_score <= 0.5 * baseline


def read_signature(signature: InputSignature) -> InputReading:
    """Which of the readings the measured transforms support (see the module docstring)."""
    base = signature.baseline
    free = signature.free_score
    if signature.known is not None and signature.known_score is not None:
        known = signature.known_score
        good_enough = free is None or known <= MATCHED or known <= AS_GOOD * free + SLACK
        removes = known <= EXPLAINED * base or known_settles(known, base)
        if removes and good_enough:
            return InputReading(
                "preprocessing",
                f"undoing {signature.known.name} on the input brings the first BN layer's score from {base:.2f} to "
                f"{known:.2f} (fitted on {signature.samples} samples): these inputs look "
                f"{signature.known.meaning}.")
    if free is not None and signature.free_scale is not None and signature.free_offset is not None \
            and free <= EXPLAINED * base:
        change = _scale_text(signature.free_scale, signature.free_offset)
        extreme = beyond_plausible(signature.free_scale)
        # a rescale beyond PLAUSIBLE_SCALE is a units mismatch only when no plausible change explains
        # the shift too: a channel the stem barely reads is fitted loosely (a darker sensor came out
        # 4.2x, 2.4x and 20.7x on a trained YOLO, and a fit within 8x explained it as well)
        plausible = signature.plausible_score
        near = plausible is not None and signature.plausible_scale is not None \
            and signature.plausible_offset is not None and plausible <= 0.5 * base \
            and (plausible <= MATCHED or plausible <= AS_GOOD * free + SLACK)  # the known transforms' bar
        if extreme and near and plausible <= EXPLAINED * base:
            change, free = _scale_text(signature.plausible_scale, signature.plausible_offset), plausible
        elif extreme and near:
            return InputReading(
                "ambiguous",
                f"the best per-channel rescale of the input ({change}) brings the first BN layer's score from "
                f"{base:.2f} to {free:.2f}, but one within a change of scene or sensor "
                f"({_scale_text(signature.plausible_scale, signature.plausible_offset)}) brings it to "
                f"{plausible:.2f}: a units or normalization mismatch and a domain change fit about equally.")
        elif extreme:
            return InputReading(
                "units",
                f"a per-channel rescale of the input ({change}) brings the first BN layer's score from {base:.2f} "
                f"to {free:.2f}; a change of scale beyond {PLAUSIBLE_SCALE:g}x is a units or normalization "
                "mismatch (raw intensities, unscaled features), not a change of scene.")
        return InputReading(
            "domain",
            f"a per-channel change of brightness and contrast within what a change of scene or sensor gives "
            f"({change}) brings the first BN layer's score from {base:.2f} to {free:.2f}, and no known preprocessing "
            "mistake does: the data differs from training in lighting, colour or sensor (a domain change), so the "
            "statistics are stale for this data.")
    tried = "no known preprocessing transform" + ("" if signature.affine else " (and no free fit: the path to "
                                                 "the first layer is not affine)")
    best = f" (best: {signature.known.name}, score {signature.known_score:.2f})" if signature.known is not None \
        and signature.known_score is not None else ""
    return InputReading(
        "unexplained",
        f"{tried} explains the first BN layer's shift (score {base:.2f}{best}): the data differs from training "
        "in more than a transform of the input.")
