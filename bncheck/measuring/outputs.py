"""How far the model's outputs move between train and eval mode, tallied over batches."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from bncheck.judging.metrics import class_iou, mcnemar_p, mean_iou, softmax_divergence, squared_norms
from bncheck.measuring.batches import IGNORE_INDEX, tensors
from bncheck.measuring.detections import (
    anywise,
    found,
    host,
    is_detections,
    is_targets,
    match,
    mean_average_precision,
    target_boxes,
    yolo_detections,
)
from bncheck.measuring.distributed import pooled
from bncheck.measuring.pictures import box_shot, keep_worst, shot
from bncheck.reporting.report import OutputDivergence


def is_logits(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 2 and value.shape[1] >= 2


def class_rows(value: Any, batch: Optional[int]) -> Any:
    """Per-position class scores as rows: ``[batch, classes]`` as it is, and a time-major
    sequence ``[T, batch, classes]`` (CTC log-probabilities of OCR and ASR models) as
    ``[batch * T, classes]`` -- the batch dimension found from the batch size fed in, never
    assumed to be dim 0. Other shapes are returned unchanged (compared as tensors)."""
    if time_major(value, batch):
        return value.transpose(0, 1).reshape(-1, value.shape[2])
    return value


def time_major(value: Any, batch: Optional[int]) -> bool:
    """A ``[T, batch, classes]`` output: 3-D, the batch size fed in at dim 1 and not at dim 0."""
    return (batch is not None and isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 3
            and value.shape[1] == batch and value.shape[0] != batch and value.shape[2] >= 2)


def is_dense(value: Any) -> bool:
    """Per-pixel (per-voxel) class scores: ``[N, C, H, W]`` or ``[N, C, D, H, W]`` with C >= 2
    (segmentation heads). 3-D outputs stay ambiguous (``[N, C, L]`` or ``[N, L, C]``) and are
    not read as dense."""
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 4 and value.shape[1] >= 2


def is_binary_dense(value: Any) -> bool:
    """One score per pixel, ``[N, 1, H, W]`` (or ``[N, 1, D, H, W]``): a binary mask's logit
    when masks label it (it may as well be a depth or density map, so never without)."""
    return (isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 4 and value.shape[1] == 1
            and value[0, 0].numel() > 1)


def two_class(value: Tensor) -> Tensor:
    """A sigmoid logit ``x`` as the two-class logits ``[0, x]``: their softmax is ``[1 - s, s]``
    with ``s = sigmoid(x)``, so every per-pixel classifier measure applies as it is."""
    return torch.cat([torch.zeros_like(value), value], 1)


def binary_masks(masks: Tensor) -> Tensor:
    """Binary masks stored as 0/255 (a common PNG convention) read with 255 as the foreground
    when no pixel of the batch holds 1; 0/1 masks (and 255 beside 1: ignored) as they are."""
    if bool((masks == IGNORE_INDEX).any()) and not bool((masks == 1).any()):
        return torch.where(masks == IGNORE_INDEX, torch.ones_like(masks), masks)
    return masks


def as_masks(labels: Any, output: Any) -> Any:
    """Masks as MONAI and smp pipelines hand them over -- ``[N, 1, *spatial]`` beside a dense
    output, often float -- as ``[N, *spatial]`` class indices; anything else unchanged."""
    if not (isinstance(labels, Tensor) and isinstance(output, Tensor) and output.dim() >= 4
            and labels.dim() == output.dim() and labels.shape[0] == output.shape[0] and labels.shape[1] == 1):
        return labels
    labels = labels[:, 0]
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            return labels  # probabilities or soft labels: not class indices
        labels = labels.long()
    return labels.as_subclass(Tensor) if type(labels) is not Tensor else labels


def is_mask_batch(labels: Any, output: Tensor) -> bool:
    """``labels`` are class-index masks for the dense ``output`` (one per sample, its spatial rank)."""
    return (isinstance(labels, Tensor) and not labels.is_floating_point() and labels.dim() == output.dim() - 1
            and labels.shape[0] == output.shape[0])


CHOICE: ContextVar[Optional[str]] = ContextVar("bncheck_output_choice", default=None)
"""The part of the model's output the user picked (``--output``, ``analyze(output=...)``)."""


@contextmanager
def choosing(spec: Optional[str]) -> Iterator[None]:
    """Within the block, every output comparison reads the part ``spec`` names (a key or an
    index, dotted for nesting: ``logits``, ``1``, ``0.out``); None: found automatically."""
    token = CHOICE.set(spec)
    try:
        yield
    finally:
        CHOICE.reset(token)


def is_probabilities(value: Any) -> bool:
    """Class probabilities: non-negative scores that sum to 1 over the class dimension."""
    if not (isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 2 and value.shape[1] >= 2):
        return False
    probe = value.detach()[:64]
    if probe.dim() > 2:  # a dense output: a few thousand positions of the first images tell
        probe = probe[:4].flatten(2)[..., :4096]
    probe = probe.double()
    return bool(probe.isfinite().all() and (probe >= 0).all() and ((probe.sum(1) - 1).abs() < 1e-3).all())


def as_logits(value: Any) -> Any:
    """Probabilities as log-probabilities: their softmax is the probabilities themselves, so
    they are compared as probabilities (a softmax of probabilities would flatten them)."""
    if is_probabilities(value):
        return value.clamp_min(torch.finfo(value.dtype).tiny).log()
    return value


def _part(value: Any, key: str) -> Any:
    if isinstance(value, dict) or hasattr(value, "keys"):
        if key in value:
            return value[key]
    elif isinstance(value, (list, tuple)) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
        return value[int(key)]
    attribute = getattr(value, key, None) if not isinstance(value, (dict, list, tuple, Tensor)) else None
    if attribute is not None:
        return attribute
    raise KeyError(key)


def _parts_of(value: Any) -> str:
    if isinstance(value, dict) or hasattr(value, "keys"):
        return "keys " + ", ".join(map(str, list(value.keys())[:12]))
    if isinstance(value, (list, tuple)):
        return f"indices 0..{len(value) - 1}"
    return f"a {type(value).__name__}"


def picked(value: Any, spec: str) -> Any:
    """The part of ``value`` that ``spec`` names; InputError naming what there is instead."""
    from bncheck.errors import InputError

    here = value
    for step in spec.split("."):
        try:
            here = _part(here, step)
        except KeyError:
            raise InputError(f"$output {spec}: the model's output has no {step!r} (it has {_parts_of(here)}); "
                             "pick one of those, dotted for nesting") from None
    return here


def prediction(value: Any) -> tuple[Any, Optional[str]]:
    """The prediction inside a model output and where it was found (None: the output itself).

    With ``--output``: that part. Otherwise: ``logits`` or ``out`` of a dict or model-output
    object (torchvision segmentation's ``out``, Hugging Face's ``logits``); in a tuple or list
    the first class-score tensor that is not probabilities (ultralytics classifiers return
    ``(probabilities, logits)`` in eval mode), else the first probabilities. Probabilities are
    returned as log-probabilities, so they are compared as probabilities."""
    spec = CHOICE.get()
    if spec is not None:
        return as_logits(picked(value, spec)), f"output.{spec} (--output)"
    if isinstance(value, Tensor):
        return (as_logits(value), "probabilities") if is_probabilities(value) else (value, None)
    if isinstance(value, dict) or hasattr(value, "keys") and not isinstance(value, (list, tuple)):
        for key in ("logits", "out"):
            inner = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
            if is_logits(inner) or is_dense(inner):
                return as_logits(inner), f"output[{key!r}]"
        return value, None
    if isinstance(value, (list, tuple)):
        decoded = yolo_detections(value)
        if decoded is not None:
            return decoded, "output[0] (YOLO boxes and class scores, decoded as ultralytics predicts: NMS per class)"
        scores = [(i, t) for i, t in enumerate(value) if is_logits(t) or is_dense(t)]
        for i, t in scores:
            if not is_probabilities(t):
                return t, f"output[{i}]" + (" (logits; the probabilities beside them skipped)" if any(
                    is_probabilities(other) for _, other in scores) else "")
        if scores:
            i, t = scores[0]
            return as_logits(t), f"output[{i}] (probabilities)"
        return value, None
    inner = getattr(value, "logits", None)
    if is_logits(inner) or is_dense(inner):
        return as_logits(inner), "output.logits"
    return value, None


def logits_of(value: Any) -> Any:
    """The prediction inside a model output (``prediction``), without where it was found."""
    return prediction(value)[0]


def pixel_rows(value: Tensor) -> Tensor:
    """``[N, C, ...]`` as one row of C class scores per pixel: ``[N * positions, C]``."""
    return value.movedim(1, -1).reshape(-1, value.shape[1])


PIXEL_CHUNK = 1 << 20
"""Class scores (pixels x classes) whose softmaxes are compared at once in float64 (8 MiB per
intermediate): bounds the memory of a 512x512 batch, whatever the number of classes."""


def dense_divergence(train_out: Tensor, eval_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample means of the per-pixel KL, JS and top-1 agreement of two dense outputs,
    computed image by image, a chunk of pixels at a time, from views (``[N]`` each): no copy of
    the whole output is made."""
    n, classes = train_out.shape[0], train_out.shape[1]
    rows = max(1, PIXEL_CHUNK // classes)
    means = torch.zeros(3, n, dtype=torch.float64)
    for i in range(n):
        pixels_train = train_out[i].reshape(classes, -1).T  # [pixels, classes], a view
        pixels_eval = eval_out[i].reshape(classes, -1).T
        total = pixels_train.shape[0]
        for start in range(0, total, rows):
            parts = softmax_divergence(pixels_train[start:start + rows], pixels_eval[start:start + rows])
            for row, value in enumerate(parts):
                means[row, i] += float(value.sum())
        means[:, i] /= max(total, 1)
    kl, js, agree = means
    return kl, js, agree


def _pooled_kind(kinds: list[Optional[str]]) -> Optional[str]:
    """Ranks agree on what their outputs are, or nothing is compared."""
    seen = {kind for kind in kinds if kind is not None}
    return "none" if "none" in seen or len(seen) > 1 else next(iter(seen), None)


@dataclass
class OutputTally:
    """Output divergence between modes, summed over batches; every field declares how it pools
    across ranks (``distributed.pooled``), so tallies from several processes add up."""

    kind: Optional[str] = pooled(_pooled_kind, default=None)
    samples: int = pooled("sum", default=0)
    kl: float = pooled("sum", default=0.0)
    js: float = pooled("sum", default=0.0)
    agree: float = pooled("sum", default=0.0)
    diff_sq: float = pooled("sum", default=0.0)
    ref_sq: float = pooled("sum", default=0.0)
    labeled: int = pooled("sum", default=0)
    train_correct: int = pooled("sum", default=0)
    eval_correct: int = pooled("sum", default=0)
    train_only: int = pooled("sum", default=0)
    """Labelled samples right in train mode and wrong in eval mode (McNemar's discordant pairs)."""
    eval_only: int = pooled("sum", default=0)
    """Labelled samples right in eval mode and wrong in train mode."""
    classes: int = pooled("max", default=0)
    """Width of the class dimension."""
    eval_confidence: float = pooled("sum", default=0.0)
    """Sum of the eval-mode top softmax probability."""
    eval_predicted: Counter = pooled("sum", default_factory=Counter)
    """Eval-mode predictions per class (a sample of one class shows as one class, confidently)."""
    train_predicted: Counter = pooled("sum", default_factory=Counter)
    train_confusion: Counter = pooled("sum", default_factory=Counter)
    """With masks: ``truth * classes + predicted`` -> pixels, train mode (a streamed confusion matrix)."""
    eval_confusion: Counter = pooled("sum", default_factory=Counter)
    per: Optional[str] = pooled("first", default=None)
    """``pixel`` when the outputs are per-pixel class scores (segmentation): rows are pixels."""
    images: int = pooled("sum", default=0)
    """Samples fed (``samples`` counts rows: pixels of a dense output, time steps of a sequence)."""
    pixels_labeled: int = pooled("sum", default=0)
    """Mask pixels that are not ignored (the denominator of pixel accuracy)."""
    boxes_train: int = pooled("sum", default=0)
    """Detection: boxes found (score >= 0.5) in train mode, over every image."""
    boxes_eval: int = pooled("sum", default=0)
    boxes_matched: int = pooled("sum", default=0)
    """Boxes found in both modes (the same label, IoU >= 0.5, matched one to one)."""
    score_shift: float = pooled("sum", default=0.0)
    """Sum over matched boxes of |eval score - train score|."""
    objects: int = pooled("sum", default=0)
    """Target boxes (detection with targets): the denominator of recall."""
    train_located: int = pooled("sum", default=0)
    """Target boxes a train-mode box sits on (IoU >= 0.5) whatever its label."""
    det_train: list = pooled("cat", default_factory=list)
    """Train-mode detections per image (with targets only: for mAP at the end)."""
    det_eval: list = pooled("cat", default_factory=list)
    det_targets: list = pooled("cat", default_factory=list)
    source: Optional[str] = pooled("first", default=None)
    """Where in the model's output the compared prediction was found (None: the output itself)."""
    binary: bool = pooled("any", default=False)
    """Dense outputs of one channel read as sigmoid logits of a binary mask (masks given)."""
    keep_pictures: int = pooled("max", default=0)
    """How many samples to picture (segmentation): 0 for the tallies of later passes."""
    worst: list = pooled(lambda ranks: keep_worst([p for part in ranks for p in part]), default_factory=list)
    """Pictures of the samples of lowest pixel agreement so far (at most ``keep_pictures``)."""
    counted: int = pooled("sum", default=0)
    """Samples whose outputs were checked for NaN/Inf (every kind of output)."""
    eval_nonfinite: int = pooled("sum", default=0)
    """Samples whose eval-mode output holds NaN/Inf: deployment outputs nothing usable for them."""
    train_nonfinite: int = pooled("sum", default=0)
    keep_values: bool = pooled("any", default=False)
    """Record each sample's KL (``values``): the passes that may stop early need their spread."""
    values: list = pooled("cat", default_factory=list)
    """With ``keep_values``: per-sample KL (classifier rows; each image's pixel mean for a dense
    output), in order; their mean is the tally's ``kl``."""

    def add(self, out_train: Any, out_eval: Any, labels: Optional[Tensor], batch: Optional[int] = None,
            inputs: Any = None) -> None:
        """One batch: both modes' outputs, its labels (class indices, masks) if any, the batch
        size fed in and, for pictures of a segmentation run, the inputs."""
        self._count_nonfinite(out_train, out_eval, batch)
        (out_train, source), (out_eval, eval_source) = prediction(out_train), prediction(out_eval)
        self.source = self.source or eval_source or source
        if is_detections(out_train) and is_detections(out_eval) and len(out_train) == len(out_eval):
            self._add_detections(out_train, out_eval, labels if is_targets(labels) else None, inputs)
            return
        labels = as_masks(labels, out_train)
        if not isinstance(labels, (Tensor, type(None))):
            labels = None  # detection targets beside outputs that are not detections
        if (is_binary_dense(out_train) and is_binary_dense(out_eval) and out_train.shape == out_eval.shape
                and is_mask_batch(labels, out_train)):
            out_train, out_eval, labels = two_class(out_train), two_class(out_eval), binary_masks(labels)
            self.binary = True
        if is_dense(out_train) and is_dense(out_eval) and out_train.shape == out_eval.shape:
            self._add_dense(out_train, out_eval, labels, inputs)
            return
        out_train, out_eval = class_rows(out_train, batch), class_rows(out_eval, batch)
        if batch is not None and labels is not None and is_logits(out_train) and out_train.shape[0] != batch \
                and labels.shape[0] != out_train.shape[0]:
            labels = None  # per-sample labels do not label each time step (per-node labels label each node)
        if is_logits(out_train) and is_logits(out_eval) and out_train.shape == out_eval.shape:
            kind = "classifier"
        else:
            kind = "tensor"
        if self.kind not in (None, kind) or self.per == "pixel":
            self.kind = "none"
        if self.kind == "none":
            return
        self.kind = kind
        fed = batch if batch is not None else next((t.shape[0] for t in tensors(out_train) if t.dim()), 1)
        self.images += fed
        if kind == "classifier":
            kl, js, agree = softmax_divergence(out_train, out_eval)
            if self.keep_values:
                self.values.extend(kl.tolist())
            self.kl += float(kl.sum())
            self.js += float(js.sum())
            self.agree += float(agree.sum())
            self.samples += out_train.shape[0]  # rows: samples, or samples x time steps of a sequence
            self._add_tensor_pair(out_train, out_eval)
            self.classes = max(self.classes, int(out_train.shape[1]))
            train_pred, eval_pred = out_train.argmax(-1), out_eval.argmax(-1)
            self.eval_confidence += float(torch.softmax(out_eval.detach().double(), -1).amax(-1).sum())
            self.eval_predicted.update(eval_pred.tolist())
            self.train_predicted.update(train_pred.tolist())
            if labels is not None and labels.dim() == 1 and labels.shape[0] == out_train.shape[0]:
                labels = labels.to(out_train.device)
                train_ok, eval_ok = train_pred == labels, eval_pred == labels
                self.labeled += labels.shape[0]
                self.train_correct += int(train_ok.sum())
                self.eval_correct += int(eval_ok.sum())
                self.train_only += int((train_ok & ~eval_ok).sum())
                self.eval_only += int((eval_ok & ~train_ok).sum())
            return
        train_parts, eval_parts = tensors(out_train), tensors(out_eval)
        if not train_parts or len(train_parts) != len(eval_parts) or any(
            a.shape != b.shape for a, b in zip(train_parts, eval_parts)
        ):
            self.kind = "none"
            return
        for a, b in zip(train_parts, eval_parts):
            self._add_tensor_pair(a, b)

    def _add_dense(self, out_train: Tensor, out_eval: Tensor, masks: Optional[Tensor] = None,
                   inputs: Any = None) -> None:
        """A segmentation output: each pixel is a classifier. Agreement and KL are averaged over
        pixels; with masks (``[N, H, W]`` class indices, ``IGNORE_INDEX`` ignored) each mode's
        confusion matrix and, per image, which mode labelled more pixels right (the paired
        test is over images: pixels of one image are not independent samples)."""
        if self.kind not in (None, "classifier") or self.per not in (None, "pixel"):
            self.kind = "none"
            return
        self.kind, self.per = "classifier", "pixel"
        kl, js, agree = dense_divergence(out_train, out_eval)
        masks = masks if is_mask_batch(masks, out_train) else None
        if self.keep_pictures:
            self._picture(out_train, out_eval, masks, inputs, agree)
        pixels = out_train[0, 0].numel()
        if self.keep_values:
            self.values.extend(kl.tolist())
        self.kl += float(kl.sum()) * pixels
        self.js += float(js.sum()) * pixels
        self.agree += float(agree.sum()) * pixels
        self.samples += out_train.shape[0] * pixels
        self.images += out_train.shape[0]
        self.classes = max(self.classes, int(out_train.shape[1]))
        self._add_tensor_pair(out_train, out_eval)
        if masks is not None:
            self._add_masks(out_train, out_eval, masks)

    def _add_detections(self, out_train: list, out_eval: list, targets: Optional[list], inputs: Any = None) -> None:
        """Per-image detections: boxes found in both modes, in one only, and how far the scores
        of the same box moved; with targets, the target boxes each mode finds per image (the
        paired test is over images) and every detection kept for mAP."""
        if self.kind not in (None, "detection") or len(out_train) != len(out_eval):
            self.kind = "none"
            return
        self.kind = "detection"
        if targets is not None and len(targets) != len(out_train):
            targets = None
        images = list(inputs) if isinstance(inputs, (list, tuple, Tensor)) and len(inputs) == len(out_train) else None
        for i, (train, evaluated) in enumerate(zip(out_train, out_eval)):
            kept_train, kept_eval = found(train), found(evaluated)
            pairs = match(kept_train, kept_eval)
            self.boxes_train += len(kept_train[0])
            self.boxes_eval += len(kept_eval[0])
            self.boxes_matched += len(pairs)
            self.score_shift += sum(abs(float(kept_eval[2][j]) - float(kept_train[2][k])) for k, j in pairs)
            truth = target_boxes(targets[i]) if targets is not None else None
            if self.keep_pictures and images is not None and isinstance(images[i], Tensor) and images[i].dim() == 3:
                boxes = len(kept_train[0]) + len(kept_eval[0])
                agreement = 2 * len(pairs) / boxes if boxes else 1.0
                if len(self.worst) < self.keep_pictures or agreement < self.worst[-1].agreement:
                    pictured = box_shot(self.images + i, agreement, images[i], kept_eval, kept_train, truth)
                    self.worst = keep_worst([*self.worst, pictured], self.keep_pictures)
            if truth is None:
                continue
            right_train, right_eval = len(match(truth, kept_train)), len(match(truth, kept_eval))
            self.train_located += right_train if right_train == len(truth[0]) else len(match(anywise(truth),
                                                                                              anywise(kept_train)))
            self.objects += len(truth[0])
            self.labeled += 1
            self.train_correct += right_train
            self.eval_correct += right_eval
            self.train_only += int(right_train > right_eval)
            self.eval_only += int(right_eval > right_train)
        self.images += len(out_train)
        self.samples += len(out_train)
        if targets is not None:
            self.det_train += host(out_train)
            self.det_eval += host(out_eval)
            self.det_targets += host(targets)

    def _picture(self, out_train: Tensor, out_eval: Tensor, masks: Optional[Tensor], inputs: Any,
                 agree: Tensor) -> None:
        """Pictures of this batch's samples that are among the worst so far (before
        ``images`` counts the batch: it numbers the samples)."""
        image = inputs if isinstance(inputs, Tensor) and inputs.dim() == out_train.dim() \
            and inputs.shape[0] == out_train.shape[0] else None
        for i in agree.argsort()[: self.keep_pictures].tolist():
            value = float(agree[i])
            if len(self.worst) >= self.keep_pictures and value >= self.worst[-1].agreement:
                break
            kept = shot(self.images + i, value, image[i] if image is not None else None,
                        out_eval[i].argmax(0), out_train[i].argmax(0), masks[i] if masks is not None else None)
            self.worst = keep_worst([*self.worst, kept], self.keep_pictures)

    def _add_masks(self, out_train: Tensor, out_eval: Tensor, masks: Tensor) -> None:
        from bncheck.errors import InputError

        masks = masks.to(out_train.device).long()
        classes = out_train.shape[1]
        if tuple(masks.shape[1:]) != tuple(out_train.shape[2:]):  # logits at reduced resolution (Hugging Face)
            mode = "bilinear" if masks.dim() == 3 else "trilinear"
            out_train = torch.nn.functional.interpolate(out_train.float(), size=tuple(masks.shape[1:]), mode=mode,
                                                        align_corners=False)
            out_eval = torch.nn.functional.interpolate(out_eval.float(), size=tuple(masks.shape[1:]), mode=mode,
                                                       align_corners=False)
        valid = masks != IGNORE_INDEX
        truth = masks[valid]
        if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= classes):
            bad = int(truth.max()) if int(truth.max()) >= classes else int(truth.min())
            raise InputError(f"a mask holds class index {bad}, but the model outputs {classes} classes per pixel; "
                             f"masks must hold 0..{classes - 1} (or {IGNORE_INDEX} for pixels to ignore)")
        per_image = valid.reshape(valid.shape[0], -1).sum(1)
        right = {}
        for mode, out, confusion in (("train", out_train, self.train_confusion),
                                     ("eval", out_eval, self.eval_confusion)):
            predicted = out.argmax(1)
            cells = torch.bincount(truth * classes + predicted[valid], minlength=classes * classes)
            hit = cells.nonzero().flatten()
            confusion.update(dict(zip(hit.tolist(), cells[hit].tolist())))
            right[mode] = ((predicted == masks) & valid).reshape(valid.shape[0], -1).sum(1)
        scored = per_image > 0
        self.labeled += int(scored.sum())
        self.train_correct += int(right["train"].sum())
        self.eval_correct += int(right["eval"].sum())
        self.pixels_labeled += int(per_image.sum())
        self.train_only += int((scored & (right["train"] > right["eval"])).sum())
        self.eval_only += int((scored & (right["eval"] > right["train"])).sum())

    def _count_nonfinite(self, out_train: Any, out_eval: Any, batch: Optional[int]) -> None:
        """Samples with NaN/Inf anywhere in their output, per mode, whatever the output is (a
        running variance below zero makes eval mode output NaN while train mode is fine)."""
        def nonfinite_rows(part: Tensor) -> Tensor:
            """Per row, whether it holds NaN/Inf: a NaN or Inf makes the row's sum non-finite,
            so only rows whose sum is not finite (or overflowed) are looked at element-wise --
            no mask as large as the output (a segmentation batch's is hundreds of MiB)."""
            if not part.numel():  # a detector that found no box in an image: nothing to check
                return torch.zeros(part.shape[0], dtype=torch.bool, device=part.device)
            rows = part.detach().reshape(part.shape[0], -1)
            suspect = ~rows.sum(-1).isfinite()
            if bool(suspect.any()):
                suspect[suspect.clone()] = ~rows[suspect].isfinite().all(-1)
            return suspect

        def bad(output: Any) -> Optional[Tensor]:
            flags = None
            for part in tensors(output):
                if not (part.is_floating_point() or part.is_complex()) or part.dim() == 0:
                    continue
                rows = nonfinite_rows(part)
                if batch is not None and part.shape[0] != batch:
                    rows = rows.any().reshape(1).expand(batch)
                flags = rows if flags is None or flags.shape != rows.shape else flags | rows
            return flags

        train_bad, eval_bad = bad(out_train), bad(out_eval)
        if eval_bad is None:
            return
        self.counted += int(eval_bad.numel())
        self.eval_nonfinite += int(eval_bad.sum())
        if train_bad is not None:
            self.train_nonfinite += int(train_bad.sum())

    def _add_tensor_pair(self, a: Tensor, b: Tensor) -> None:
        if a.is_floating_point() or a.is_complex():
            diff, ref = squared_norms(a, b)
            self.diff_sq += diff
            self.ref_sq += ref

    def result(self) -> OutputDivergence:
        counts = {"eval_nonfinite": self.eval_nonfinite, "train_nonfinite": self.train_nonfinite,
                  "outputs_counted": self.counted} if self.counted else {}
        if self.kind in (None, "none"):
            return OutputDivergence(kind="none", **counts)
        if self.kind == "detection":
            return self._detection_result(counts)
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else None
        if self.kind == "tensor":
            return OutputDivergence(kind="tensor", relative_l2=rel, source=self.source, **counts)
        n = max(self.samples, 1)
        if self.per == "pixel":
            labelled: dict[str, Any] = {}
            if self.pixels_labeled:
                train_iou, eval_iou = (class_iou(c, self.classes) for c in (self.train_confusion, self.eval_confusion))
                labelled = dict(
                    train_accuracy=self.train_correct / self.pixels_labeled,
                    eval_accuracy=self.eval_correct / self.pixels_labeled,
                    labeled=self.labeled, train_only_correct=self.train_only, eval_only_correct=self.eval_only,
                    accuracy_gap_p=mcnemar_p(self.train_only, self.eval_only),
                    train_miou=mean_iou(train_iou), eval_miou=mean_iou(eval_iou),
                    train_class_iou=train_iou, eval_class_iou=eval_iou)
            return OutputDivergence(kind="classifier", per="pixel", kl=self.kl / n, js=self.js / n,
                                    top1_agreement=self.agree / n, relative_l2=rel, classes=self.classes or None,
                                    images=self.images or None, binary=self.binary or None, source=self.source,
                                    **labelled, **counts)
        top_class, top_count = (self.eval_predicted.most_common(1) or [(None, 0)])[0]
        train_top = (self.train_predicted.most_common(1) or [(None, 0)])[0][1]
        return OutputDivergence(
            kind="classifier",
            kl=self.kl / n,
            js=self.js / n,
            top1_agreement=self.agree / n,
            relative_l2=rel,
            train_accuracy=self.train_correct / self.labeled if self.labeled else None,
            eval_accuracy=self.eval_correct / self.labeled if self.labeled else None,
            labeled=self.labeled or None,
            train_only_correct=self.train_only if self.labeled else None,
            eval_only_correct=self.eval_only if self.labeled else None,
            accuracy_gap_p=mcnemar_p(self.train_only, self.eval_only) if self.labeled else None,
            classes=self.classes or None,
            eval_top_class=top_class,
            eval_top_class_share=top_count / n if self.samples else None,
            train_top_class_share=train_top / n if self.samples else None,
            eval_confidence=self.eval_confidence / n if self.samples else None,
            source=self.source,
            **counts,
        )


    def _detection_result(self, counts: dict) -> OutputDivergence:
        boxes = self.boxes_train + self.boxes_eval
        labelled: dict[str, Any] = {}
        if self.labeled:
            labelled = dict(labeled=self.labeled, train_only_correct=self.train_only, eval_only_correct=self.eval_only,
                            accuracy_gap_p=mcnemar_p(self.train_only, self.eval_only),
                            train_accuracy=self.train_correct / self.objects if self.objects else None,
                            eval_accuracy=self.eval_correct / self.objects if self.objects else None,
                            objects=self.objects, train_located=self.train_located)
            train_map = mean_average_precision(self.det_train, self.det_targets)
            eval_map = mean_average_precision(self.det_eval, self.det_targets)
            if train_map is not None and eval_map is not None:
                labelled.update(train_map50=train_map[0], eval_map50=eval_map[0], train_map=train_map[1],
                                eval_map=eval_map[1])
        return OutputDivergence(
            kind="detection", images=self.images or None, boxes_train=self.boxes_train, boxes_eval=self.boxes_eval,
            boxes_matched=self.boxes_matched, box_agreement=2 * self.boxes_matched / boxes if boxes else 1.0,
            score_shift=self.score_shift / self.boxes_matched if self.boxes_matched else None,
            source=self.source, **labelled, **counts)


def output_gap(output: OutputDivergence) -> Optional[float]:
    """The output gap between modes that a fix tries to close: mean KL for classifiers,
    relative L2 otherwise; None when there is none to close."""
    if output.kind == "detection":
        value = 1.0 - output.box_agreement if output.box_agreement is not None else None
        return value if value is not None and value > 0 else None
    value = output.kl if output.kind == "classifier" else output.relative_l2
    return value if value is not None and math.isfinite(value) and value > 0 else None


def gap_value(out: OutputDivergence) -> Optional[float]:
    """The modes' disagreement as one number that batch noise adds to linearly: mean KL for
    classifiers, the share of boxes not found in both modes for detectors, squared relative L2
    for other outputs; None when there is none."""
    if out.kind == "classifier":
        return out.kl
    if out.kind == "detection" and out.box_agreement is not None:
        return 1.0 - out.box_agreement
    if out.kind == "tensor" and out.relative_l2 is not None:
        return out.relative_l2**2
    return None
