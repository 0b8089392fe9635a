"""Segmentation outputs compared per pixel (issue 28, first part): ``[N, C, H, W]`` and
``[N, C, D, H, W]`` class scores, also inside torchvision's ``{'out', 'aux'}`` and a Hugging
Face-style output's ``logits``, read as one classifier per pixel."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import bncheck
from bncheck.judging.metrics import softmax_divergence
from bncheck.measuring import outputs
from bncheck.measuring.outputs import OutputTally, dense_divergence, pixel_rows
from bncheck.reporting.render import render


class TinySeg(nn.Module):
    """conv-BN-ReLU twice, then a 1x1 classifier; ``wrap`` returns it as torchvision or HF do."""

    def __init__(self, classes: int = 4, wrap: str = "tensor", dims: int = 2) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.body = nn.Sequential(conv(3, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 8, 3, padding=1), bn(8),
                                  nn.ReLU())
        self.classifier = conv(8, classes, 1)
        self.wrap = wrap

    def forward(self, x: torch.Tensor):
        logits = self.classifier(self.body(x))
        if self.wrap == "torchvision":
            return OrderedDict(out=logits, aux=logits.detach() * 0.5)
        if self.wrap == "hf":
            return {"loss": None, "logits": nn.functional.avg_pool2d(logits, 2)}  # reduced resolution
        return logits


def calibrated(model: nn.Module, dims: int = 2) -> nn.Module:
    torch.manual_seed(0)
    shape = (16, 3, 12, 12) if dims == 2 else (8, 3, 6, 6, 6)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(*shape))
    return model.eval()


def data(dims: int = 2, shift: float = 0.0) -> torch.Tensor:
    torch.manual_seed(1)
    shape = (64, 3, 12, 12) if dims == 2 else (32, 3, 6, 6, 6)
    return torch.randn(*shape) + shift


def test_dense_divergence_equals_the_per_pixel_classifier_by_hand(monkeypatch) -> None:
    torch.manual_seed(0)
    train, evaluated = torch.randn(3, 5, 4, 6), torch.randn(3, 5, 4, 6)
    kl, js, agree = dense_divergence(train, evaluated)
    rows_kl, rows_js, rows_agree = softmax_divergence(pixel_rows(train), pixel_rows(evaluated))
    assert torch.allclose(kl, rows_kl.reshape(3, -1).mean(1))
    assert torch.allclose(agree, rows_agree.reshape(3, -1).mean(1))
    # pixel (0, row 1, col 2): its class scores are train[0, :, 1, 2]
    assert torch.equal(pixel_rows(train)[1 * 6 + 2], train[0, :, 1, 2])
    monkeypatch.setattr(outputs, "PIXEL_CHUNK", 7)  # chunked: the same numbers
    assert torch.allclose(dense_divergence(train, evaluated)[0], kl)


@pytest.mark.parametrize("wrap", ["tensor", "torchvision", "hf"])
def test_segmentation_outputs_are_compared_per_pixel(wrap: str) -> None:
    model = calibrated(TinySeg(wrap=wrap))
    healthy = bncheck.analyze(model, data(), batch_size=16)
    assert healthy.output.kind == "classifier" and healthy.output.per == "pixel" and healthy.output.images == 64
    assert healthy.verdict == "pass", [(f.code, f.severity) for f in healthy.findings]
    assert not any(f.code == "unrepresentative-sample" for f in healthy.findings)  # background is no "one class"
    stale = bncheck.analyze(model, data(shift=2.0), batch_size=16)
    assert stale.verdict == "fail"
    assert stale.output.top1_agreement < healthy.output.top1_agreement
    line = render(stale, "table").splitlines()
    assert any(text.startswith("output pixel agreement train vs eval") for text in line)
    net = next((f for f in stale.findings if f.code == "output-divergence"), None)
    assert net is None or "pixels' top-1" in net.message


def test_volumes_are_compared_per_voxel() -> None:
    model = calibrated(TinySeg(dims=3), dims=3)
    report = bncheck.analyze(model, data(dims=3, shift=2.0), batch_size=8)
    assert report.output.per == "pixel" and report.verdict == "fail"


def test_the_tally_never_mixes_pixels_with_samples() -> None:
    tally = OutputTally()
    tally.add(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), None, batch=4)
    tally.add(torch.randn(4, 3), torch.randn(4, 3), None, batch=4)
    assert tally.result().kind == "none"


def test_the_noise_estimate_counts_samples_for_every_output_kind() -> None:
    """It said "from 0 samples" for any output that is not a classifier's."""
    for classes in (1, 4):  # a one-channel map (compared as a tensor) and per-pixel classes
        model = calibrated(TinySeg(classes=classes))
        with torch.no_grad():
            model.classifier.weight *= 20  # outputs that move: the noise check runs
        report = bncheck.analyze(model, data(shift=1.5), batch_size=16)
        messages = [f.message for f in report.findings if f.code in ("output-divergence", "unrepresentative-batches")]
        assert messages, [(f.code, f.severity) for f in report.findings]
        assert all(" from 0 samples" not in m for m in messages), messages
