"""Issue 20: a failing run and ``fix`` pay only for the passes their answer needs.

``fix`` on the same batches shares the train-mode pass (train mode never reads the running
statistics it changes): one eval and one train pass before, one eval pass after -- and the
result is the one the unshared path gives. The output-noise pass stops once its batches
already put the noise far under what would explain the gap (one batch, when its samples'
spread says so)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.curing.fix import run_fix
from bncheck.judging.output_divergence import noise_decides_at
from bncheck.measuring.passes import (
    EARLY_STOP_MARGIN,
    ONE_BATCH_Z,
    _noise_tally,
    _sample_error,
    noise_divergence,
)
from bncheck.reading.checkpoint import Checkpoint
from bncheck.reporting.report import ModelInfo
from bncheck.runtime import preserved_state, runtime_for


class Counting(TinyNet):
    """TinyNet that counts its whole forwards per mode of its first BN layer (the input-signature
    pass stops each of its forwards at the first BN layer: those are stem passes, not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "train" if self.bn1.training else "eval"
        out = super().forward(x)
        self.calls[mode] += 1
        return out


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
    report = bncheck.analyze(model, data, attribute=0, thorough=True)  # the layers fail the gate already
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert "from 16 samples in 1 re-dealt batch" in net.message
    # 6 eval + 6 train in the statistics pass; the noise pass stopped after 1 of its 6 batches:
    # its value plus 3 (inflated) standard errors is far under what the decision turns on
    assert model.calls == {"eval": 6, "train": 7}


def _kept(model: nn.Module, data: list[torch.Tensor]) -> list:
    """The engine's kept sample: inputs, no labels, train-mode outputs in their own batches."""
    kept = []
    with torch.no_grad():
        for x in data:
            runtime = runtime_for(model)
            with preserved_state(model):
                runtime.set_mode(bn_training=True)
                kept.append((x, None, model(x)))
    return kept


def test_one_batch_settles_the_noise_only_when_its_samples_agree_well_enough() -> None:
    data = make_batches(6)
    model = stale(Counting())
    kept, runtime = _kept(model, data), runtime_for(model)
    _, floors, error = _noise_tally(runtime, kept, torch.device("cpu"), None)  # no decision: every batch
    assert len(floors) == 6 and error is not None and error > 0
    limit = floors[0] * 1.0001  # the first batch is under the early-stop limit ...
    assert floors[0] + ONE_BATCH_Z * error >= limit * EARLY_STOP_MARGIN  # ... but not surely under the decision
    _, ran, _ = _noise_tally(runtime, kept, torch.device("cpu"), None, limit)
    assert len(ran) >= 2
    roomy = (floors[0] + ONE_BATCH_Z * error) / EARLY_STOP_MARGIN * 1.01
    _, ran, _ = _noise_tally(runtime, kept, torch.device("cpu"), None, roomy)
    assert ran == floors[:1]


def test_under_torchrun_every_rank_runs_every_noise_batch() -> None:
    data = make_batches(6)
    model = stale(Counting())
    kept = _kept(model, data)
    model.calls = {"train": 0, "eval": 0}
    gap = bncheck.analyze(copy.deepcopy(model), data, attribute=0).output
    estimate = noise_divergence(runtime_for(model), kept, torch.device("cpu"), None, reduce=lambda t: t,
                                decides_at=noise_decides_at(gap))
    assert estimate is not None and estimate.batches == 6 and estimate.complete
    assert model.calls["train"] == 6


def test_sample_error_by_hand() -> None:
    # classifier: per-sample KL of 2-class softmaxes; the noise value is half of each (two runs)
    before = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    again = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    p, q = before.softmax(-1).double(), again.softmax(-1).double()
    kl = [float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(4)]
    s = math.e / (1 + math.e)  # softmax([1, 0])[0]
    assert kl == pytest.approx([0.0, 0.5 * math.log(0.5 / s) + 0.5 * math.log(0.5 / (1 - s)), 0.0,
                                s * math.log(s / 0.5) + (1 - s) * math.log((1 - s) / 0.5)])
    values = [0.5 * v for v in kl]
    mean = sum(values) / 4
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / 3) / 2  # sample std / sqrt(4)
    assert _sample_error(before, again, "classifier", 0.5) == pytest.approx(expected)
    # other outputs: ratio sum d / sum r with d_i = 0.5 * ||again_i - before_i||^2, r_i = ||before_i||^2
    before = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    again = torch.tensor([[2.0], [1.0], [2.0], [4.0]])
    d, r = [0.5, 0.0, 0.0, 2.0], [1.0, 1.0, 4.0, 4.0]
    ratio = sum(d) / sum(r)  # 2.5 / 10
    residual = [di - ratio * ri for di, ri in zip(d, r)]  # 0.25, -0.25, -1, 1
    expected = math.sqrt(sum(e * e for e in residual) / 3 / 4) / (sum(r) / 4)
    assert _sample_error(before, again, "tensor", 0.5) == pytest.approx(expected)
    assert _sample_error(before[:3], again[:3], "tensor", 0.5) is None  # fewer than 4 samples
    assert _sample_error((before,), (again,), "tensor", 0.5) is None  # not one row per sample


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


def test_progress_names_each_stage_of_a_failing_run_in_order() -> None:
    data = make_batches(4)
    model = stale(Counting())
    stages: list[str] = []

    def progress(stage: str, _done: int, _total: object) -> None:
        if stage not in stages:
            stages.append(stage)

    report = bncheck.analyze(model, data, attribute=1, thorough=True, progress=progress)
    # the conclusion first: what recalibrating every layer recovers decides whether attribution is worth it
    assert stages == ["batches", "input signature", "conclusion", "attribution", "output noise"]
    assert [p.name for p in report.passes if p.ran] == ["statistics", *stages[1:]]
