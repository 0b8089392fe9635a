"""Detection outputs (issue 29, part 3): per-image dicts of boxes/scores/labels compared box by
box between the modes; with ``(images, targets)`` batches, recall per image for the paired test
and mAP per mode (pycocotools through torchmetrics). A toy detector whose boxes are read off a
BN-normalised heat map makes the truth computable by hand; torchvision's real detectors (BN in
their backbones when built without weights) run end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bncheck
from bncheck.measuring.detections import found, match
from bncheck.measuring.outputs import OutputTally
from bncheck.reporting.render import render

CELL = 8


class HeatDetector(nn.Module):
    """Brightness per 8x8 cell, normalised by BN: a cell scoring sigmoid(3 * (z - 3)) >= 0.05
    is a box of label 1 (torchvision's detectors drop boxes under 0.05 the same way)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(CELL)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        x = torch.stack(images).mean(1, keepdim=True)
        z = self.bn(self.pool(x))[:, 0]
        scores = torch.sigmoid(3 * (z - 3))
        out = []
        for heat in scores:
            rows, cols = torch.nonzero(heat >= 0.05, as_tuple=True)
            boxes = torch.stack([cols * CELL, rows * CELL, (cols + 1) * CELL, (rows + 1) * CELL], 1).float()
            out.append({"boxes": boxes, "scores": heat[rows, cols], "labels": torch.ones(len(rows), dtype=torch.long)})
        return out


def scenes(n: int, seed: int, level: float = 1.0) -> tuple[list[torch.Tensor], list[dict]]:
    """Dark 64x64 images with 1-3 bright 8x8 squares on the cell grid, and their targets."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        x = torch.rand(3, 64, 64, generator=g) * 0.2
        cells = torch.randperm(64, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]
        boxes = []
        for c in cells.tolist():
            r, col = divmod(c, 8)
            x[:, r * CELL:(r + 1) * CELL, col * CELL:(col + 1) * CELL] += 0.8
            boxes.append([col * CELL, r * CELL, (col + 1) * CELL, (r + 1) * CELL])
        images.append(x * level)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(len(boxes),
                                                                                             dtype=torch.long)})
    return images, targets


def calibrated() -> HeatDetector:
    model = HeatDetector()
    model.train()
    images, _ = scenes(64, 0)
    with torch.no_grad():
        model.bn.momentum = None
        model(images)
    return model.eval()


def batches(images: list, targets: list, size: int = 8) -> list:
    return [(images[i:i + size], targets[i:i + size]) for i in range(0, len(images), size)]


def test_boxes_match_one_to_one_by_label_and_iou() -> None:
    a = (torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.]]), torch.tensor([1, 1]), torch.tensor([0.9, 0.8]))
    b = (torch.tensor([[1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.]]), torch.tensor([1, 1, 2]),
         torch.tensor([0.7, 0.95, 0.9]))
    # b's 0.95 box takes a[0] (IoU 1); b's 0.7 box overlaps a[0] too but it is taken; b[2] has another label
    assert match(a, b) == [(0, 1)]
    kept = found({"boxes": b[0], "scores": torch.tensor([0.7, 0.3, 0.9]), "labels": b[1]})
    assert len(kept[0]) == 2 and kept[2].tolist() == pytest.approx([0.7, 0.9])


def test_a_tally_counts_boxes_found_in_both_modes_by_hand() -> None:
    box = {"boxes": torch.tensor([[0, 0, 8, 8.], [8, 8, 16, 16]]), "scores": torch.tensor([0.9, 0.6]),
           "labels": torch.tensor([1, 1])}
    moved = {"boxes": torch.tensor([[0, 0, 8, 8.], [40, 40, 48, 48]]), "scores": torch.tensor([0.7, 0.8]),
             "labels": torch.tensor([1, 1])}
    tally = OutputTally()
    tally.add([box], [moved], [{"boxes": torch.tensor([[8, 8, 16, 16.]]), "labels": torch.tensor([1])}], batch=1)
    out = tally.result()
    assert out.kind == "detection" and out.boxes_train == 2 and out.boxes_eval == 2 and out.boxes_matched == 1
    assert out.box_agreement == pytest.approx(0.5) and out.score_shift == pytest.approx(0.2)
    assert out.objects == 1 and out.train_accuracy == 1.0 and out.eval_accuracy == 0.0  # recall of the target
    assert out.train_only_correct == 1 and out.eval_only_correct == 0


def test_targets_numbered_unlike_the_models_classes_are_said_so() -> None:
    """Boxes in the right places under other labels (COCO category ids against 0-based classes):
    recall and mAP are 0 in both modes and say nothing; the output line says why."""
    from bncheck.judging.labels import labels_elsewhere
    from bncheck.judging.rules import eval_not_worse
    from bncheck.reporting.render.summary import output_line

    model = calibrated()
    images, targets = scenes(32, 1)
    renumbered = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    report = bncheck.analyze(model, batches(images, renumbered), batch_size=8)
    out = report.output
    assert out.train_accuracy == 0.0 and out.eval_accuracy == 0.0
    assert out.train_located == out.objects and labels_elsewhere(out) == 1.0
    assert not eval_not_worse(out)  # such labels vouch for nothing
    assert "sit on 100.0% of the target boxes under other labels" in output_line(report)
    right = bncheck.analyze(model, batches(images, targets), batch_size=8)
    assert right.output.train_located == right.output.objects and labels_elsewhere(right.output) is None
    assert "other labels" not in output_line(right)


def test_a_yolo_heads_output_is_decoded_into_boxes_by_hand() -> None:
    """ultralytics' Detect head in eval mode: (y [N, 4 + classes, anchors], {'boxes', 'scores',
    'feats'}), y holding box centre/size in pixels and class probabilities; decoded as
    ultralytics predicts: best class per anchor, NMS per class at IoU 0.7."""
    from bncheck.measuring.detections import yolo_detections
    from bncheck.measuring.outputs import prediction

    y = torch.zeros(1, 6, 8)  # 2 classes, 8 anchors
    y[0, :4, 0] = torch.tensor([20.0, 20, 10, 10])   # class 1 at 0.9
    y[0, 5, 0] = 0.9
    y[0, :4, 1] = torch.tensor([21.0, 20, 10, 10])   # the same object at 0.8: suppressed (IoU 0.82)
    y[0, 5, 1] = 0.8
    y[0, :4, 2] = torch.tensor([21.0, 20, 10, 10])   # the same place, class 0: kept (NMS per class)
    y[0, 4, 2] = 0.6
    y[0, :4, 3] = torch.tensor([50.0, 50, 4, 4])     # under 0.05: dropped
    y[0, 4, 3] = 0.01
    extra = {"boxes": torch.zeros(1, 64, 8), "scores": torch.zeros(1, 2, 8), "feats": []}
    (d,) = yolo_detections((y, extra))
    assert d["boxes"].tolist() == [[15.0, 15.0, 25.0, 25.0], [16.0, 15.0, 26.0, 25.0]]
    assert d["labels"].tolist() == [1, 0] and d["scores"].tolist() == pytest.approx([0.9, 0.6])
    maps = [torch.zeros(1, 66, 2, 2), torch.zeros(1, 66, 1, 4)]  # earlier releases: feature maps, 8 positions
    assert yolo_detections((y, maps)) is not None and yolo_detections((y, maps[:1])) is None
    assert prediction((y, extra))[1].startswith("output[0] (YOLO boxes")
    # not a YOLO head: a classifier's (probabilities, logits), a dict without the scores, end-to-end [N, 300, 6]
    assert yolo_detections((torch.rand(4, 3).softmax(1), torch.rand(4, 3))) is None
    assert yolo_detections((y, {"boxes": torch.zeros(1, 64, 8)})) is None
    assert yolo_detections((torch.rand(1, 300, 6), extra)) is None


def test_an_ultralytics_model_gets_its_images_as_one_tensor() -> None:
    from bncheck.measuring.batches import ImageList, forward

    class Stacked(nn.Module):
        def forward(self, x):
            assert isinstance(x, torch.Tensor) and x.dim() == 4
            return x.mean((1, 2, 3))

    Stacked.__module__ = "ultralytics.nn.tasks"  # as ultralytics' DetectionModel (nothing imported)
    out = forward(Stacked(), ImageList([torch.ones(3, 8, 8), torch.zeros(3, 8, 8)]), "eval")
    assert out.tolist() == [1.0, 0.0]
    assert forward(HeatDetector(), ImageList([torch.ones(3, 8, 8)] * 2), "eval")  # others keep their list


def test_images_where_a_mode_finds_no_box_are_counted_not_crashed_on() -> None:
    # torchvision detectors return boxes of shape [0, 4] for an image without detections
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    box = {"boxes": torch.tensor([[0, 0, 8, 8.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    tally = OutputTally()
    tally.add([box, empty], [empty, empty], [{"boxes": torch.tensor([[0, 0, 8, 8.]]), "labels": torch.tensor([1])},
                                             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}],
              batch=2)
    out = tally.result()
    assert out.kind == "detection" and out.boxes_train == 1 and out.boxes_eval == 0 and out.box_agreement == 0.0
    assert out.eval_nonfinite == 0 and out.train_accuracy == 1.0 and out.eval_accuracy == 0.0


def test_stale_statistics_cost_boxes_and_mAP_and_fail() -> None:
    model = calibrated()
    images, targets = scenes(48, 1)
    healthy = bncheck.analyze(model, batches(images, targets), batch_size=8)
    assert healthy.output.kind == "detection" and healthy.output.labeled == 48
    assert healthy.output.box_agreement > 0.9 and healthy.verdict == "pass", healthy.findings
    dark = [x * 0.5 for x in images]
    report = bncheck.analyze(model, batches(dark, targets), batch_size=8)
    out = report.output
    # by hand: the boxes each mode finds, matched to the targets
    with torch.no_grad():
        eval_out = model.eval()(dark)
        model.bn.momentum = 0.0  # train mode without touching the running statistics
        train_out = [d for i in range(0, 48, 8) for d in model.train()(dark[i:i + 8])]
        model.bn.momentum = None
        model.eval()
    recall = [sum(len(match((t["boxes"], t["labels"], torch.ones(len(t["boxes"]))), found(o))) for o, t in
                  zip(outs, targets)) / sum(len(t["boxes"]) for t in targets) for outs in (train_out, eval_out)]
    assert out.train_accuracy == pytest.approx(recall[0]) and out.eval_accuracy == pytest.approx(recall[1])
    assert out.eval_accuracy < out.train_accuracy and out.box_agreement < 0.9
    assert report.verdict == "fail" and report.layers[0].name == "bn"
    assert any(f.code == "accuracy-gap" and "target boxes" in f.message for f in report.findings)
    assert any(f.code == "output-divergence" and "detections agree on" in f.message for f in report.findings)
    # mAP ranks boxes by score with no threshold: eval mode's scores fell for every cell alike, its
    # ranking did not, so its mAP stays 1 -- the collapse shows in recall at score 0.5 and in the boxes
    assert out.train_map50 == pytest.approx(1.0) and out.eval_map50 == pytest.approx(1.0)
    text = render(report, "table", width=300)
    assert "box agreement train vs eval" in text and "target boxes" in text


def test_a_detectors_list_of_images_gets_the_cause_by_evidence() -> None:
    """The input-signature pass feeds a detector its images as a list, as it takes them: images
    in 0..255 where it expects 0..1 are named a preprocessing mistake (fix the pipeline, not the
    statistics); darker images read as a change of scene (stale statistics, recalibrate)."""
    model = calibrated()
    images, targets = scenes(32, 1)
    raw = bncheck.analyze(model, batches([x * 255 for x in images], targets), batch_size=8)
    assert raw.input_reading == "preprocessing"
    (first,) = [f for f in raw.findings if f.layer == "bn" and f.severity == "error"]
    assert first.code == "input-distribution" and "0..255 where the model expects 0..1" in first.message
    dark = bncheck.analyze(model, batches([x * 0.5 for x in images], targets), batch_size=8)
    assert dark.input_reading == "domain"
    assert any(f.code == "stale-running-stats" and f.layer == "bn" for f in dark.findings)


class PaddedHeatDetector(HeatDetector):
    """The same detector taking images of different sizes, padded into one batch as
    torchvision's detectors batch them (zeros to the right and below)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        height, width = max(t.shape[1] for t in images), max(t.shape[2] for t in images)
        batch = images[0].new_zeros(len(images), 3, height, width)
        for i, t in enumerate(images):
            batch[i, :, :t.shape[1], :t.shape[2]] = t
        return super().forward(list(batch))


def test_photos_of_different_sizes_get_the_cause_from_those_of_the_most_common_size() -> None:
    model = PaddedHeatDetector()
    model.load_state_dict(calibrated().state_dict())
    images, targets = scenes(32, 1)
    images = [x if i % 3 else x[:, :48] for i, x in enumerate(images)]  # a third of them 48 rows high
    raw = bncheck.analyze(model.eval(), batches([x * 255 for x in images], targets), batch_size=8)
    assert raw.input_reading == "preprocessing"
    assert any(f.code == "input-distribution" and "0..255" in f.message for f in raw.findings)


def test_the_worst_images_are_pictured_with_each_modes_boxes() -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from bncheck.reporting.png import PALETTE, box_color

    model = calibrated()
    images, targets = scenes(48, 1)
    report = bncheck.analyze(model, batches([x * 0.6 for x in images], targets), batch_size=8)
    assert len(report.pictures) == 4
    first = report.pictures[0]
    assert [p.agreement for p in report.pictures] == sorted(p.agreement for p in report.pictures)

    def decoded(png: str) -> np.ndarray:
        return np.array(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))

    image, truth, evaluated = decoded(first.image), decoded(first.truth), decoded(first.eval)
    colour = np.array(PALETTE[box_color(1)], dtype=np.uint8)
    box = targets[first.sample]["boxes"][0].int().tolist()  # 64x64 inputs: drawn at their own size
    assert (truth[box[1], box[0]:box[2]] == colour).all()  # the target box's top edge, in class 1's colour
    assert not (image == truth).all() and first.classes == (1,)
    if first.agreement == 0.0:  # eval mode found none of train mode's boxes: its panel is the bare image
        assert (evaluated == image).all()
    html = render(report, "html")
    assert "box agreement" in html and html.count("data:image/png") == 16


def test_recalibration_on_detection_batches_recovers_the_boxes() -> None:
    model = calibrated()
    images, targets = scenes(48, 2, level=0.5)
    data = batches(images, targets)
    before = bncheck.analyze(model, data, batch_size=8)
    bncheck.recalibrate(model, data, batch_size=8)
    after = bncheck.analyze(model, data, batch_size=8)
    assert before.verdict == "fail" and after.verdict == "pass", after.findings
    assert after.output.eval_accuracy > before.output.eval_accuracy
    assert after.output.box_agreement > 0.9 > before.output.box_agreement


@pytest.mark.parametrize("builder", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_torchvision_detectors_run_end_to_end(builder: str) -> None:
    import torchvision

    model = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    images, targets = scenes(8, 3)
    report = bncheck.analyze(model, batches(images, targets, size=4), batch_size=4, attribute=0)
    assert report.output.kind == "detection" and report.output.images == 8 and report.output.labeled == 8
