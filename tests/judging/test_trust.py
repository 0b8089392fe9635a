"""Trust on models and pipelines from the wild: a labelled accuracy gap never passes, labels at
chance vouch for nothing, a one-class sample is said first and never recalibrated on, and
time-major sequence outputs are compared per time step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import PYTHON, SAMPLE_ARGS, SAMPLES, module_from_file
from test_fix import sample_model, sample_tensors
from torch import nn

import bncheck
from bncheck.cli import cli
from bncheck.judging.metrics import binomial_tail, mcnemar_p
from bncheck.judging.rules import (
    above_chance,
    accuracy_gap,
    chance_accuracy_finding,
    eval_mode_is_better,
    train_mode_is_better,
)
from bncheck.reporting.render.summary import next_step
from bncheck.reporting.report import OutputDivergence


def test_mcnemar_and_binomial_tail_by_hand() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 5 discordant, all one way: 2 * 0.5^5
    assert mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 * P(X <= 2), X ~ B(12, 1/2)
    assert mcnemar_p(2, 10) == mcnemar_p(10, 2)
    assert mcnemar_p(3, 3) == 1.0
    assert binomial_tail(3, 3, 0.5) == pytest.approx(1 / 8)
    assert binomial_tail(1, 2, 0.5) == pytest.approx(3 / 4)
    assert binomial_tail(0, 5, 0.3) == 1.0 and binomial_tail(6, 5, 0.3) == 0.0
    assert 0.0 < mcnemar_p(200, 0) < 1e-50  # no underflow to a wrong 0 or 1


def labelled(train: float, eval_: float, train_only: int, eval_only: int, n: int = 128,
             classes: int = 10) -> OutputDivergence:
    return OutputDivergence(kind="classifier", train_accuracy=train, eval_accuracy=eval_, labeled=n,
                            train_only_correct=train_only, eval_only_correct=eval_only, classes=classes,
                            accuracy_gap_p=mcnemar_p(train_only, eval_only))  # as OutputTally.result() sets it


def test_labels_at_chance_vouch_for_nothing() -> None:
    """The inverted-digits case: 3.9% train vs 7.8% eval on 10 classes, both below chance."""
    ood = labelled(0.039, 0.078, 3, 8)
    assert not eval_mode_is_better(ood) and not above_chance(ood, ood.eval_accuracy)
    found = chance_accuracy_finding(ood)
    assert found is not None and found.severity == "warning" and "Do not recalibrate" in found.hint
    # a real lead, well above chance, still reads as BN kept in eval on purpose
    frozen = labelled(0.70, 0.85, 4, 23)
    assert eval_mode_is_better(frozen) and chance_accuracy_finding(frozen) is None
    # a lead of a few samples decides nothing
    assert not eval_mode_is_better(labelled(0.80, 0.82, 3, 6))


def test_a_labelled_gap_beyond_sampling_error_is_an_error() -> None:
    ddp = labelled(0.688, 0.445, 40, 9, n=128)  # the DDP sampler-bug case, every layer under the threshold
    assert accuracy_gap(ddp) and train_mode_is_better(ddp)
    assert not accuracy_gap(labelled(0.70, 0.68, 6, 3))  # within sampling error
    assert not accuracy_gap(labelled(0.70, 0.80, 3, 16))  # eval mode ahead


def test_random_labels_on_a_stale_model_fail_and_advise_checking_the_data() -> None:
    x, _ = sample_tensors()
    # seed 5: random labels where eval mode happens to be "more accurate" (27.3% vs 21.1%, 4 classes):
    # before, bn-frozen-in-eval and PASS on a pseudo-frozen model
    y = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(5))
    report = bncheck.analyze(sample_model("pseudo_frozen"), (x[:128], y[:128]), batch_size=32, attribute=0)
    assert report.output.eval_accuracy > report.output.train_accuracy
    codes = {f.code for f in report.findings}
    assert "chance-accuracy" in codes and "bn-frozen-in-eval" not in codes
    assert report.verdict == "fail"
    stale = next(f for f in report.findings if f.code == "stale-running-stats")
    assert "check the sample first" in stale.hint and "recalibrate on representative" not in stale.hint
    assert next_step(report).startswith("chance-accuracy")


@pytest.fixture(scope="module")
def one_class(tmp_path_factory) -> Path:
    """The healthy sample model's data, one class only, without class folders (no labels)."""
    folder = tmp_path_factory.mktemp("one_class")
    for image in sorted((SAMPLES / "data" / "0_circle").glob("*.png")):
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def _args_for(data: Path) -> list[str]:
    args = list(SAMPLE_ARGS)
    args[args.index("--data") + 1] = str(data)
    return args


def test_a_one_class_sample_is_said_first_and_never_recalibrated_on(one_class, tmp_path) -> None:
    result = CliRunner().invoke(cli, ["run", str(SAMPLES / "healthy.pt"), *_args_for(one_class), "--json", "-"])
    assert result.exit_code in (0, 1), result.output
    document = json.loads(result.stdout)
    finding = next(f for f in document["findings"] if f["code"] == "unrepresentative-sample")
    assert "either the sample holds one class" in finding["message"] and "collapsed" in finding["message"]
    for found in document["findings"]:
        if found["code"] in ("stale-running-stats", "pseudo-frozen"):
            assert "check the sample first" in found["hint"]
    assert "recalibrate all" not in (document.get("conclusion") or "")
    out = tmp_path / "fixed.pt"
    refused = CliRunner().invoke(cli, ["fix", str(SAMPLES / "healthy.pt"), *_args_for(one_class), "--out", str(out)])
    assert refused.exit_code == 1 and not out.exists(), refused.output
    assert "unrepresentative-sample" in refused.output
    forced = CliRunner().invoke(cli, ["fix", str(SAMPLES / "healthy.pt"), *_args_for(one_class), "--out", str(out),
                                      "--force"])
    assert out.exists() and "FORCED" in forced.output, forced.output


def test_the_accuracy_gap_says_what_recalibration_recovers() -> None:
    x, y = sample_tensors()
    measured = bncheck.analyze(sample_model("pseudo_frozen"), (x[:128], y[:128]), batch_size=32)
    gap = next(f for f in measured.findings if f.code == "accuracy-gap")
    assert gap.severity == "error" and "McNemar" in gap.message
    assert "raises eval-mode accuracy from" in gap.hint and "(measured)" in gap.hint
    quick = bncheck.analyze(sample_model("pseudo_frozen"), (x[:128], y[:128]), batch_size=32, attribute=0)
    assert "Not measured" in next(f for f in quick.findings if f.code == "accuracy-gap").hint
    healthy = bncheck.analyze(sample_model("healthy"), (x[:128], y[:128]), batch_size=32)
    assert not any(f.code == "accuracy-gap" for f in healthy.findings) and healthy.verdict == "pass"


DDP_TRAIN = '''
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    means = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, -1.0]])
    return torch.randn(n, 3, 16, 16, generator=g) + means[y][:, :, None, None] * 0.5, y


def net():
    torch.manual_seed(0)
    def block(i, o):
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), *block(32, 32), nn.Flatten(),
                         nn.Linear(32, 4))


def worker(rank, out, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    x, y = make_data(2048, 1)
    keep = (y // 2) == rank  # the sampler bug: each rank sees two of the four classes
    x, y = x[keep][:900], y[keep][:900]
    model = nn.parallel.DistributedDataParallel(net())  # no SyncBatchNorm
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 31, 32):
            loss = nn.functional.cross_entropy(model(x[perm[i:i + 32]]), y[perm[i:i + 32]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if rank == 0:  # saved from rank 0, as usual
        torch.save(model.module.state_dict(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
'''


def test_ddp_on_class_disjoint_shards_gets_advice_that_the_measurement_supports(tmp_path) -> None:
    """DDP with 2 gloo processes, each rank on two of four classes, no SyncBN, saved from rank 0.
    Whatever bncheck reads on held-out data of every class, its advice must match what
    recalibrating really does to held-out eval-mode accuracy (measured here by hand)."""
    (tmp_path / "ddp_train.py").write_text(DDP_TRAIN)
    subprocess.run([PYTHON, str(tmp_path / "ddp_train.py"), str(tmp_path / "ddp.pt"), str(tmp_path / "store")],
                   check=True, timeout=300, capture_output=True)
    trained = module_from_file(tmp_path / "ddp_train.py")
    make_data, net = trained.make_data, trained.net
    model = net()
    model.load_state_dict(torch.load(tmp_path / "ddp.pt"))
    model.eval()
    x, y = make_data(512, 7)
    held_x, held_y = make_data(1024, 11)
    report = bncheck.analyze(model, (x, y), batch_size=32)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(held_x).argmax(-1) == held_y).float().mean())

    before = accuracy(model)
    bncheck.recalibrate(model, x, batch_size=32)
    after = accuracy(model)
    codes = {f.code for f in report.findings}
    if after > before + 0.02:  # recalibration helps: never a pass, never "keep these statistics"
        assert report.verdict == "fail" and "bn-frozen-in-eval" not in codes
    if after < before - 0.02:  # recalibration hurts: no finding may advise it
        assert "accuracy-gap" not in codes
        assert all("recalibrate on representative" not in f.hint.lower() for f in report.findings)
    if "accuracy-gap" in codes:
        assert report.verdict == "fail"


class CRNN(nn.Module):
    """conv + BN, then a BiLSTM over the width, returning time-major (T, B, C) log-probabilities
    for CTC, as OCR and ASR models do."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d((4, 1)),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d((1, None)))
        self.rnn = nn.LSTM(16, 16, bidirectional=True)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn(x).squeeze(2).permute(2, 0, 1)  # (T, B, C)
        out, _ = self.rnn(features)
        return self.fc(out).log_softmax(-1)


def test_a_time_major_ctc_model_is_compared_per_time_step() -> None:
    torch.manual_seed(0)
    model = CRNN()
    data = torch.rand(64, 1, 16, 40)  # images in [0, 1]
    bncheck.recalibrate(model, data * 2 - 1, batch_size=16)  # trained on [-1, 1]
    model.eval()
    healthy = bncheck.analyze(model, data * 2 - 1, batch_size=16)
    assert healthy.output.kind == "classifier"  # per time step: 40 steps x 64 samples
    assert healthy.output.top1_agreement > 0.9 and healthy.verdict == "pass"
    wrong = bncheck.analyze(model, data, batch_size=16)  # fed [0, 1]: a preprocessing mismatch
    assert wrong.output.kind == "classifier" and wrong.verdict == "fail"
    first = next(f for f in wrong.findings if f.layer == "cnn.1")
    assert first.code == "input-distribution" or "preprocessing mismatch" in first.hint


@pytest.fixture
def timm_style(tmp_path: Path) -> tuple[Path, Path]:
    """What timm's CheckpointSaver writes: live weights, an EMA copy, the optimizer and the
    pickled argparse.Namespace of the run's arguments. Here the live weights are stale at bn1."""
    import argparse

    from conftest import TinyNet, calibrate, make_batches

    torch.manual_seed(0)
    live = calibrate(TinyNet(), make_batches(8))
    ema = calibrate(TinyNet(), make_batches(8, seed=5))
    with torch.no_grad():
        live.bn1.running_mean += 2.0
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "arch": "tiny", "state_dict": live.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "version": 2,
                "args": argparse.Namespace(lr=0.1, model="tiny"), "state_dict_ema": ema.state_dict()}, path)
    data = tmp_path / "x.pt"
    torch.save(torch.cat(make_batches(4, seed=9)), data)
    return path, data


def test_a_checkpoint_with_an_ema_copy_says_which_it_loaded_and_loads_the_other(timm_style, tmp_path) -> None:
    path, data = timm_style
    args = [str(path), "--arch", f"{Path(__file__).parents[1] / 'conftest.py'}:TinyNet", "--data", str(data),
            "--batch-size", "16", "--json", "-", "--attribute", "0"]
    live = CliRunner().invoke(cli, ["run", *args])
    assert live.exit_code == 1, live.output
    model = json.loads(live.stdout)["model"]
    assert model["weights_key"] == "state_dict" and model["other_weights"] == ["state_dict_ema"]
    assert "holds several models: loaded 'state_dict'" in live.stderr and "--weights" in live.stderr
    ema = CliRunner().invoke(cli, ["run", *args, "--weights", "state_dict_ema"])
    assert ema.exit_code == 0 and json.loads(ema.stdout)["model"]["weights_key"] == "state_dict_ema", ema.output
    config = tmp_path / "c.yaml"
    config.write_text("weights: state_dict_ema\n")
    assert CliRunner().invoke(cli, ["run", *args, "--config", str(config)]).exit_code == 0
    missing = CliRunner().invoke(cli, ["run", *args, "--weights", "swa"])
    assert missing.exit_code == 3 and "state_dict, state_dict_ema" in missing.output


def test_fix_writes_the_picked_model_back_in_place(timm_style, tmp_path) -> None:
    path, data = timm_style
    before = torch.load(path, weights_only=False)
    out = tmp_path / "fixed.pth.tar"
    arch = f"{Path(__file__).parents[1] / 'conftest.py'}:TinyNet"
    result = CliRunner().invoke(cli, ["fix", str(path), "--arch", arch,
                                      "--data", str(data), "--batch-size", "16", "--weights", "state_dict_ema",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    after = torch.load(out, weights_only=False)
    assert set(after) == set(before) and after["args"] == before["args"] and after["epoch"] == 3
    for key, value in before["state_dict"].items():  # the live weights are untouched
        assert torch.equal(after["state_dict"][key], value)
    assert not torch.equal(after["state_dict_ema"]["bn1.running_mean"], before["state_dict_ema"]["bn1.running_mean"])


QAT_ARCH = '''
import torch
import torchvision


def build(num_classes=4):
    model = torchvision.models.quantization.resnet18(weights=None, quantize=False, num_classes=num_classes)
    model.eval()
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    torch.ao.quantization.prepare_qat(model.train(), inplace=True)
    return model.eval()


def build_frozen(num_classes=4):
    model = build(num_classes)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    return model.eval()
'''


@pytest.mark.filterwarnings("ignore")
def test_a_qat_model_loads_and_its_frozen_bn_is_read_as_kept_on_purpose(tmp_path) -> None:
    """prepare_qat, then freeze_bn_stats: FakeQuantize resizes its per-channel scale while
    loading, so bncheck's shape check must let it; the fused ConvBn modules' BN is found, and
    freeze_bn reads as BN kept in eval on purpose (no recalibration advice)."""
    (tmp_path / "qat_arch.py").write_text(QAT_ARCH)
    torch.manual_seed(0)
    model = module_from_file(tmp_path / "qat_arch.py").build().train()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        for i in range(4):
            model(x[i * 16:(i + 1) * 16])
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    torch.save(model.state_dict(), tmp_path / "qat.pt")
    torch.save(torch.randn(64, 3, 32, 32), tmp_path / "x.pt")
    args = [str(tmp_path / "qat.pt"), "--data", str(tmp_path / "x.pt"), "--batch-size", "16", "--json", "-",
            "--attribute", "0"]
    result = CliRunner().invoke(cli, ["run", *args, "--arch", f"{tmp_path / 'qat_arch.py'}:build_frozen"])
    assert result.exit_code in (0, 1), result.output
    document = json.loads(result.stdout)
    names = {layer["name"] for layer in document["layers"]}
    assert "conv1.bn" in names and "layer1.0.conv1.bn" in names
    fused = [f for f in document["findings"] if f["layer"] and f["layer"].endswith(".bn")]
    assert fused and all(f["code"] == "bn-frozen-in-eval" for f in fused if f["code"] != "small-batch-noise")
    assert all("freeze_bn=True" in f["message"] for f in fused if f["code"] == "bn-frozen-in-eval")
    assert "recalibrate all" not in (document.get("conclusion") or "")
    unfrozen = CliRunner().invoke(cli, ["run", *args, "--arch", f"{tmp_path / 'qat_arch.py'}:build"])
    assert unfrozen.exit_code in (0, 1) and "does not fit" not in unfrozen.output, unfrozen.output


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width = 8
    for _ in range(5):
        layers += [nn.Linear(width, 32), nn.BatchNorm1d(32), nn.ReLU()]
        width = 32
    return nn.Sequential(*layers, nn.Linear(32, 5))


def test_weak_evidence_across_layers_adds_up() -> None:
    """Five BN layers each drifted by 0.3 running stds: every one sits 2-4x above its noise floor,
    under drift_to_noise alone, and the output-divergence net sees batch noise at batch size 8.
    Before, PASS; now one model-level error names them with the measured recovery."""
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(256, 8)
    bncheck.recalibrate(model, x, batch_size=64)
    model.eval()
    healthy = bncheck.analyze(model, x[:128], batch_size=8)
    assert healthy.verdict == "pass"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in [m for m in model if isinstance(m, nn.BatchNorm1d)]:
            bn.running_mean += 0.3 * bn.running_var.sqrt() * torch.randn(32, generator=g)
    report = bncheck.analyze(model, x[:128], batch_size=8)
    assert all(layer.drift_to_noise < 4 for layer in report.layers)
    combined = next(f for f in report.findings if f.code == "stale-running-stats" and f.layer is None)
    assert combined.severity == "error" and report.verdict == "fail"
    assert "5 layers each sit" in combined.message and "(measured on 128 samples" in combined.message
    quick = bncheck.analyze(model, x[:128], batch_size=8, attribute=0)  # not measured: a warning that says so
    unmeasured = next(f for f in quick.findings if f.code == "stale-running-stats" and f.layer is None)
    assert unmeasured.severity == "warning" and "not measured" in unmeasured.message


def test_with_attribute_0_the_conclusion_says_its_recovery_was_not_measured() -> None:
    from test_fix import stale_tiny

    model, data = stale_tiny()
    quick = bncheck.analyze(model, data, batch_size=16, attribute=0)
    assert "not measured (--attribute 0)" in quick.conclusion
    measured = bncheck.analyze(model, data, batch_size=16)
    assert "(measured on 16 of 32 kept samples)" in measured.conclusion


def test_labels_showing_eval_as_good_as_train_leave_stale_statistics_at_two_readings() -> None:
    """Eval mode as accurate as train mode on enough labelled samples: nothing measurable to
    recover, so stale-looking statistics are a warning naming both readings (kept in eval on
    purpose, or stale on data too easy to show it) -- not an error advising recalibration."""
    from bncheck.judging.rules import eval_not_worse, stale_at_no_cost
    from bncheck.reporting.report import Finding, OutputDivergence

    def output(labeled, train_only, eval_only, train, evaluated, top=0.3, classes=4):
        from bncheck.judging.metrics import mcnemar_p

        return OutputDivergence("classifier", labeled=labeled, train_only_correct=train_only,
                                eval_only_correct=eval_only, train_accuracy=train, eval_accuracy=evaluated,
                                accuracy_gap_p=mcnemar_p(train_only, eval_only), classes=classes,
                                eval_top_class_share=top)

    assert eval_not_worse(output(64, 0, 3, 0.953, 1.0))       # the ultralytics freeze= case, by its numbers
    assert not eval_not_worse(output(20, 0, 3, 0.85, 1.0))    # too few labels to vouch
    assert not eval_not_worse(output(64, 3, 0, 1.0, 0.953))   # train mode ahead: stale-with-labels instead
    assert not eval_not_worse(output(64, 0, 0, 1.0, 1.0, top=1.0))  # one class for everything vouches for nothing
    assert not eval_not_worse(output(64, 0, 30, 0.5, 0.97))   # eval better beyond chance: frozen-on-purpose instead

    def boxes(train, evaluated):
        return OutputDivergence("detection", labeled=48, train_only_correct=0, eval_only_correct=0, objects=94,
                                train_accuracy=train, eval_accuracy=evaluated, accuracy_gap_p=1.0)

    assert eval_not_worse(boxes(0.92, 0.92))  # a detector finding its targets in both modes
    # recall 0 in both modes (category ids the model does not use, an untrained head) vouches for nothing
    assert not eval_not_worse(boxes(0.0, 0.0)) and not eval_not_worse(boxes(0.05, 0.05))
    stale = Finding("stale-running-stats", "error", "bn1", "running stats disagree with this data.", "Recalibrate.")
    read = stale_at_no_cost(stale, 0.953, 1.0, "accuracy", 64)
    assert read.severity == "warning" and "100.0% vs 95.3%" in read.message and "Two readings" in read.hint
    assert "Recalibrate" not in read.hint
