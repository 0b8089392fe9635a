"""Each finding, produced for real on a trained model (the shipped healthy sample: a
shufflenet_v2_x0_5 trained on generated shapes), and no error on the healthy model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import SAMPLES
from torchvision.ops.misc import FrozenBatchNorm2d

from bncheck.config import load_settings
from bncheck.engine import analyze
from bncheck.reading.data import open_data


def trained(name: str = "healthy") -> torch.nn.Module:
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


def sample(batch_size: int = 32, num_batches: int = 4, **data) -> list:
    cfg = load_settings(overrides={"data": {"resize": None, "crop": None, **data}}).data
    return list(open_data(SAMPLES / "data", cfg, batch_size, num_batches).batches())


@pytest.fixture(scope="module")
def batches() -> list:
    return sample()


def codes(report, severity: str = "error") -> set[tuple[str, str]]:
    return {(f.code, f.layer) for f in report.findings if f.severity == severity}


def test_healthy_model_has_no_error(batches) -> None:
    report = analyze(trained(), batches)
    assert report.verdict == "pass" and not codes(report) and not codes(report, "warning")
    assert report.output.eval_accuracy > 0.95 and report.output.train_accuracy > 0.9
    assert max(layer.drift_to_noise for layer in report.layers) < 2.0


@pytest.mark.parametrize("batch_size", [2, 4])
def test_small_batches_are_noise_not_drift(batch_size) -> None:
    report = analyze(trained(), sample(batch_size=batch_size, num_batches=16))
    assert not any(f.code == "stale-running-stats" for f in report.findings)
    assert report.verdict == "pass"
    assert [f.code for f in report.findings if f.severity == "warning"] == ["small-batch-noise"]


@pytest.mark.parametrize(
    "data, what",
    [
        ({"mean": [0.0, 0.0, 0.0], "std": [1 / 255] * 3}, "pixels 0..255"),
        ({"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}, "not normalized"),
        ({"channels": "bgr"}, "BGR"),
    ],
)
def test_input_preprocessing_errors_point_at_the_input(data, what) -> None:
    report = analyze(trained(), sample(**data))
    assert report.layers[0].name == "conv1.1"
    assert ("input-distribution", "conv1.1") in codes(report), what
    assert report.first_divergent_layer == "conv1.1"
    assert report.output.eval_accuracy < 0.5 < report.output.train_accuracy
    finding = next(f for f in report.findings if f.code == "input-distribution")
    assert "running stds" in finding.message and "preprocessing" in finding.hint


def test_domain_shift_flags_stale_stats(batches) -> None:
    shifted = [(1.0 - x, y) for x, y in batches]  # inverted, in normalized units
    report = analyze(trained(), shifted)
    flagged = {f.code for f in report.findings if f.severity == "error"}
    assert flagged & {"stale-running-stats", "input-distribution"}
    assert report.verdict == "fail"


def test_reset_running_stats_are_never_updated(batches) -> None:
    model = trained()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    report = analyze(model, batches)
    # with labels, the accuracy the reset costs is itself an error (beyond sampling error); the
    # layers already fail the gate, so the output-noise pass is not run and the disagreement is info
    assert {f.code for f in report.findings if f.severity == "error"} == {"never-updated", "accuracy-gap"}
    assert ("output-divergence", None) in codes(report, "info")
    # every layer is reported; an error where the data's statistics are far from 0/1
    per_layer = {c for c in codes(report) | codes(report, "warning") if c[1] is not None}
    assert len(per_layer) == 56 and len(codes(report)) > 28


def test_nan_in_one_layer_ranks_it_first(batches) -> None:
    model = trained()
    with torch.no_grad():
        model.stage3[0].branch2[1].running_var[3] = float("nan")
    report = analyze(model, batches)
    assert report.layers[0].name == "stage3.0.branch2.1" and report.layers[0].score is None
    # eval mode outputs NaN wherever that channel reaches: an error of its own, whatever else is measured
    assert codes(report) == {("non-finite-stats", "stage3.0.branch2.1"), ("accuracy-gap", None),
                             ("output-divergence", None)}
    assert report.output.eval_nonfinite == report.output.outputs_counted


def test_momentum_zero_finetune_is_pseudo_frozen(batches) -> None:
    model = trained("pseudo_frozen")  # what the fine-tuning script had in memory
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
            for p in m.parameters():
                p.requires_grad_(False)
    model.train()
    report = analyze(model, batches)
    assert codes(report) == {("pseudo-frozen", "conv1.1"), ("accuracy-gap", None)}
    top = report.layers[0]
    assert top.name == "conv1.1" and top.attribution > 0.9  # fixing it alone closes the gap
    assert "recovers" in top.findings[0].message
    assert report.output.train_accuracy > 0.9 and report.output.eval_accuracy < 0.6


def test_state_dict_of_the_pseudo_frozen_model_is_stale(batches) -> None:
    # momentum is not in a state_dict; thorough: the output-noise pass runs though the layer fails the gate
    report = analyze(trained("pseudo_frozen"), batches, thorough=True)
    assert codes(report) == {("stale-running-stats", "conv1.1"), ("output-divergence", None),
                             ("accuracy-gap", None)}
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert "what batch noise explains at batch size 32" in net.message and "flagged layers above" in net.message


def test_tracking_disabled_layer(batches) -> None:
    model = trained()
    bn = model.conv1[1]
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    report = analyze(model, batches)
    assert ("tracking-disabled", "conv1.1") in codes(report, "warning")
    assert report.verdict == "pass"


def test_frozen_batchnorm_model(batches) -> None:
    model = trained()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(module, child_name, frozen)
    report = analyze(model, batches)
    assert report.model.bn_layers == 56
    assert {f.code for f in report.findings} == {"frozen-bn"}
    assert not codes(report)
    assert report.output.top1_agreement == 1.0  # no train mode: both passes agree


def test_dead_running_variance_blows_up(batches) -> None:
    model = trained()
    bn = model.stage2[0].branch2[1]
    with torch.no_grad():
        bn.running_var[:3] = 0.0  # e.g. a tool that zeroed "unused" channels
    report = analyze(model, batches)
    layer = next(la for la in report.layers if la.name == "stage2.0.branch2.1")
    codes_here = {f.code for f in layer.findings}
    assert "dead-channels" in codes_here and layer.rank == 1
    finding = next(f for f in layer.findings if f.code == "dead-channels")
    assert finding.message.startswith("3 of 24 channels")


def test_healthy_at_batch_size_8_and_32_has_no_drift() -> None:
    for batch_size, num_batches in ((8, 8), (32, 4)):
        report = analyze(trained(), sample(batch_size=batch_size, num_batches=num_batches))
        assert report.verdict == "pass" and not codes(report)
        assert not any(f.code == "stale-running-stats" for f in report.findings)


def test_truly_stale_layer_is_flagged_at_batch_size_8() -> None:
    report = analyze(trained("pseudo_frozen"), sample(batch_size=8, num_batches=8))
    assert report.layers[0].name == "conv1.1"
    assert ("stale-running-stats", "conv1.1") in codes(report)
