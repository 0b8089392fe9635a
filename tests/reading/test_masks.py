"""Masks as labels (issue 28): ``images/`` + ``masks/`` and Pascal VOC folders, masks that
follow every resize and crop, mIoU and pixel accuracy per mode with a paired test over images,
the errors a user meets, and ``fix`` verified by mIoU. The truth is computed in plain torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import bncheck
from bncheck.cli import cli
from bncheck.config import load_settings
from bncheck.reading.data import open_data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "judging"))
from test_preprocessing import DOMAINS, Segmenter, normalize, scenes, trained  # noqa: E402

ARCH = f"{Path(__file__).resolve().parent.parent / 'judging' / 'test_preprocessing.py'}:Segmenter"


def write_split(root: Path, pixels: torch.Tensor, masks: torch.Tensor, *, voc: bool = False) -> Path:
    images, labels = (root / "JPEGImages", root / "SegmentationClass") if voc else (root / "images", root / "masks")
    images.mkdir(parents=True)
    labels.mkdir()
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    for i, (x, m) in enumerate(zip(pixels, masks)):
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(images / f"{i:03d}.png")
        mask = Image.fromarray(m.numpy().astype(np.uint8), mode="L")
        if voc:
            mask = mask.convert("P")
            mask.putpalette(palette)
        mask.save(labels / f"{i:03d}.png")
    return root


def settings_for(**data):
    return load_settings(overrides={"data": {"resize": None, "crop": None, **data}}).data


def miou_by_hand(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, classes: int = 3) -> float:
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1)
    ious = []
    for c in range(classes):
        inter = ((predicted == c) & (masks == c)).sum().item()
        union = ((predicted == c) | (masks == c)).sum().item()
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


@pytest.mark.parametrize("voc", [False, True])
def test_a_split_root_reads_masks_as_labels_not_as_a_class(tmp_path, voc) -> None:
    pixels, masks = scenes(12, 3)
    root = write_split(tmp_path / "split", pixels, masks, voc=voc)
    source = open_data(root, settings_for(), batch_size=4, num_batches=None)
    batches = list(source.batches())
    assert len(batches) == 3 and all(y.shape == (4, 16, 16) and y.dtype == torch.int64 for _, y in batches)
    assert sorted(torch.cat([y for _, y in batches]).unique().tolist()) == sorted(masks.unique().tolist())


def test_masks_follow_resize_and_crop_with_nearest_sampling(tmp_path) -> None:
    pixels, masks = scenes(4, 3)
    root = write_split(tmp_path / "split", pixels, masks)
    source = open_data(root, settings_for(resize=32, crop=24), batch_size=4, num_batches=1)
    x, y = next(iter(source.batches()))
    assert x.shape[-2:] == y.shape[-2:] == (24, 24)
    assert set(y.unique().tolist()) <= {0, 1, 2}  # nearest: no interpolated class values
    padded = open_data(root, settings_for(crop=20), batch_size=4, num_batches=1)
    _, y = next(iter(padded.batches()))
    assert (y == 255).any()  # pixels the crop padded count for no class


def test_segmentation_run_reports_miou_per_mode_and_fails_a_gap(tmp_path) -> None:
    model = trained("segmentation")
    pixels, masks = scenes(64, 31)
    shifted = DOMAINS["darker"](pixels)
    root = write_split(tmp_path / "split", shifted, masks)
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "seg.pt"), "--arch", ARCH, "--data", str(root),
                                      "--resize", "none", "--crop", "none", "--batch-size", "16", "--json", "-"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    out = document["output"]
    assert out["per"] == "pixel" and out["labeled"] == 64 and len(out["eval_class_iou"]) == 3
    # the truth, in plain torch, on the images exactly as bncheck read them (PNG round trip)
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
                     for p in sorted((root / "images").glob("*.png"))])
    y = torch.stack([torch.from_numpy(np.array(Image.open(p))).long() for p in sorted((root / "masks").glob("*.png"))])
    assert out["eval_miou"] == pytest.approx(miou_by_hand(model, normalize(x), y), abs=1e-6)
    if out["train_miou"] - out["eval_miou"] > 0.05:
        assert any(f["code"] == "accuracy-gap" and "mIoU" in f["message"] for f in document["findings"])


def test_fix_on_masks_verifies_by_miou(tmp_path) -> None:
    model = trained("segmentation")
    pixels, masks = scenes(96, 41)
    shifted = DOMAINS["darker"](pixels)
    root = write_split(tmp_path / "split", shifted[:64], masks[:64])
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    result = CliRunner().invoke(cli, ["fix", str(tmp_path / "seg.pt"), "--arch", ARCH, "--data", str(root),
                                      "--resize", "none", "--crop", "none", "--batch-size", "16",
                                      "--out", str(tmp_path / "fixed.pt")])
    assert result.exit_code in (0, 1), result.output
    assert "mIoU" in result.output
    if (tmp_path / "fixed.pt").exists():
        fixed = Segmenter()
        fixed.load_state_dict(torch.load(tmp_path / "fixed.pt"))
        held = normalize(shifted[64:])
        assert miou_by_hand(fixed, held, masks[64:]) >= miou_by_hand(model, held, masks[64:]) - 0.02


@pytest.mark.parametrize("problem, needle", [
    ("missing", "have no mask"), ("extra", "have no image"), ("size", "must have its image's size"),
    ("class", "class index 7"), ("rgb", "not class indices"), ("masks only", "no images folder"),
    ("the masks folder itself", "is the masks folder of"),
])
def test_bad_masks_get_one_clear_error(tmp_path, problem, needle) -> None:
    pixels, masks = scenes(8, 5)
    root = write_split(tmp_path / "split", pixels, masks)
    if problem == "missing":
        (root / "masks" / "003.png").unlink()
    elif problem == "extra":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "999.png")
    elif problem == "size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "002.png")
    elif problem == "class":
        Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "001.png")
    elif problem == "rgb":
        Image.fromarray(np.stack([np.zeros((16, 16), np.uint8), np.full((16, 16), 128, np.uint8),
                                  np.zeros((16, 16), np.uint8)], -1)).save(root / "masks" / "000.png")
    elif problem == "masks only":
        (root / "images").rename(root / "pictures")
    model = trained("segmentation")
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    target = root / "masks" if problem == "the masks folder itself" else root
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "seg.pt"), "--arch", ARCH, "--data", str(target),
                                      "--resize", "none", "--crop", "none", "--batch-size", "4"])
    assert result.exit_code == 3, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_a_pipeline_yielding_images_and_masks_gives_miou() -> None:
    model = trained("segmentation")
    pixels, masks = scenes(32, 8)
    batches = [(normalize(pixels[i:i + 8]), masks[i:i + 8]) for i in range(0, 32, 8)]
    report = bncheck.analyze(model, batches, batch_size=8)
    assert report.output.eval_miou is not None and report.output.labeled == 32


def test_a_tensor_file_with_inputs_and_masks_gives_miou(tmp_path) -> None:
    model = trained("segmentation")
    pixels, masks = scenes(32, 9)
    torch.save({"inputs": normalize(pixels), "masks": masks}, tmp_path / "seg_data.pt")
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "seg.pt"), "--arch", ARCH, "--data",
                                      str(tmp_path / "seg_data.pt"), "--batch-size", "8", "--json", "-",
                                      "--html", str(tmp_path / "r.html")])
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["output"]["eval_miou"] is not None
    assert "IoU per class (eval / train)</dt><dd>0: " in (tmp_path / "r.html").read_text()
