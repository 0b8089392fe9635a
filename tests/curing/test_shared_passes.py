"""Issue 20: a failing run and ``fix`` pay only for the passes their answer needs.

``fix`` on the same batches shares the train-mode pass (train mode never reads the running
statistics it changes): one eval and one train pass before, one eval pass after -- and the
result is the one the unshared path gives. The output-noise pass stops once its batches
already put the noise far under what would explain the gap."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.curing.fix import run_fix
from bncheck.reading.checkpoint import Checkpoint
from bncheck.reporting.report import ModelInfo


class Counting(TinyNet):
    """TinyNet that counts its forwards per mode of its first BN layer."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["train" if self.bn1.training else "eval"] += 1
        return super().forward(x)


def stale(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    calibrate(model, make_batches(8, seed=123))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean += 1.5 * bn.running_var.sqrt()
        model.head.weight *= 30  # confident outputs: the modes' disagreement is material
    model.calls = {"train": 0, "eval": 0}
    return model.eval()


def test_fix_on_the_same_batches_runs_eval_train_eval_and_gives_the_unshared_result() -> None:
    data = make_batches(4)
    model = stale(Counting())
    reference = copy.deepcopy(model)
    info = ModelInfo(None, None, "random-init", None, 0)
    shared = run_fix(Checkpoint(model, info), None, lambda: data, out=None, dry_run=True, batch_size=16)
    # before: an eval and a train pass (+ the noise pass, stopped early), after: one eval pass
    assert model.calls["eval"] == 2 * len(data)
    assert model.calls["train"] < 2 * len(data)
    unshared = run_fix(Checkpoint(reference, info), list(data), lambda: data, out=None, dry_run=True, batch_size=16)
    for name, buffer in model.state_dict().items():
        assert torch.allclose(buffer, reference.state_dict()[name], rtol=1e-5, atol=1e-6), name
    assert shared.verdict == unshared.verdict and shared.outcome == unshared.outcome == "dry-run"
    assert [(f.code, f.layer) for f in shared.before.findings] == [(f.code, f.layer) for f in unshared.before.findings]
    assert [(f.code, f.layer) for f in shared.after.findings] == [(f.code, f.layer) for f in unshared.after.findings]
    assert shared.after.output.top1_agreement == unshared.after.output.top1_agreement
    assert [layer.score for layer in shared.after.layers] == pytest.approx(
        [layer.score for layer in unshared.after.layers], rel=1e-4, abs=1e-6)


def test_the_noise_pass_stops_early_when_the_gap_is_far_beyond_noise_and_says_so() -> None:
    data = make_batches(6)
    model = stale(Counting())
    report = bncheck.analyze(model, data, attribute=0)
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert "re-dealt batches" in net.message
    # 6 eval + 6 train in the statistics pass; the noise pass stopped after 2 of its 6 batches
    assert model.calls == {"eval": 6, "train": 8}


class ReadsRunning(nn.BatchNorm2d):
    """A BN whose train mode also reads its running statistics (as Batch Renorm does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * self.running_mean.view(1, -1, 1, 1)


def test_no_replay_when_train_mode_may_read_running_statistics() -> None:
    data = make_batches(4)
    model = Counting()
    model.bn2 = ReadsRunning(8)
    model = stale(model)
    reference = copy.deepcopy(model)
    info = ModelInfo(None, None, "random-init", None, 0)
    shared = run_fix(Checkpoint(model, info), None, lambda: data, out=None, dry_run=True, batch_size=16)
    unshared = run_fix(Checkpoint(reference, info), list(data), lambda: data, out=None, dry_run=True, batch_size=16)
    assert model.calls["eval"] == 2 * len(data) and model.calls["train"] >= 2 * len(data)  # after ran train mode
    assert shared.after.output.kl == pytest.approx(unshared.after.output.kl, rel=1e-5, abs=1e-9)
    assert [(f.code, f.layer) for f in shared.after.findings] == [(f.code, f.layer) for f in unshared.after.findings]
