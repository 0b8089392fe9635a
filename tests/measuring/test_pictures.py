"""Segmentation pictures (issue 28, part 3) and binary masks (part 1): the samples where the
modes disagree most, kept while the batches stream and drawn in one palette; one-channel
outputs read as sigmoid logits when masks label them. Truths are computed by hand."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import bncheck
from bncheck.cli import cli
from bncheck.measuring.outputs import OutputTally, binary_masks
from bncheck.measuring.pictures import PICTURES, SIDE
from bncheck.reporting.png import PALETTE, encode_rgb, palette_hex
from bncheck.reporting.render import render
from bncheck.reporting.report import dumps, from_dict, validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dense_outputs import TinySeg, calibrated, data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "judging"))
from test_preprocessing import DOMAINS, normalize, scenes, trained  # noqa: E402


def decoded(png_base64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"))


@pytest.mark.parametrize("filtered", ["none", "up"])
def test_png_writer_round_trips_through_pillow(filtered: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rows = pixels.astype(np.int16)
    if filtered == "up":
        rows[1:] -= pixels[:-1]
    png = encode_rgb((rows % 256).astype(np.uint8).tobytes(), 7, 5, filtered=filtered)
    assert np.array_equal(np.array(Image.open(io.BytesIO(png))), pixels)
    with pytest.raises(ValueError):
        encode_rgb(b"\x00" * 10, 7, 5)


def test_the_palette_is_pascal_vocs() -> None:
    assert PALETTE[0] == (0, 0, 0) and PALETTE[1] == (128, 0, 0) and PALETTE[2] == (0, 128, 0)
    assert PALETTE[15] == (192, 128, 128) and PALETTE[255] == (224, 224, 192)
    assert palette_hex(1) == "#800000"


def shifted_batches(n: int = 32, batch: int = 8) -> tuple[torch.nn.Module, list]:
    model = trained("segmentation")
    pixels, masks = scenes(n, 8)
    shifted = normalize(DOMAINS["darker"](pixels))
    return model, [(shifted[i:i + batch], masks[i:i + batch]) for i in range(0, n, batch)]


def test_the_worst_samples_are_pictured_with_their_masks() -> None:
    model, batches = shifted_batches()
    report = bncheck.analyze(model, batches, batch_size=8)
    assert len(report.pictures) == PICTURES
    # the per-sample agreement by hand: the lowest ones, lowest first
    x = torch.cat([b[0] for b in batches])
    masks = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        eval_pred = model.eval()(x).argmax(1)
        train_pred = torch.cat([model.train()(b[0]).argmax(1) for b in batches])
    model.eval()
    agree = (eval_pred == train_pred).float().flatten(1).mean(1)
    shown = [p.sample for p in report.pictures]
    assert [p.agreement for p in report.pictures] == sorted(p.agreement for p in report.pictures)
    assert max(p.agreement for p in report.pictures) <= float(agree.sort().values[PICTURES - 1]) + 1e-6
    first = report.pictures[0]
    assert first.agreement == pytest.approx(float(agree[first.sample]), abs=1e-6)
    # each panel is the palette of the classes at that sample (16x16 inputs: not resized)
    palette = np.array(PALETTE, dtype=np.uint8)
    assert np.array_equal(decoded(first.eval), palette[eval_pred[first.sample].numpy()])
    assert np.array_equal(decoded(first.train), palette[train_pred[first.sample].numpy()])
    assert np.array_equal(decoded(first.truth), palette[masks[first.sample].numpy()])
    assert decoded(first.image).shape == (16, 16, 3)
    assert set(first.classes) <= {0, 1, 2} and shown == sorted(set(shown), key=shown.index)


def test_pictures_travel_in_the_json_and_show_in_the_html(tmp_path) -> None:
    model, batches = shifted_batches()
    report = bncheck.analyze(model, batches, batch_size=8)
    document = json.loads(dumps(report))
    validate(document)
    assert len(document["pictures"]) == PICTURES and len(dumps(report)) < 200_000
    again = from_dict(document)
    html = render(again, "html")
    assert "Where the modes disagree most" in html
    assert html.count('src="data:image/png;base64,') == 4 * PICTURES  # input, eval, train, truth
    assert html.index("Where the modes disagree most") < html.index("Score through depth")
    # read back from a saved run by `bncheck report --html`
    (tmp_path / "run.json").write_text(dumps(report))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run.json"), "--html", str(tmp_path / "r.html")])
    assert result.exit_code in (0, 1), result.output
    assert (tmp_path / "r.html").read_text().count("data:image/png") == 4 * PICTURES


def test_pictures_are_bounded_and_scaled_down() -> None:
    tally = OutputTally(keep_pictures=2)
    torch.manual_seed(0)
    for _ in range(5):  # large inputs, many batches: never more than two kept, never above SIDE
        x = torch.randn(3, 3, 400, 300)
        tally.add(torch.randn(3, 4, 100, 75), torch.randn(3, 4, 100, 75), None, batch=3, inputs=x)
        assert len(tally.worst) <= 2
    assert tally.worst[0].image.shape == (SIDE, 120, 3) and tally.worst[0].eval.shape == (SIDE, 120, 3)
    assert tally.worst[0].truth is None
    assert OutputTally().worst == [] and OutputTally().keep_pictures == 0  # later passes picture nothing


def test_a_volume_is_pictured_by_its_middle_slice() -> None:
    model = calibrated(TinySeg(dims=3), dims=3)
    report = bncheck.analyze(model, data(dims=3, shift=2.0), batch_size=8)
    assert report.output.per == "pixel" and len(report.pictures) == PICTURES
    assert decoded(report.pictures[0].eval).shape == (6, 6, 3)


def binary_case(shift: float = 0.0) -> tuple[torch.nn.Module, list, torch.Tensor]:
    model = calibrated(TinySeg(classes=1))
    x = data(shift=shift)
    masks = (x[:, 0] > 0).long()
    return model, [(x[i:i + 16], masks[i:i + 16]) for i in range(0, 64, 16)], masks


def test_one_channel_with_masks_is_a_binary_segmenter() -> None:
    model, batches, masks = binary_case(shift=1.0)
    report = bncheck.analyze(model, batches, batch_size=16)
    out = report.output
    assert out.kind == "classifier" and out.per == "pixel" and out.binary and out.classes == 2
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        predicted = (model.eval()(x)[:, 0] > 0).long()
    ious = [((predicted == c) & (masks == c)).sum().item() / ((predicted == c) | (masks == c)).sum().item()
            for c in (0, 1)]
    assert out.eval_miou == pytest.approx(sum(ious) / 2, abs=1e-9)
    assert out.eval_accuracy == pytest.approx((predicted == masks).double().mean().item(), abs=1e-12)
    assert "binary masks" in render(report, "table")


def test_binary_masks_saved_as_0_and_255_read_255_as_foreground() -> None:
    masks = torch.tensor([[0, 255], [255, 0]])
    assert binary_masks(masks).tolist() == [[0, 1], [1, 0]]
    voc = torch.tensor([[0, 1], [255, 0]])  # 255 beside 1: the ignore index, as in VOC
    assert binary_masks(voc).tolist() == voc.tolist()


def test_one_channel_without_masks_stays_a_tensor() -> None:
    """A depth or density map has one channel too: without masks nothing says it is a mask."""
    model, batches, _ = binary_case()
    report = bncheck.analyze(model, torch.cat([b[0] for b in batches]), batch_size=16)
    assert report.output.kind == "tensor" and report.output.binary is None and not report.pictures
