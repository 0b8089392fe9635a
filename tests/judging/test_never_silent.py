"""Never a silent pass, never harmful advice (issue 13, the parts done): TorchScript layers that
cannot be measured, the output-divergence net and its calibration, batches of one class,
unused layers, negative attribution, grouped findings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import SAMPLES, TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.config import load_settings
from bncheck.reading.data import open_data
from bncheck.reporting.render import render
from bncheck.reporting.render.summary import next_step
from bncheck.reporting.report import Finding


def trained(name: str) -> nn.Module:
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


def sample(batch_size: int = 32, num_batches: int = 4, seed: int = 0) -> list:
    cfg = load_settings(SAMPLES / "config.yaml", {"data": {"seed": seed}}).data
    return list(open_data(SAMPLES / "data", cfg, batch_size, num_batches).batches())


def test_torchscript_with_momentum_zero_is_measured_like_the_eager_model() -> None:
    model = trained("pseudo_frozen")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # the seed bug, then scripted for deployment
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    graph = dict(scripted.named_modules())["conv1.1"].code
    state = {k: v.clone() for k, v in scripted.state_dict().items()}
    data = sample()
    report = bncheck.analyze(scripted, data)
    eager = bncheck.analyze(model, data)
    assert report.verdict == "fail"
    assert not any(f.code == "unmeasurable" for f in report.findings)
    assert (report.findings[0].code, report.findings[0].layer) == ("pseudo-frozen", "conv1.1")
    by_name = {layer.name: layer for layer in eager.layers}
    assert all(layer.score is not None for layer in report.layers)
    for layer in report.layers:  # batch statistics from the buffers equal the hooks' to a few percent
        assert layer.score == pytest.approx(by_name[layer.name].score, rel=0.05, abs=0.01)
    assert report.output == eager.output
    assert dict(scripted.named_modules())["conv1.1"].code == graph  # the caller's module is untouched
    assert all(torch.equal(state[k], v) for k, v in scripted.state_dict().items())


def test_torchscript_layers_that_cannot_be_measured_do_not_pass_silently(monkeypatch) -> None:
    from bncheck.runtime import scripted as twins

    monkeypatch.setattr(twins, "_edit", lambda module: False)  # a graph bncheck cannot edit
    model = trained("pseudo_frozen")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    report = bncheck.analyze(scripted, sample())
    assert report.verdict == "fail"
    codes = {f.code for f in report.findings}
    assert {"unmeasurable", "output-divergence"} <= codes
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert "56 BN layers could not be measured" in net.message
    assert all(layer.score is None for layer in report.layers)


@pytest.mark.parametrize("batch_size", [8, 32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_model_raises_no_output_divergence(batch_size, seed) -> None:
    report = bncheck.analyze(trained("healthy"), sample(batch_size, 128 // batch_size, seed))
    assert not any(f.code == "output-divergence" for f in report.findings), report.output


def by_class(batches: list) -> list:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    order = torch.argsort(y, stable=True)
    return [(x[order][i:i + 32], y[order][i:i + 32]) for i in range(0, len(y), 32)]


def test_batches_of_one_class_are_called_unrepresentative_not_drift() -> None:
    model = trained("healthy")
    batches = by_class(sample(32, 8))  # 256 images, 64 per class: each batch holds one class
    report = bncheck.analyze(model, batches)
    assert report.output.top1_agreement < 0.9  # train mode on one-class batches diverges by construction
    codes = {f.code: f for f in report.findings}
    assert "output-divergence" not in codes
    assert "unrepresentative-batches" in codes and "1.0 of the 4 classes" in codes["unrepresentative-batches"].message
    unlabelled = bncheck.analyze(model, [x for x, _ in batches])
    assert not any(f.code == "output-divergence" for f in unlabelled.findings)
    assert any(f.code == "unrepresentative-batches" for f in unlabelled.findings), unlabelled.findings


def test_a_bn_that_never_runs_is_unused_not_never_updated() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = calibrate(TinyNet(), make_batches(4, seed=5))
            self.spare = nn.BatchNorm1d(7)  # declared, never called (as in pytorch-tabnet)

        def forward(self, x):
            return self.net(x)

    report = bncheck.analyze(WithSpare(), make_batches(2))
    spare = next(layer for layer in report.layers if layer.name == "spare")
    assert [(f.code, f.severity) for f in spare.findings] == [("unused-layer", "info")]
    assert report.verdict == "pass"


def test_next_step_never_points_at_a_layer_whose_fix_alone_hurts() -> None:
    from dataclasses import replace

    from test_report import make_report

    report = make_report()
    first = report.findings[0]
    layers = tuple(replace(layer, attribution=-0.27) if layer.name == first.layer else layer
                   for layer in report.layers)
    hurting = replace(report, layers=layers)
    assert first.layer not in next_step(hurting) or "widens the output gap" in next_step(hurting)


def test_many_findings_of_one_code_read_as_one_group() -> None:
    from dataclasses import replace

    from test_report import make_report

    report = make_report()
    many = tuple(Finding("unmeasurable", "warning", f"layer{i}", "m", "h") for i in range(6))
    text = render(replace(report, findings=many), "table", top=2)
    assert text.count("unmeasurable layer") == 2 and "... and 4 more layers with unmeasurable: layer2, layer3" in text


def test_bn_frozen_on_purpose_with_labels_passes_without_recalibration_advice(tmp_path) -> None:
    from test_fix import Head, frozen_on_purpose

    ckpt, data = frozen_on_purpose(tmp_path)
    model = Head()
    model.load_state_dict(torch.load(ckpt))
    model.eval()
    x, y = torch.load(data)
    report = bncheck.analyze(model, (x, y), batch_size=64)
    assert report.output.eval_accuracy > report.output.train_accuracy
    codes = {f.code for f in report.findings}
    assert "bn-frozen-in-eval" in codes and not codes & {"stale-running-stats", "pseudo-frozen"}
    assert report.verdict == "pass"
    frozen = next(f for f in report.findings if f.code == "bn-frozen-in-eval")
    assert frozen.layer == "bn" and "Do not recalibrate" in frozen.hint
    assert "recalibrate" not in next_step(report).lower() or "do not recalibrate" in next_step(report).lower()
    # without labels the same numbers name both readings and how to tell them apart
    unlabelled = bncheck.analyze(model, x, batch_size=64)
    stale = next(f for f in unlabelled.findings if f.code == "stale-running-stats")
    assert "Two readings fit" in stale.hint and "deliberately kept in eval mode" in stale.hint


def test_labels_showing_train_mode_better_leave_one_reading() -> None:
    """The pseudo-frozen sample with labels: train mode 98% vs eval 52%, so the stale layer's
    hint says recalibrate plainly instead of naming BN frozen on purpose."""
    from test_fix import sample_model, sample_tensors

    x, y = sample_tensors()
    report = bncheck.analyze(sample_model("pseudo_frozen"), (x[:128], y[:128]), batch_size=32, attribute=0)
    assert report.output.train_accuracy - report.output.eval_accuracy > 0.4
    stale = next(f for f in report.findings if f.code == "stale-running-stats")
    assert stale.hint.startswith("Labels rule out BN kept in eval mode on purpose (train-mode accuracy ")
    assert "Two readings" not in stale.hint and "bncheck fix" in stale.hint
    assert "Two readings" not in next_step(report)


class Tabular(nn.Module):
    """A tabular classifier with a BatchNorm1d input layer and momentum 0.01 (as in
    pytorch-tabnet), plus one BN that is declared but never used."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm1d(6, momentum=0.01)
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
        self.unused_bn = nn.BatchNorm1d(32)

    def forward(self, x):
        return self.body(self.input_bn(x))


def tabular_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.02, 0.03, 0.05, 1.0, 2.0, 0.04])  # small-variance features carry the signal
    x = torch.randn(n, 6, generator=gen) * scales + torch.tensor([0.5, -0.2, 0.1, 3.0, 0.0, 1.0])
    y = (((x[:, 0] - 0.5) / 0.02 + (x[:, 1] + 0.2) / 0.03 - (x[:, 5] - 1.0) / 0.04) > 0).long()
    return x, y


def test_drift_after_a_recalibration_is_not_called_unconverged() -> None:
    """A recalibration leaves a small counter (2 batches: (1 - 0.1)^2 = 81% "residual") on
    statistics that are exact; a later drift must read as stale, not as an initial value the
    buffers never held. The EMA-from-init reading is taken only when it predicts the buffers."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).eval()
    data = torch.randn(32, 3, 32, 32)
    bncheck.recalibrate(model, data, batch_size=16)
    layer = model.bn1
    assert int(layer.num_batches_tracked) == 2
    with torch.no_grad():
        layer.running_mean += 3 * layer.running_var.sqrt()
    report = bncheck.analyze(model, data, batch_size=16)
    codes = {(f.code, f.layer) for f in report.findings}
    assert ("stale-running-stats", "bn1") in codes and not any(c == "unconverged-running-stats" for c, _ in codes)


def test_unconverged_running_stats_are_named_with_their_residual() -> None:
    torch.manual_seed(0)
    model = Tabular()
    x, y = tabular_data(4096, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(300):  # a few hundred updates: 0.99 ** 300 = 4.9% of the initial var 1 remains
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    test = tabular_data(512, seed=2)
    report = bncheck.analyze(model, test, batch_size=64)
    assert report.output.eval_accuracy < report.output.train_accuracy - 0.05
    top = report.layers[0]
    assert top.name == "input_bn"
    finding = next(f for f in report.findings if f.layer == "input_bn")
    assert finding.code == "unconverged-running-stats" and "4.9% of their initial value" in finding.message
    assert "(1 - momentum 0.01) ^ 300 updates" in finding.message
    unused = next(layer for layer in report.layers if layer.name == "unused_bn")
    assert [f.code for f in unused.findings] == ["unused-layer"]
    before = report.output.eval_accuracy
    bncheck.recalibrate(model, test[0][:256], batch_size=64)
    after = bncheck.analyze(model, (test[0][256:], test[1][256:]), batch_size=64).output.eval_accuracy
    assert after > before + 0.03  # exact statistics, no residual: the squashed features come back


class SharedAndGhost(nn.Module):
    """bn_a, then one BN shared by two calls on different inputs, then a ghost BN over chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.shared, self.ghost = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn_a(self.conv(x))
        x = self.shared(x) + self.shared(2 * x + 1)
        x = torch.cat([self.ghost(chunk) for chunk in x.split(4)])
        return self.head(x.mean((2, 3)))


def test_shared_and_ghost_bn_pool_every_call_in_both_passes_and_take_their_first_depth() -> None:
    model = SharedAndGhost().eval()
    data = torch.randn(64, 3, 8, 8)
    bncheck.recalibrate(model, data, batch_size=16)  # exact statistics over every call
    report = bncheck.analyze(model, torch.randn(64, 3, 8, 8), batch_size=16)
    depth = {layer.name: layer.depth for layer in report.layers}
    assert depth == {"bn_a": 0, "shared": 1, "ghost": 2}
    # had either pass seen only one of the shared calls, its statistics would be off by ~1 std
    for layer in report.layers:
        assert layer.score < 0.2 and layer.eval_score < 0.2, layer
    assert report.verdict == "pass" and not [f for f in report.findings if f.severity != "info"]


def test_momentum_from_a_library_default_is_not_reasoned_from(tmp_path) -> None:
    from bncheck.reading.checkpoint import open_checkpoint

    model = TinyNet()
    model.bn2.momentum = 0.0
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rebuilt = open_checkpoint(tmp_path / "w.pt", f"{SAMPLES.parent / 'tests' / 'conftest.py'}:TinyNet")
    assert rebuilt.info.momentum_from == "builder"  # the user's own code: as in training
    pickled = tmp_path / "m.pt"
    torch.save(model, pickled)
    assert open_checkpoint(pickled, trust_checkpoint=True).info.momentum_from == "checkpoint"
    # a module whose momentum 0 is real is pseudo-frozen; the same numbers with momentum_known=False are not
    found = {f.code for f in bncheck.lint(model).findings if f.layer == "bn2"}
    assert "pseudo-frozen" in found
    found = {f.code for f in bncheck.lint(model, momentum_known=False).findings if f.layer == "bn2"}
    assert "pseudo-frozen" not in found


def test_standardized_features_fed_to_a_raw_trained_model_are_an_input_problem() -> None:
    torch.manual_seed(0)
    scales = torch.tensor([1e-3, 1.0, 300.0, 0.05])
    raw = torch.randn(512, 4) * scales + torch.tensor([0.01, 2.0, 1000.0, 0.3])
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bncheck.recalibrate(model, raw, batch_size=64)  # trained on raw units
    standardized = (raw - raw.mean(0)) / raw.std(0)  # deployment pipeline standardizes
    report = bncheck.analyze(model, standardized, batch_size=64)
    finding = next(f for f in report.findings if f.layer == "0")
    assert finding.code == "input-distribution" and "units or normalization mismatch" in finding.message
    assert "tabular or audio features" in finding.hint


def test_many_stale_layers_conclude_once_with_the_measured_recovery() -> None:
    model = trained("healthy")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # a quarter of the layers keep statistics of another domain
        for bn in bns[::4]:
            bn.running_mean += 1.5 * bn.running_var.sqrt()
    report = bncheck.analyze(model, sample())
    assert report.conclusion is not None and report.conclusion.startswith(f"{len(bns[::4])} of 56 measured BN layers")
    assert "recalibrate all 56 BN layers together (what bncheck fix does" in report.conclusion
    assert "% of the output gap (measured)" in report.conclusion
    assert f"recalibrating only the {len(bns[::4])} flagged recovers" in report.conclusion
    assert next_step(report) == report.conclusion
    assert "conclusion " in render(report, "table")
    html = render(report, "html")
    assert "<details" in html and "Conclusion:" in html
