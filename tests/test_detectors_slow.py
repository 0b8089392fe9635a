"""Issue 29, the last done-when item: torchvision's detectors trained the way their docs show
(``FasterRCNN`` and ``RetinaNet`` around a custom backbone -- here a small conv/BatchNorm2d/ReLU
stack -- fed ``(images, targets)``), then diagnosed with their targets: box agreement between the
modes, recall and mAP per mode, the gate, and recalibration. Slow: training two detectors on CPU
takes about a minute each (``make test-slow``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bncheck

pytestmark = pytest.mark.slow

CELL = 16


def scenes(n: int, seed: int, level: float = 1.0, contrast: float = 1.0) -> tuple[list, list]:
    """64x64 images: 1-3 bright 16x16 squares on the cell grid over dim noise, and their targets;
    ``level``/``contrast`` make another sensor of the same scenes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        x = torch.rand(3, 64, 64, generator=g) * 0.2
        grid = 64 // CELL
        cells = torch.randperm(grid * grid, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]
        boxes = []
        for c in cells.tolist():
            r, col = divmod(c, grid)
            x[:, r * CELL:(r + 1) * CELL, col * CELL:(col + 1) * CELL] += 0.7
            boxes.append([col * CELL, r * CELL, (col + 1) * CELL, (r + 1) * CELL])
        images.append(((x - 0.3) * contrast + 0.3) * level)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(len(boxes), dtype=torch.long)})
    return images, targets


def backbone() -> nn.Module:
    """Three stride-2 conv/BatchNorm2d/ReLU blocks; torchvision's detectors read ``out_channels``."""
    layers: list[nn.Module] = []
    for cin, cout in ((3, 16), (16, 32), (32, 32)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    body = nn.Sequential(*layers)
    body.out_channels = 32
    return body


def build(kind: str) -> nn.Module:
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    anchors = AnchorGenerator(sizes=((8, 16),), aspect_ratios=((1.0,),))
    common = dict(min_size=64, max_size=64, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    if kind == "fasterrcnn":
        return FasterRCNN(backbone(), num_classes=2, rpn_anchor_generator=anchors,
                          box_roi_pool=MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2),
                          rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_positive_fraction=0.5,
                          **common)
    return RetinaNet(backbone(), num_classes=2, anchor_generator=anchors, **common)


def trained(kind: str, steps: int) -> nn.Module:
    """As torchvision's detection reference trains: model.train(), losses summed, SGD."""
    torch.manual_seed(0)
    model = build(kind)
    images, targets = scenes(256, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step in range(steps):
        at = (step * 8) % 256
        losses = model(images[at:at + 8], targets[at:at + 8])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def batches(images: list, targets: list, size: int = 8) -> list:
    return [(images[i:i + size], targets[i:i + size]) for i in range(0, len(images), size)]


@pytest.fixture(scope="module", params=[("fasterrcnn", 300), ("retinanet", 600)], ids=["fasterrcnn", "retinanet"])
def detector(request) -> nn.Module:
    return trained(*request.param)


def test_a_trained_detector_passes_on_its_own_data_with_map_per_mode(detector: nn.Module) -> None:
    images, targets = scenes(64, 1)
    report = bncheck.analyze(detector, batches(images, targets), batch_size=8)
    out = report.output
    assert out.kind == "detection" and out.labeled == 64 and out.objects == sum(len(t["boxes"]) for t in targets)
    assert out.train_accuracy > 0.8 and out.eval_accuracy > 0.8  # recall of the target boxes
    assert out.train_map50 > 0.8 and out.eval_map50 > 0.8
    assert out.box_agreement > 0.85
    assert report.verdict == "pass", [(f.code, f.message) for f in report.findings]


def test_another_sensor_fails_by_its_boxes_and_recalibrating_recovers_them(detector: nn.Module) -> None:
    images, targets = scenes(64, 2, level=0.5, contrast=0.6)
    data = batches(images, targets)
    report = bncheck.analyze(detector, data, batch_size=8)
    out = report.output
    assert report.verdict == "fail"
    assert out.eval_accuracy < out.train_accuracy - 0.2  # eval mode misses target boxes train mode finds
    assert out.box_agreement < 0.8
    assert any(f.code == "accuracy-gap" and "target boxes" in f.message for f in report.findings)
    assert out.train_map50 is not None and out.eval_map50 is not None and out.eval_map50 <= out.train_map50
    stem = report.layers[0].name
    assert stem.startswith("backbone.body.") or stem.startswith("backbone."), stem
    fixed = copy.deepcopy(detector)
    bncheck.recalibrate(fixed, data, batch_size=8)
    after = bncheck.analyze(fixed, data, batch_size=8)
    assert after.output.eval_accuracy > out.eval_accuracy + 0.2
    assert after.output.box_agreement > out.box_agreement


def test_run_and_fix_through_the_cli_with_a_pipeline_of_images_and_targets(tmp_path) -> None:
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from bncheck.cli import cli

    here = Path(__file__).resolve()
    torch.save(trained("fasterrcnn", 300).state_dict(), tmp_path / "detector.pt")
    (tmp_path / "sensor.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('scenes_source', {str(here)!r})\n"
        "source = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(source)\n\n\n"
        "def batches():\n"
        "    images, targets = source.scenes(64, 2, level=0.5, contrast=0.6)\n"
        "    return source.batches(images, targets)\n")
    common = ["--arch", f"{here}:build", "--arch-kwargs", "{kind: fasterrcnn}",
              "--data", f"{tmp_path / 'sensor.py'}:batches", "--batch-size", "8", "--num-batches", "8"]
    run = CliRunner().invoke(cli, ["run", str(tmp_path / "detector.pt"), *common, "--json", "-"])
    assert run.exit_code == 1, run.output
    out = json.loads(run.stdout)["output"]
    assert out["kind"] == "detection" and out["labeled"] == 64
    assert out["eval_accuracy"] < out["train_accuracy"] and out["eval_map50"] < out["train_map50"]
    fixed = tmp_path / "fixed.pt"
    result = CliRunner().invoke(cli, ["fix", str(tmp_path / "detector.pt"), *common, "--out", str(fixed),
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["outcome"] == "written"
    assert document["after"]["output"]["eval_accuracy"] > document["before"]["output"]["eval_accuracy"] + 0.5
    assert document["held_out"]["after"] > document["held_out"]["before"]


def test_a_coco_folder_names_the_cause_for_a_trained_faster_rcnn(tmp_path) -> None:
    """The same detector through COCO files (no code): its own scenes pass; fed 0..255 they are
    a preprocessing mistake named with its evidence (fix the pipeline); another sensor is a
    domain change (stale statistics), and fix's held-out recall rises."""
    import json
    from pathlib import Path

    from click.testing import CliRunner
    from test_coco import write_coco

    from bncheck.cli import cli

    torch.save(trained("fasterrcnn", 300).state_dict(), tmp_path / "detector.pt")
    folders = {}
    for name, kwargs in (("own", {}), ("sensor", {"level": 0.5, "contrast": 0.6})):
        images, targets = scenes(64, 2, **kwargs)
        pixels = {f"{i:03d}.png": (x.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
                  for i, x in enumerate(images)}
        boxes = {f"{i:03d}.png": [(b[0], b[1], b[2] - b[0], b[3] - b[1], int(label))
                                  for b, label in zip(t["boxes"].tolist(), t["labels"].tolist())]
                 for i, t in enumerate(targets)}
        folders[name] = tmp_path / name
        write_coco(folders[name] / "images", pixels, boxes, folders[name] / "annotations" / "instances.json")
    here = Path(__file__).resolve()
    common = [str(tmp_path / "detector.pt"), "--arch", f"{here}:build", "--arch-kwargs", "{kind: fasterrcnn}",
              "--batch-size", "8", "--num-batches", "8", "--json", "-"]

    def run(*args: str) -> tuple[int, dict]:
        result = CliRunner().invoke(cli, ["run", *common, *args])
        return result.exit_code, json.loads(result.stdout)

    code, own = run("--data", str(folders["own"]))
    assert code == 0 and own["output"]["labeled"] == 64 and own["output"]["eval_accuracy"] > 0.8
    per_255 = ",".join([str(1 / 255)] * 3)
    code, raw = run("--data", str(folders["own"]), "--std", per_255)
    assert code == 1 and raw["input_reading"] == "preprocessing"
    assert any(f["code"] == "input-distribution" and "0..255" in f["message"] for f in raw["findings"])
    code, sensor = run("--data", str(folders["sensor"]))
    assert code == 1 and sensor["input_reading"] == "domain"
    assert sensor["output"]["eval_accuracy"] < sensor["output"]["train_accuracy"] - 0.5
    fixed = CliRunner().invoke(cli, ["fix", *common[:-2], "--data", str(folders["sensor"]), "--out",
                                     str(tmp_path / "fixed.pt"), "--json", "-"])
    assert fixed.exit_code == 0, fixed.output
    document = json.loads(fixed.stdout)
    assert document["outcome"] == "written" and document["held_out"]["after"] > document["held_out"]["before"]
