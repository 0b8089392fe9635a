"""The engine on tiny models whose answer is known."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import TinyNet, calibrate, make_batches
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import bncheck
from bncheck.engine import analyze
from bncheck.errors import InputError
from bncheck.runtime import find_bn_layers, fingerprint


def state_copy(model: nn.Module) -> tuple[dict, dict]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return tensors, flags


def assert_identical(model: nn.Module, before: tuple[dict, dict]) -> None:
    tensors, flags = before
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for key, value in tensors.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert {name: m.training for name, m in model.named_modules()} == flags
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def by_name(report, name):
    return next(layer for layer in report.layers if layer.name == name)


def test_calibrated_model_passes_with_no_error(tiny, batches) -> None:
    report = analyze(tiny, batches)
    assert report.verdict == "pass"
    assert not [f for f in report.findings if f.severity == "error"]
    assert all(layer.score is not None and layer.score < 0.25 for layer in report.layers)
    assert report.output.kind == "classifier" and report.output.top1_agreement > 0.8
    assert report.first_divergent_layer is None
    assert report.data.samples == 64 and report.data.batches == 4 and report.data.batch_size == 16


def test_corrupted_layer_ranks_first_and_fails(tiny, batches) -> None:
    with torch.no_grad():
        tiny.bn2.running_mean += 3 * tiny.bn2.running_var.sqrt()
    report = analyze(tiny, batches)
    top = report.layers[0]
    assert top.name == "bn2" and top.rank == 1
    assert top.score == pytest.approx(3.0, rel=0.1)
    assert top.mean_shift == pytest.approx(3.0, rel=0.1)
    assert [f.code for f in top.findings] == ["stale-running-stats"]
    assert top.findings[0].severity == "error"
    assert top.drift_to_noise > 10
    assert report.verdict == "fail"
    # The train pass isolates the cause: downstream layers stay quiet.
    assert by_name(report, "bn3").score < 0.25
    # The eval pass shows where deployment diverges first.
    assert report.first_divergent_layer == "bn2"
    assert by_name(report, "bn3").eval_score > by_name(report, "bn3").score


def test_score_equals_hand_computed_shift_on_exact_statistics() -> None:
    # One BN layer; running stats = exact data stats with the mean moved by 2 running stds
    # and the variance doubled: a = sqrt((v + eps) / (2v + eps)) ~ 1/sqrt(2), b = -2 / sqrt(2).
    gen = torch.Generator().manual_seed(5)
    data = [torch.randn(8, 4, 6, 6, generator=gen) * 3 + 1 for _ in range(3)]
    bn = nn.BatchNorm2d(4, eps=1e-12, affine=False)
    allx = torch.cat(data).transpose(0, 1).reshape(4, -1).double()
    mean, var = allx.mean(1), allx.var(1, unbiased=False)
    with torch.no_grad():
        bn.running_var.copy_(2 * var)
        bn.running_mean.copy_(mean + 2 * (2 * var).sqrt())
    bn.eval()
    report = analyze(nn.Sequential(bn), data)
    layer = report.layers[0]
    a, b = 1 / math.sqrt(2), -2.0
    assert layer.mean_shift == pytest.approx(2.0, rel=1e-4)
    assert layer.scale_ratio == pytest.approx(a, rel=1e-4)
    assert layer.score == pytest.approx(math.sqrt((a - 1) ** 2 + b**2), rel=1e-4)
    assert layer.kl == pytest.approx(0.5 * (a**2 - 1 - 2 * math.log(a) + b**2), rel=1e-4)
    assert layer.worst_channels[0].mean_shift == pytest.approx(-2.0, rel=1e-4)


def test_gamma_weighting_ignores_channels_nobody_reads(batches) -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=9))
    with torch.no_grad():
        model.bn1.running_mean[0] += 50.0  # a wildly wrong channel...
        model.bn1.weight[0] = 0.0  # ...that the next layer never sees
    report = analyze(model, batches)
    assert by_name(report, "bn1").score < 0.25
    assert by_name(report, "bn1").max_error > 10


def test_run_leaves_model_bit_identical(tiny, batches) -> None:
    tiny.bn1.momentum = None  # cumulative average: num_batches_tracked drives the update
    tiny.train()
    tiny.head.eval()
    before = state_copy(tiny)
    print_before = fingerprint(tiny)
    analyze(tiny, batches)
    assert_identical(tiny, before)
    assert fingerprint(tiny) == print_before
    assert int(tiny.bn1.num_batches_tracked) == int(before[0]["bn1.num_batches_tracked"])


def test_failure_mid_run_restores_everything(tiny, batches) -> None:
    before = state_copy(tiny)
    bad = [*batches[:2], torch.randn(4, 7, 12, 12)]  # wrong channel count in the 3rd batch
    with pytest.raises(InputError, match="forward pass failed"):
        analyze(tiny, bad)
    assert_identical(tiny, before)


def test_only_bn_layers_train_in_the_train_pass(tiny, batches) -> None:
    seen = []
    tiny.drop.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    analyze(tiny, batches)
    assert seen and not any(seen)  # Dropout stayed in eval mode in both passes


def test_non_finite_running_stats_rank_first(tiny, batches) -> None:
    with torch.no_grad():
        tiny.bn3.running_var[2] = float("nan")
        tiny.bn1.running_mean += 5.0
    report = analyze(tiny, batches)
    assert report.layers[0].name == "bn3" and report.layers[0].score is None
    assert any(f.code == "non-finite-stats" and f.severity == "error" for f in report.layers[0].findings)
    assert report.layers[1].name == "bn1"


def test_never_updated_buffers(batches) -> None:
    model = TinyNet().eval()  # running stats at their defaults: mean 0, var 1
    report = analyze(model, batches)
    codes = {f.code for f in report.findings}
    assert "never-updated" in codes


def test_tracking_disabled_and_momentum_none_are_handled(batches) -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=4))
    model.bn2 = nn.BatchNorm2d(8, track_running_stats=False)
    model.bn3.momentum = None
    report = analyze(model, batches)
    bn2 = by_name(report, "bn2")
    assert bn2.score is None and not bn2.track_running_stats
    assert [f.code for f in bn2.findings] == ["tracking-disabled"]
    assert bn2.rank == len(report.layers)  # unmeasurable layers rank last
    bn3 = by_name(report, "bn3")
    # calibrated on other batches of the same distribution: measured, and small
    assert bn3.momentum is None and 0.0 < bn3.score < 0.25


def test_frozen_batchnorm_lookalike_is_checked_against_data(batches) -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=4))
    frozen = FrozenBatchNorm2d(8)
    frozen.running_mean.copy_(model.bn2.running_mean + 4 * model.bn2.running_var.sqrt())
    frozen.running_var.copy_(model.bn2.running_var)
    frozen.weight.copy_(model.bn2.weight)
    frozen.bias.copy_(model.bn2.bias)
    model.bn2 = frozen
    layers = find_bn_layers(model)
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("bn1", "batchnorm"), ("bn2", "frozen"), ("bn3", "batchnorm")
    ]
    report = analyze(model, batches)
    top = report.layers[0]
    assert top.name == "bn2" and top.type == "FrozenBatchNorm2d"
    assert {f.code for f in top.findings} == {"frozen-bn", "stale-running-stats"}


def test_batchnorm1d_on_flat_features() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    data = [torch.randn(32, 6) for _ in range(4)]
    calibrate(model, [torch.randn(32, 6) for _ in range(16)])
    assert analyze(model, data).verdict == "pass"
    with torch.no_grad():
        model[1].running_var.mul_(25.0)
    report = analyze(model, data)
    assert report.layers[0].name == "1" and report.verdict == "fail"
    assert report.layers[0].scale_ratio == pytest.approx(0.2, rel=0.15)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_model_recovers_batch_stats_from_buffers(batches) -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=123))
    with torch.no_grad():
        model.bn2.running_mean += 3 * model.bn2.running_var.sqrt()
    scripted = torch.jit.script(model)
    report = analyze(scripted, batches)
    assert report.model.bn_layers == 3
    assert report.layers[0].name == "bn2"
    assert report.layers[0].score == pytest.approx(3.0, rel=0.15)
    assert report.verdict == "fail"
    healthy = torch.jit.script(calibrate(TinyNet(), make_batches(8, seed=123)))
    assert analyze(healthy, batches).verdict == "pass"


@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_bn_subclasses_are_found_by_what_they_do(export) -> None:
    """timm's BatchNormAct2d keeps its own class name in a TorchScript archive: found because it
    makes one batch_norm call on running buffers (was: 'no-batchnorm', a pass)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).eval()
    data = torch.randn(32, 3, 32, 32)
    bncheck.recalibrate(model, data, batch_size=16)
    layer = next(m for m in model.modules() if type(m).__name__ == "BatchNormAct2d" and m.num_features >= 16)
    with torch.no_grad():
        layer.running_mean += 3 * layer.running_var.sqrt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(model) if export == "script" else torch.jit.trace(model, data[:4])
    eager, report = analyze(model, data, batch_size=16), analyze(exported, data, batch_size=16)
    assert report.model.bn_layers == eager.model.bn_layers > 10
    assert all(la.score is not None for la in report.layers if la.depth is not None)
    assert report.verdict == eager.verdict == "fail"
    assert report.layers[0].name == eager.layers[0].name
    assert report.layers[0].score == pytest.approx(eager.layers[0].score, rel=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.01])
def test_a_trace_after_eval_reads_momentum_from_its_graph_and_matches_the_eager_findings(momentum, batches) -> None:
    """A traced BN module has no momentum attribute: the constant in its graph is the momentum
    (0: the seed bug, pseudo-frozen; 0.01: not the 0.1 default)."""
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    with torch.no_grad():
        model.bn2.running_mean += 2 * model.bn2.running_var.sqrt()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.momentum = momentum
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), batches[0])
    assert [layer.momentum for layer in find_bn_layers(traced)] == [momentum] * 3
    report, eager = analyze(traced, batches), analyze(model, batches)
    assert [layer.momentum for layer in report.layers] == [momentum] * 3
    assert [(f.code, f.layer) for f in report.findings] == [(f.code, f.layer) for f in eager.findings]
    assert report.findings[0].code == ("pseudo-frozen" if momentum == 0.0 else "stale-running-stats")
    assert [layer.momentum for layer in find_bn_layers(traced)] == [momentum] * 3  # the caller's graph as it was


def test_ignore_globs_and_no_batchnorm(tiny, batches) -> None:
    with torch.no_grad():
        tiny.bn2.running_mean += 10.0
    report = analyze(tiny, batches, ignore=["bn2"])
    assert "bn2" not in [layer.name for layer in report.layers] and report.verdict == "pass"
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    report = analyze(plain, batches)
    assert report.verdict == "no-batchnorm" and report.layers == () and report.model.bn_layers == 0


def test_dict_outputs_use_relative_l2_and_logits_count_as_classifier(tiny, batches) -> None:
    class Wrapper(nn.Module):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.net, self.key = tiny, key

        def forward(self, x):
            return {self.key: self.net(x), "aux": [self.net(x) * 2]}

    report = analyze(Wrapper("scores"), batches)
    # eval and train outputs of a calibrated model differ only by batch noise
    assert report.output.kind == "tensor" and 0.0 < report.output.relative_l2 < 0.5
    assert report.output.top1_agreement is None
    # transformers-style outputs: the logits are what a classifier's user compares
    report = analyze(Wrapper("logits"), batches)
    assert report.output.kind == "classifier" and report.output.top1_agreement > 0.8


def test_labels_give_train_and_eval_accuracy(tiny, batches) -> None:
    labelled = [(x, tiny(x).argmax(1)) for x in batches]  # labels = eval-mode predictions
    report = analyze(tiny, labelled)
    assert report.output.eval_accuracy == 1.0
    assert 0.0 <= report.output.train_accuracy <= 1.0


def test_lint_without_data_reads_the_checkpoint_alone() -> None:
    from bncheck.engine import lint

    model = TinyNet()
    model.bn1.momentum = 0.0  # pseudo-frozen
    model.bn1.running_mean.fill_(0.3)
    model.bn1.num_batches_tracked.fill_(100)
    for p in model.bn2.parameters():
        p.requires_grad_(False)  # frozen affine, and the module is saved in train mode
    model.bn2.running_mean.fill_(0.1)
    model.bn2.num_batches_tracked.fill_(5)
    model.bn3.running_var[:3] = 0.0  # dead channels
    model.bn3.eps = 0.5  # a conversion tool's typo
    model.bn3.running_mean.fill_(0.2)
    model.bn3.num_batches_tracked.fill_(5)
    before = state_copy(model)
    report = lint(model)
    assert_identical(model, before)
    codes = {(f.layer, f.code) for f in report.findings}
    assert ("bn1", "pseudo-frozen") in codes and ("bn2", "pseudo-frozen") in codes
    assert ("bn3", "dead-channels") in codes and ("bn3", "unusual-eps") in codes
    assert report.data.samples == 0 and report.output.kind == "none"
    assert all(layer.score is None for layer in report.layers)
    assert report.verdict == "pass"  # warnings only: nothing measured yet
    fresh = lint(TinyNet())
    assert {f.code for f in fresh.findings} == {"never-updated"}
    cumulative = TinyNet()
    cumulative.bn2.momentum = None
    cumulative.bn2.running_mean.fill_(0.5)
    found = {(f.layer, f.code, f.severity) for f in lint(cumulative).findings}
    assert ("bn2", "momentum-none", "info") in found
    assert not any(code == "stale-running-stats" for _, code, _ in found)  # one meaning per code
