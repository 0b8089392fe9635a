"""Pictures of the samples where the modes disagree most (segmentation): the input, the
eval-mode mask, the train-mode mask and the truth, small and in one fixed palette, kept a few
at a time while the batches stream (memory never grows with the sample)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bncheck.measuring.batches import IGNORE_INDEX
from bncheck.reporting.png import PALETTE, box_color, encode_rgb, to_base64
from bncheck.reporting.report import Picture

PICTURES = 4
"""Samples pictured in a segmentation report."""
SIDE = 160
"""Longest side of a picture, in pixels: larger inputs are scaled down (the page scales small ones up)."""


PALETTE_RGB = torch.tensor(PALETTE, dtype=torch.uint8)
"""``reporting.png.PALETTE`` as a lookup table: ``PALETTE_RGB[classes]`` colours a map."""


@dataclass
class Shot:
    """A sample kept for a picture while the batches stream: small uint8 RGB thumbnails
    ``[H, W, 3]``, encoded as PNG once, when the report is built."""

    sample: int
    agreement: float
    image: Optional[Tensor]
    eval: Tensor
    train: Tensor
    truth: Optional[Tensor]
    classes: tuple[int, ...]


def _size(height: int, width: int) -> tuple[int, int]:
    """At most ``SIDE`` on the longer side, never enlarged (the page scales small ones up)."""
    scale = min(1.0, SIDE / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _middle_slice(value: Tensor, spatial: int) -> Tensor:
    """A volume's middle slice along depth: the last ``spatial`` dims stay, those before fold."""
    while value.dim() > spatial:
        value = value.select(-spatial - 1, value.shape[-spatial - 1] // 2)
    return value


def image_rgb(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A model input ``[C, H, W]`` (a volume ``[C, D, H, W]``: its middle slice) as it looks:
    the first three channels (one channel as grey), stretched between its 1st and 99th
    percentile (inputs are normalised, so their range says nothing). ``[H, W, 3]`` uint8."""
    image = image.detach().float().cpu()
    while image.dim() > 3:
        image = image.select(1, image.shape[1] // 2)
    channels = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    finite = channels[channels.isfinite()]
    if finite.numel():
        ordered = finite.flatten()[:: max(1, finite.numel() // 65536)]
        low, high = torch.quantile(ordered, 0.01), torch.quantile(ordered, 0.99)
    else:
        low, high = torch.tensor(0.0), torch.tensor(1.0)
    scaled = ((channels.nan_to_num(0.0) - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    if tuple(scaled.shape[-2:]) != size:
        scaled = torch.nn.functional.interpolate(scaled[None], size=size, mode="bilinear", align_corners=False,
                                                 antialias=True)[0].clamp(0, 1)
    return (scaled * 255).round().to(torch.uint8).permute(1, 2, 0)


def classes_rgb(classes: Tensor, size: tuple[int, int]) -> Tensor:
    """A map of class indices ``[H, W]`` (a volume: its middle slice) in the fixed palette."""
    classes = _middle_slice(classes.detach().cpu().long(), 2)
    if tuple(classes.shape) != size:
        classes = torch.nn.functional.interpolate(classes[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return PALETTE_RGB[classes.clamp(0, 255)]


def shot(sample: int, agreement: float, image: Optional[Tensor], eval_map: Tensor, train_map: Tensor,
         truth: Optional[Tensor]) -> Shot:
    """One sample to picture: ``image`` its input ``[C, *spatial]`` (None when it is not an
    image), ``eval_map``/``train_map`` the classes each mode predicts ``[*spatial]`` (at the
    output's resolution) and ``truth`` its mask."""
    spatial = tuple((image if image is not None else truth if truth is not None else eval_map).shape[-2:])
    size = _size(*spatial)
    present = {*eval_map.unique().tolist(), *train_map.unique().tolist(),
               *(truth.unique().tolist() if truth is not None else [])}
    return Shot(sample=sample, agreement=min(max(agreement, 0.0), 1.0),
                image=image_rgb(image, size) if image is not None else None,
                eval=classes_rgb(eval_map, size), train=classes_rgb(train_map, size),
                truth=classes_rgb(truth, size) if truth is not None else None,
                classes=tuple(sorted(int(c) for c in present if c != IGNORE_INDEX)))


def draw_boxes(rgb: Tensor, boxes: Tensor, labels: Tensor, scale: tuple[float, float]) -> Tensor:
    """A copy of ``rgb`` ``[H, W, 3]`` with each box (``x0, y0, x1, y1`` in input pixels, scaled
    by ``(sy, sx)``) outlined two pixels wide in its class's colour."""
    out = rgb.clone()
    h, w = out.shape[:2]
    sy, sx = scale
    for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist()):
        left, right = (max(0, min(w - 1, round(v * sx))) for v in (x0, x1))
        top, bottom = (max(0, min(h - 1, round(v * sy))) for v in (y0, y1))
        color = PALETTE_RGB[box_color(int(label))]
        out[top:top + 2, left:right + 1] = color
        out[max(top, bottom - 1):bottom + 1, left:right + 1] = color
        out[top:bottom + 1, left:left + 2] = color
        out[top:bottom + 1, max(left, right - 1):right + 1] = color
    return out


def box_shot(sample: int, agreement: float, image: Tensor, eval_found: tuple[Tensor, Tensor, Tensor],
             train_found: tuple[Tensor, Tensor, Tensor], truth: Optional[tuple[Tensor, Tensor, Tensor]]) -> Shot:
    """One detection sample to picture: its image ``[C, H, W]`` with the boxes each mode finds
    (score >= 0.5) and, with targets, the target boxes."""
    height, width = image.shape[-2:]
    size = _size(height, width)
    scale = (size[0] / height, size[1] / width)
    base = image_rgb(image, size)
    labels = {*eval_found[1].tolist(), *train_found[1].tolist(), *(truth[1].tolist() if truth is not None else [])}
    return Shot(sample=sample, agreement=min(max(agreement, 0.0), 1.0), image=base,
                eval=draw_boxes(base, eval_found[0], eval_found[1], scale),
                train=draw_boxes(base, train_found[0], train_found[1], scale),
                truth=draw_boxes(base, truth[0], truth[1], scale) if truth is not None else None,
                classes=tuple(sorted(int(c) for c in labels)))


def _png(rgb: Tensor) -> str:
    """``[H, W, 3]`` uint8 as base64 PNG, rows passed through the ``up`` filter (photos and
    smooth inputs compress two to three times better)."""
    rows = rgb.to(torch.int16)
    rows[1:] = rows[1:] - rgb[:-1].to(torch.int16)
    filtered = (rows % 256).to(torch.uint8).contiguous()
    return to_base64(encode_rgb(filtered.numpy().tobytes(), rgb.shape[1], rgb.shape[0], filtered="up"))


def encode(kept: Shot) -> Picture:
    return Picture(sample=kept.sample, agreement=kept.agreement,
                   image=_png(kept.image) if kept.image is not None else None,
                   eval=_png(kept.eval), train=_png(kept.train),
                   truth=_png(kept.truth) if kept.truth is not None else None, classes=kept.classes)


def keep_worst(kept: list[Shot], limit: int = PICTURES) -> list[Shot]:
    """The ``limit`` samples of lowest pixel agreement (the earliest sample first on ties)."""
    return sorted(kept, key=lambda p: (p.agreement, p.sample))[:limit]
