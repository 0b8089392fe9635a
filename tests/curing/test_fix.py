"""bncheck fix: the cure on trained samples, every format written back, refusals, atomic writes."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import PYTHON, SAMPLE_ARGS, SAMPLES, TinyNet, calibrate, file_hash, make_batches
from torch import nn

import bncheck
from bncheck.cli import cli
from bncheck.config import load_settings
from bncheck.reading.checkpoint import open_checkpoint
from bncheck.reading.data import open_data
from bncheck.reporting.report import schema_path

ARCH = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", "{num_classes: 4}"]


def sample_model(name: str) -> nn.Module:
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


def sample_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    cfg = load_settings(SAMPLES / "config.yaml").data
    pairs = list(open_data(SAMPLES / "data", cfg, 32, None).batches())
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool) -> float:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    for m in bns:
        m.train(train)
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(32), y.split(32)))
    model.load_state_dict(saved)
    model.eval()
    return correct / len(y)


def test_recalibration_cures_the_pseudo_frozen_sample_on_held_out_data() -> None:
    x, y = sample_tensors()
    fit, held_out = slice(0, 128), slice(128, 256)  # the shuffle mixes classes in both halves
    model = sample_model("pseudo_frozen")
    before_eval = accuracy(model, x[held_out], y[held_out], train=False)
    train_mode = accuracy(model, x[held_out], y[held_out], train=True)
    bncheck.recalibrate(model, x[fit], batch_size=32)
    after_eval = accuracy(model, x[held_out], y[held_out], train=False)
    assert before_eval < 0.6 and train_mode > 0.9
    assert after_eval >= train_mode - 0.02, (before_eval, after_eval, train_mode)


def run_fix(args: list[str]):
    return CliRunner().invoke(cli, ["fix", *args], catch_exceptions=False)


def test_fix_cli_writes_a_state_dict_that_passes(tmp_path) -> None:
    out = tmp_path / "fixed.pt"
    source_hash = file_hash(SAMPLES / "pseudo_frozen.pt")
    result = run_fix([str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "--out", str(out), "--json",
                      str(tmp_path / "fix.json")])
    assert result.exit_code == 0, result.output
    assert "bncheck fix WRITTEN" in result.output and "stale-running-stats -> -" in result.output
    assert file_hash(SAMPLES / "pseudo_frozen.pt") == source_hash
    document = json.loads((tmp_path / "fix.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(document, json.loads(schema_path("fix").read_text()))
    for part in ("before", "after"):
        jsonschema.validate(document[part], json.loads(schema_path().read_text()))
    assert document["outcome"] == "written" and document["verdict"] == "pass"
    assert document["before"]["output"]["eval_accuracy"] < 0.6 < 0.95 < document["after"]["output"]["eval_accuracy"]
    # checked on the last of the 4 batches, recalibrated on the other 3 (statistics that never saw it)
    held = document["held_out"]
    assert held["metric"] == "accuracy" and held["samples"] == 32 and held["fitted"] == 96
    assert held["before"] < 0.9 < held["after"]
    assert "held   eval-mode accuracy" in result.output
    rerun = CliRunner().invoke(cli, ["run", str(out), *SAMPLE_ARGS, "--save", str(tmp_path / "r.json"), "-q"])
    assert rerun.exit_code == 0, rerun.output
    original, fixed = torch.load(SAMPLES / "pseudo_frozen.pt"), torch.load(out)
    assert original.keys() == fixed.keys()
    changed = {k for k in original if not torch.equal(original[k], fixed[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


def test_fix_refuses_existing_out_the_input_and_dry_run_writes_nothing(tmp_path) -> None:
    ckpt = SAMPLES / "healthy.pt"
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    result = run_fix([str(ckpt), *SAMPLE_ARGS, "--out", str(existing)])
    assert result.exit_code == 3 and "already exists" in result.output and existing.read_bytes() == b"keep me"
    result = run_fix([str(ckpt), *SAMPLE_ARGS, "--out", str(ckpt)])
    assert result.exit_code == 3 and "is the input checkpoint" in result.output
    result = run_fix([str(ckpt), *SAMPLE_ARGS])
    assert result.exit_code == 2 and "--out" in result.output
    result = run_fix([str(ckpt), *SAMPLE_ARGS, "--dry-run", "--out", str(tmp_path / "new.pt")])
    assert result.exit_code == 0 and "DRY-RUN" in result.output and not (tmp_path / "new.pt").exists()
    result = run_fix([str(ckpt), *SAMPLE_ARGS, "--out", str(existing), "--force", "--num-samples", "64", "-q"])
    assert result.exit_code == 0, result.output
    assert torch.load(existing).keys() == torch.load(ckpt).keys()


def test_fix_refuses_unnormalized_input_unless_forced(tmp_path) -> None:
    x, y = sample_tensors()
    raw = tmp_path / "raw.pt"
    torch.save({"inputs": (x * 0.229 + 0.485) * 255.0, "labels": y}, raw)  # 0..255 instead of normalized
    args = [str(SAMPLES / "pseudo_frozen.pt"), *ARCH, "--data", str(raw), "--out", str(tmp_path / "o.pt")]
    result = run_fix(args)
    assert result.exit_code == 1 and "REFUSED" in result.output and "input-distribution" in result.output
    assert not (tmp_path / "o.pt").exists()
    result = run_fix([*args, "--force", "--json", "-"])
    document = json.loads(result.stdout)
    assert document["outcome"] == "written" and (tmp_path / "o.pt").exists()
    assert any("FORCED" in w for w in document["warnings"])


class Head(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> BN (kept in eval while fine-tuning, statistics from
    another domain) -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.bn0 = nn.Linear(2, 16), nn.BatchNorm1d(16)
        self.mid, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.bn0(self.features(x)))
        return self.head(torch.relu(self.bn(self.mid(x))))


def build_head() -> Head:
    return Head()


def frozen_on_purpose(tmp_path: Path) -> tuple[Path, Path]:
    """A model fine-tuned the right way on data its BN statistics never saw: BN in eval mode,
    the layers after it trained on the statistics it has."""
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(512, 2) * 2 + torch.tensor([3.0, -1.0])
    y = ((x[:, 0] - 3) * 0.8 + (x[:, 1] + 1) > 0.7).long()
    bncheck.recalibrate(model, x, layers=["bn0"], batch_size=64)  # the input layer matches the data
    with torch.no_grad():  # the deeper layer keeps statistics of another domain
        model.bn.running_mean.add_(torch.randn(16) * 0.8 * model.bn.running_var.sqrt())
        model.bn.running_var.mul_(torch.empty(16).uniform_(0.3, 3.0))
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.05)
    model.eval()  # BN kept in eval mode: its statistics stay as they are
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "frozen.pt")
    torch.save((x, y), tmp_path / "data.pt")
    return tmp_path / "frozen.pt", tmp_path / "data.pt"


def test_fix_does_no_harm_to_bn_frozen_on_purpose(tmp_path) -> None:
    ckpt, data = frozen_on_purpose(tmp_path)
    arch = f"{Path(__file__).resolve()}:build_head"
    result = run_fix([str(ckpt), "--arch", arch, "--data", str(data), "--out", str(tmp_path / "o.pt"),
                      "--json", str(tmp_path / "fix.json")])
    document = json.loads((tmp_path / "fix.json").read_text())
    assert result.exit_code == 1, result.output
    assert document["outcome"] == "refused"
    assert any("lowers eval-mode accuracy" in reason for reason in document["reasons"]), document["reasons"]
    assert document["after"]["output"]["eval_accuracy"] < document["before"]["output"]["eval_accuracy"]
    assert not (tmp_path / "o.pt").exists()


def test_without_labels_fix_says_accuracy_was_not_verified(tmp_path) -> None:
    x, _ = sample_tensors()
    torch.save(x[:64], tmp_path / "x.pt")
    result = run_fix([str(SAMPLES / "pseudo_frozen.pt"), *ARCH, "--data", str(tmp_path / "x.pt"),
                      "--dry-run", "--json", "-"])
    document = json.loads(result.stdout)
    assert any("no labels" in w and "agreement went from" in w for w in document["warnings"])


# ---- every format written back -------------------------------------------------------


def stale_tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(4, seed=1))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean += 2.0
    return model, torch.cat(make_batches(2, seed=2))


def recalibrated_buffers(model: nn.Module, data: torch.Tensor) -> dict[str, torch.Tensor]:
    result = bncheck.recalibrate(model, data, batch_size=16, in_place=False)
    return result.state


def tiny_arch() -> str:
    return f"{Path(__file__).resolve().parents[1] / 'conftest.py'}:TinyNet"


def test_nested_state_dict_keeps_nesting_prefix_and_other_entries(tmp_path) -> None:
    model, data = stale_tiny()
    state = {f"model._orig_mod.{k}": v for k, v in model.state_dict().items()}
    source = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 7, "global_step": 120, "optimizer_states": [{"lr": 0.1}],
                "hyper_parameters": {"width": 8}, "state_dict": state}, source)
    ckpt = open_checkpoint(source, tiny_arch())
    assert ckpt.locator == ("state_dict",) and ckpt.prefix == "model._orig_mod."
    expected = recalibrated_buffers(ckpt.module, data)
    bncheck.recalibrate(ckpt.module, data, batch_size=16)
    ckpt.write(tmp_path / "out.ckpt")
    written = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert (written["epoch"], written["global_step"], written["optimizer_states"], written["hyper_parameters"]) \
        == (7, 120, [{"lr": 0.1}], {"width": 8})
    assert written["state_dict"].keys() == state.keys()
    for key, value in expected.items():
        assert torch.equal(written["state_dict"]["model._orig_mod." + key], value), key
    assert torch.equal(written["state_dict"]["model._orig_mod.conv1.weight"], state["model._orig_mod.conv1.weight"])


def test_safetensors_keeps_its_metadata(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, data = stale_tiny()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"), metadata={"format": "pt", "owner": "me"})
    ckpt = open_checkpoint(tmp_path / "w.safetensors", tiny_arch())
    expected = recalibrated_buffers(ckpt.module, data)
    bncheck.recalibrate(ckpt.module, data, batch_size=16)
    ckpt.write(tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as reader:
        assert reader.metadata() == {"format": "pt", "owner": "me"}
        assert torch.equal(reader.get_tensor("bn2.running_var"), expected["bn2.running_var"])


def written_torchscript(ckpt, out: Path, expected: dict, layer: str) -> torch.jit.ScriptModule:
    """Write ``ckpt`` to ``out``, load it back, and check ``layer``'s buffers against ``expected``
    (TorchScript statistics come from buffer updates, unbiased per batch: var to 2e-3)."""
    ckpt.write(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(out))
    module = dict(loaded.named_modules())[layer]
    torch.testing.assert_close(module.running_mean, expected[f"{layer}.running_mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.running_var, expected[f"{layer}.running_var"], rtol=2e-3, atol=1e-5)
    return loaded


def test_torchscript_archive_is_written_back(tmp_path) -> None:
    model, data = stale_tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    expected = recalibrated_buffers(model, data)  # the eager twin, measured with hooks
    ckpt = open_checkpoint(tmp_path / "m.pt", trust_checkpoint=True)
    result = bncheck.recalibrate(ckpt.module, data, batch_size=16)
    assert len(result.layers) == 3
    written_torchscript(ckpt, tmp_path / "out.pt", expected, "bn1")


def test_torchscript_with_momentum_zero_is_recalibrated_and_keeps_its_momentum(tmp_path) -> None:
    """The seed bug scripted for deployment: momentum 0 is a constant in each BN graph, so the
    statistics are measured on an in-memory twin whose graphs update with momentum 1; the
    written archive keeps the model's own momentum 0 and the new statistics."""
    model, data = stale_tiny()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.momentum = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    before = (tmp_path / "m.pt").read_bytes()
    expected = recalibrated_buffers(model, data)
    ckpt = open_checkpoint(tmp_path / "m.pt", trust_checkpoint=True)
    code = ckpt.module.bn2.code
    result = bncheck.recalibrate(ckpt.module, data, batch_size=16)
    assert [layer.name for layer in result.layers] == ["bn1", "bn2", "bn3"] and not result.skipped
    assert ckpt.module.bn2.code == code  # the caller's graph is not the twin's
    torch.testing.assert_close(ckpt.module.bn2.running_mean, expected["bn2.running_mean"], rtol=1e-5, atol=1e-6)
    loaded = written_torchscript(ckpt, tmp_path / "out.pt", expected, "bn1")
    assert (tmp_path / "m.pt").read_bytes() == before
    loaded.train()
    kept = loaded.bn3.running_mean.clone()
    loaded(data[:16])  # still momentum 0: a train-mode forward leaves the statistics where they are
    assert torch.equal(loaded.bn3.running_mean, kept)


def _traced(model: nn.Module, data: torch.Tensor, path: Path, *, train: bool) -> Path:
    model.train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, data[:16])
        model.eval()
        torch.jit.save(traced, str(path))
    return path


def test_a_model_traced_in_eval_mode_is_measured_and_recalibrated(tmp_path) -> None:
    """torch.jit.trace after .eval() -- the usual export -- freezes training=False into each BN
    call: its buffers never move in train mode. Measured on a twin whose calls follow the mode."""
    model, data = stale_tiny()
    eager = bncheck.analyze(model, data, batch_size=16)
    expected = recalibrated_buffers(model, data)
    ckpt = open_checkpoint(_traced(model, data, tmp_path / "t.pt", train=False), trust_checkpoint=True)
    code = ckpt.module.bn1.code
    report = bncheck.analyze(ckpt.module, data, batch_size=16)
    assert not any(f.code == "unmeasurable" for f in report.findings)
    errors = {(f.code, f.layer) for f in report.findings if f.severity == "error"}
    assert errors and errors == {(f.code, f.layer) for f in eager.findings if f.severity == "error"}
    scores = {layer.name: layer.score for layer in eager.layers}
    for layer in report.layers:
        assert layer.score == pytest.approx(scores[layer.name], rel=1e-3)
    bncheck.recalibrate(ckpt.module, data, batch_size=16)
    assert ckpt.module.bn1.code == code  # the caller's graph still says training=False
    written_torchscript(ckpt, tmp_path / "out.pt", expected, "bn2")


def test_a_model_traced_in_train_mode_is_an_error_and_fix_refuses(tmp_path) -> None:
    model, data = stale_tiny()
    path = _traced(model, data, tmp_path / "t.pt", train=True)
    report = bncheck.analyze(open_checkpoint(path, trust_checkpoint=True).module, data, batch_size=16)
    assert report.verdict == "fail"
    assert {(f.code, f.layer) for f in report.findings if f.severity != "info"} == {
        ("traced-in-train-mode", n) for n in ("bn1", "bn2", "bn3")}
    assert "even after .eval()" in report.findings[0].message and "model.eval()" in report.findings[0].hint
    # its eval-mode calls update the buffers too: they are restored, so the scores (running vs
    # batch statistics) are the eager model's with the same buffers
    twin = TinyNet()
    twin.load_state_dict(open_checkpoint(path, trust_checkpoint=True).module.state_dict())
    eager = {layer.name: layer.score for layer in bncheck.analyze(twin, data, batch_size=16).layers}
    for layer in report.layers:
        assert layer.score == pytest.approx(eager[layer.name], rel=1e-2)
    torch.save(data, tmp_path / "x.pt")
    result = run_fix([str(path), "--trust-checkpoint", "--data", str(tmp_path / "x.pt"), "--batch-size", "16",
                      "--out", str(tmp_path / "o.pt"), "--json", "-"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert document["outcome"] == "refused"
    assert any("traced or exported in train mode" in r for r in document["reasons"])
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_program_exported_in_train_mode_is_an_error_and_one_exported_in_eval_mode_is_not(tmp_path) -> None:
    model, data = stale_tiny()
    torch.export.save(torch.export.export(model.train(), (data[:16],)), tmp_path / "train.pt2")
    torch.export.save(torch.export.export(model.eval(), (data[:16],)), tmp_path / "eval.pt2")
    trained = bncheck.analyze(open_checkpoint(tmp_path / "train.pt2").module, data, batch_size=16)
    assert {f.code for f in trained.findings if f.severity != "info"} == {"traced-in-train-mode"}
    assert trained.verdict == "fail"
    evaluated = bncheck.analyze(open_checkpoint(tmp_path / "eval.pt2").module, data, batch_size=16)
    assert not any(f.code == "traced-in-train-mode" for f in evaluated.findings)
    assert any(f.code == "stale-running-stats" for f in evaluated.findings)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_exported_program_is_written_back(tmp_path) -> None:
    model, data = stale_tiny()
    torch.export.save(torch.export.export(model.eval(), (data[:16],)), tmp_path / "m.pt2")
    expected = recalibrated_buffers(model, data)
    ckpt = open_checkpoint(tmp_path / "m.pt2")
    bncheck.recalibrate(ckpt.module, data, batch_size=16)
    ckpt.write(tmp_path / "out.pt2")
    program = torch.export.load(tmp_path / "out.pt2")
    torch.testing.assert_close(program.state_dict["bn3.running_var"], expected["bn3.running_var"], rtol=1e-6,
                               atol=0)
    out = program.module()(data[:16])
    assert out.shape == (16, 5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_exported_program_with_a_bn_called_twice_pools_both_calls(tmp_path) -> None:
    import numpy as np
    from test_recalibration import Shared

    model = Shared().eval()
    data = torch.randn(12, 4, 6, 6)
    torch.export.save(torch.export.export(model, (data[:6],)), tmp_path / "shared.pt2")
    ckpt = open_checkpoint(tmp_path / "shared.pt2")
    result = bncheck.recalibrate(ckpt.module, data, batch_size=6)
    assert len(result.layers) == 1 and any("shares its running buffers" in why for _, why in result.skipped)
    ckpt.write(tmp_path / "out.pt2")
    program = torch.export.load(tmp_path / "out.pt2")
    second = (2 * data[..., :3, :3] + 1).numpy()
    every = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, 4) for a in (data.numpy(), second)]).astype(np.float64)
    np.testing.assert_allclose(program.state_dict["bn.running_var"].numpy(), every.var(0, ddof=1), rtol=1e-6)


def test_trusted_pickled_module_is_written_back(tmp_path) -> None:
    model, data = stale_tiny()
    torch.save({"model": model, "note": "full module"}, tmp_path / "full.pt")
    ckpt = open_checkpoint(tmp_path / "full.pt", trust_checkpoint=True)
    expected = recalibrated_buffers(ckpt.module, data)
    bncheck.recalibrate(ckpt.module, data, batch_size=16)
    ckpt.write(tmp_path / "out.pt")
    written = torch.load(tmp_path / "out.pt", weights_only=False)
    assert written["note"] == "full module"
    assert torch.equal(written["model"].bn2.running_mean, expected["bn2.running_mean"])


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    model, data = stale_tiny()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = open_checkpoint(tmp_path / "m.pt", tiny_arch())

    def dies_halfway(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write(tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_fix_through_a_real_subprocess(tmp_path, cli_env) -> None:
    out = tmp_path / "fixed.pt"
    done = subprocess.run([PYTHON, "-m", "bncheck", "fix", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS,
                           "--num-samples", "64", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "bncheck fix: written" in done.stderr and out.exists()


def test_fix_reads_the_verification_sample_once(tmp_path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(SAMPLES / "data", data)
    (data / "0_circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run_fix([str(SAMPLES / "pseudo_frozen.pt"), *ARCH, "--data", str(data), "--config",
                      str(SAMPLES / "config.yaml"), "--num-batches", "9", "--dry-run", "--json",
                      str(tmp_path / "fix.json")])  # 9 x 32 > 257 files: every file is read
    document = json.loads((tmp_path / "fix.json").read_text())
    # one unreadable file, counted once although the diagnosis ran before and after
    assert document["before"]["data"]["skipped"] == 1 and document["after"]["data"]["skipped"] == 1
    assert result.output.count("warning: skipped unreadable file") == 1


def test_held_out_samples_refuse_statistics_fitted_to_the_rest(tmp_path) -> None:
    """Batches in the order a pipeline yields them: three from a darker place, then the data the
    model meets. Fitted on the dark three, the statistics lower accuracy on the fourth, which
    the in-sample check (fitted on all four) does not show: refused, held-out numbers given."""
    from bncheck.curing.fix import run_fix as fix_api
    from bncheck.reading.checkpoint import Checkpoint
    from bncheck.reporting.report import ModelInfo

    model = sample_model("healthy")
    x, y = sample_tensors()
    dark = [(x[i:i + 32] * 0.3 - 1.0, y[i:i + 32]) for i in range(0, 96, 32)]
    batches = [*dark, (x[96:128], y[96:128])]
    info = ModelInfo(None, None, "random-init", None, 0)
    result = fix_api(Checkpoint(model, info), None, lambda: batches, out=None, dry_run=True, batch_size=32)
    held = result.held_out
    assert held is not None and held.samples == 32 and held.fitted == 96
    assert held.after < held.before  # fitted on the dark batches, the last one suffers
    assert result.outcome == "refused"
    assert any("held-out samples that the statistics did not see" in reason for reason in result.reasons)
