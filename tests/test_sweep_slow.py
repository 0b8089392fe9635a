"""Slow sweep over real torchvision architectures (``make test-slow``).

Healthy: BN statistics calibrated on 128 sample images (cumulative average), then checked
on 128 others from the same distribution at several batch sizes -> no error finding.
Broken: one middle BN layer's running mean moved by one running std -> that layer ranks
first with score ~1 (e = |b| = 1 by hand) and an error finding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import SAMPLES

from bncheck.config import load_settings
from bncheck.engine import analyze
from bncheck.reading.data import open_data

pytestmark = pytest.mark.slow
ARCHS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "regnet_y_400mf",
         "mnasnet0_5", "shufflenet_v2_x1_0", "mobilenet_v2", "googlenet", "resnext50_32x4d"]


@pytest.fixture(scope="module")
def images() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    cfg = load_settings(overrides={"data": {"resize": 112, "crop": 112}}).data
    batches = [b[0] for b in open_data(SAMPLES / "data", cfg, 32, 8).batches()]
    return batches[:4], batches[4:]


def calibrated(arch: str, calib: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(arch, weights=None, num_classes=4, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x in calib:
            model(x)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_healthy_has_no_errors_and_broken_layer_is_found(arch, images) -> None:
    calib, test = images
    model = calibrated(arch, calib)
    for batch_size in (32, 8, 4, 2):
        report = analyze(model, [x[:batch_size] for x in test])
        errors = [f for f in report.findings if f.severity == "error"]
        assert not errors, (batch_size, errors)
        assert not any(f.code == "stale-running-stats" for f in report.findings)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    name, victim = bns[len(bns) // 2]
    with torch.no_grad():
        victim.running_mean += victim.running_var.sqrt()
    for batch_size in (8, 2):
        report = analyze(model, [x[:batch_size] for x in test])
        top = report.layers[0]
        assert top.name == name and top.score == pytest.approx(1.0, abs=0.08)
        assert [f.code for f in top.findings] == ["stale-running-stats"] and report.verdict == "fail"
