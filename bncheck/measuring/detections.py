"""Detection outputs -- one dict per image with ``boxes``/``scores``/``labels``, as torchvision's
detectors return them -- compared box by box between the modes, and with targets scored per
mode (recall per image for the paired test; mAP with pycocotools through torchmetrics)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

FOUND_SCORE = 0.5
"""A box counts as found when it scores at least this (the usual display threshold)."""
MATCH_IOU = 0.5
"""Two boxes are the same object at this IoU or more, with the same label."""


def is_detections(value: Any) -> bool:
    """Per-image detections: a list or tuple of dicts, each with ``boxes`` ``[K, 4]`` and ``scores``."""
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(d, dict) and isinstance(d.get("boxes"), Tensor) and d["boxes"].dim() == 2
        and d["boxes"].shape[-1] == 4 and isinstance(d.get("scores"), Tensor) for d in value))


def is_targets(value: Any) -> bool:
    """Per-image targets: a list or tuple of dicts, each with ``boxes`` ``[K, 4]`` (and ``labels``)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(d, dict) and isinstance(d.get("boxes"), Tensor) and d["boxes"].dim() == 2
        and d["boxes"].shape[-1] == 4 for d in value))


def _labels(d: dict, n: int) -> Tensor:
    labels = d.get("labels")
    if isinstance(labels, Tensor) and labels.numel() == n:
        return labels.reshape(-1)
    return torch.zeros(n, dtype=torch.long)  # a one-class detector


def found(d: dict) -> tuple[Tensor, Tensor, Tensor]:
    """The boxes, labels and scores of one image's detections that count as found."""
    boxes, scores = d["boxes"].detach().float().cpu(), d["scores"].detach().float().cpu().reshape(-1)
    keep = scores >= FOUND_SCORE
    return boxes[keep], _labels(d, len(scores)).cpu()[keep], scores[keep]


def match(first: tuple[Tensor, Tensor, Tensor], second: tuple[Tensor, Tensor, Tensor]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, highest-scoring boxes of ``second`` first: pairs
    ``(index in first, index in second)`` of the same label at IoU >= ``MATCH_IOU``."""
    from torchvision.ops import box_iou

    boxes_a, labels_a, _ = first
    boxes_b, labels_b, scores_b = second
    if not len(boxes_a) or not len(boxes_b):
        return []
    iou = box_iou(boxes_b, boxes_a)
    iou[labels_b[:, None] != labels_a[None, :]] = -1.0
    taken = torch.zeros(len(boxes_a), dtype=torch.bool)
    pairs = []
    for j in scores_b.argsort(descending=True).tolist():
        row = iou[j].masked_fill(taken, -1.0)
        best = int(row.argmax())
        if float(row[best]) >= MATCH_IOU:
            taken[best] = True
            pairs.append((best, j))
    return pairs


def anywise(boxes: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The same boxes with one label for all: matched by place alone."""
    return boxes[0], torch.zeros_like(boxes[1]), boxes[2]


def target_boxes(target: dict) -> tuple[Tensor, Tensor, Tensor]:
    boxes = target["boxes"].detach().float().cpu()
    return boxes, _labels(target, len(boxes)).cpu(), torch.ones(len(boxes))


def host(detections: Any) -> list[dict]:
    """Detections (or targets) with their tensors on the host, for mAP at the end of the run."""
    return [{k: v.detach().cpu() for k, v in d.items() if isinstance(v, Tensor) and k in ("boxes", "scores", "labels")}
            for d in detections]


def mean_average_precision(predictions: list[dict], targets: list[dict]) -> Optional[tuple[float, float]]:
    """mAP@0.5 and mAP@[.5:.95] (COCO's, by pycocotools through torchmetrics); None when those
    libraries are not installed (``pip install bncheck[detection]``) or nothing can be scored."""
    try:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    except (ImportError, ModuleNotFoundError, TypeError, ValueError):
        return None
    metric.warn_on_many_detections = False  # COCO scores the 100 best boxes per image, as it should
    preds = [{"boxes": p["boxes"].float(), "scores": p["scores"].float(),
              "labels": _labels(p, len(p["boxes"]))} for p in predictions]
    truth = [{"boxes": t["boxes"].float(), "labels": _labels(t, len(t["boxes"]))} for t in targets]
    if not any(len(t["boxes"]) for t in truth):
        return None
    metric.update(preds, truth)
    scores = metric.compute()
    values = float(scores["map_50"]), float(scores["map"])
    return tuple(max(v, 0.0) for v in values)  # -1: no object of any class (handled above)


YOLO_SCORE = 0.05
"""Decoded YOLO boxes kept from this class score up (torchvision's detectors drop boxes under
0.05 the same way); a box counts as found from ``FOUND_SCORE``."""
YOLO_NMS_IOU = 0.7
"""Non-maximum suppression per class at this IoU (ultralytics' default)."""
YOLO_MAX_BOXES = 300
"""Boxes kept per image after NMS (ultralytics' and COCO's limit)."""


def yolo_detections(value: Any) -> Optional[list[dict]]:
    """An ultralytics YOLO detection head's eval-mode output, ``(y, extra)`` with ``y`` of shape
    ``[N, 4 + classes, anchors]`` (box centre/size in input pixels, then class probabilities),
    decoded into one ``{"boxes", "scores", "labels"}`` per image as ultralytics' own prediction
    does (best class per anchor, NMS per class); None for any other output. Recognised only by
    its exact structure: ``extra`` holds the per-class ``scores`` of the same anchors (ultralytics
    8.4: ``{'boxes', 'scores', 'feats'}``) or the feature maps whose positions are the anchors
    (earlier releases: a list of ``[N, C, h, w]``)."""
    from torchvision.ops import batched_nms, box_convert

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    y, extra = value
    if not isinstance(y, Tensor) or y.dim() != 3 or not y.is_floating_point():
        return None
    _, channels, anchors = y.shape
    classes = channels - 4
    if classes < 1 or anchors <= channels:
        return None
    if isinstance(extra, dict):
        scores = extra.get("scores")
        if not (isinstance(scores, Tensor) and scores.dim() == 3 and tuple(scores.shape[1:]) == (classes, anchors)):
            return None
    elif isinstance(extra, (list, tuple)) and extra and all(isinstance(t, Tensor) and t.dim() == 4 for t in extra):
        if sum(t.shape[2] * t.shape[3] for t in extra) != anchors:
            return None
    else:
        return None
    out = []
    for row in y.detach().float():
        score, label = row[4:].max(0)
        keep = torch.nonzero(score >= YOLO_SCORE).flatten()
        boxes = box_convert(row[:4, keep].T, "cxcywh", "xyxy")
        kept = batched_nms(boxes, score[keep], label[keep], YOLO_NMS_IOU)[:YOLO_MAX_BOXES]
        out.append({"boxes": boxes[kept], "scores": score[keep][kept], "labels": label[keep][kept]})
    return out
