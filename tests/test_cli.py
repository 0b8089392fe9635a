"""The command line, through click's CliRunner and through real subprocesses."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import PYTHON, ROOT, SAMPLE_ARGS, SAMPLES, tree_hashes

from bncheck.cli import cli
from bncheck.reporting.report import schema_path

SCHEMA = json.loads(schema_path().read_text())


def run_cli(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "bncheck", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_clean_error(result, code: int, *needles: str) -> None:
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    assert result.returncode == code if hasattr(result, "returncode") else result.exit_code == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def resnet_case(tmp_path_factory) -> tuple[Path, Path]:
    """The README example: a torchvision resnet18 state_dict with 10 classes, and a .npy batch."""
    root = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               root / "model.pt")
    np.save(root / "x.npy", np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32))
    return root / "model.pt", root / "x.npy"


def test_help_and_version_are_torch_free(cli_env) -> None:
    code = (
        "import sys, time; t = time.perf_counter();"
        "from bncheck.cli import cli;"
        "cli(['--help'], standalone_mode=False);"
        "assert 'torch' not in sys.modules, 'torch imported for --help';"
        "print(f'{time.perf_counter() - t:.3f}')"
    )
    out = subprocess.run([PYTHON, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "run" in out.stdout and "report" in out.stdout
    version = run_cli(["--version"], ROOT, cli_env)
    assert version.returncode == 0 and "bncheck" in version.stdout


def test_healthy_sample_passes_and_pseudo_frozen_fails(tmp_path, cli_env) -> None:
    before = tree_hashes(SAMPLES)
    bad = run_cli(["run", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS], tmp_path, cli_env)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL" in bad.stdout and "stale-running-stats" in bad.stdout and "conv1.1" in bad.stdout
    good = run_cli(["run", str(SAMPLES / "healthy.pt"), *SAMPLE_ARGS], tmp_path, cli_env)
    assert good.returncode == 0, good.stderr
    assert "PASS" in good.stdout
    saved = json.loads((tmp_path / ".bncheck" / "last-run.json").read_text())
    jsonschema.validate(saved, SCHEMA)
    assert saved["verdict"] == "pass" and saved["model"]["checkpoint"].endswith("healthy.pt")
    assert tree_hashes(SAMPLES) == before  # checkpoints and data untouched


SEGMENTATION = SAMPLES / "segmentation"
SEGMENTATION_ARGS = ["--arch", f"{SEGMENTATION / 'deeplab.py'}:build", "--data", str(SEGMENTATION / "data"),
                     "--config", str(SEGMENTATION / "config.yaml")]


def test_the_forums_deeplab_case_fails_in_miou_with_pictures_and_its_twin_passes(tmp_path, cli_env) -> None:
    """The shipped segmentation sample (the README's first example): the forum's freeze gives
    an mIoU collapse in eval mode, pictured; the twin fine-tuned the normal way passes."""
    before = tree_hashes(SAMPLES)
    bad = run_cli(["run", str(SEGMENTATION / "pseudo_frozen.pt"), *SEGMENTATION_ARGS, "--json", "out.json",
                   "--html", "out.html"], tmp_path, cli_env)
    assert bad.returncode == 1, bad.stderr
    assert "mIoU train-mode" in bad.stdout and "masks are labels" in bad.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    out = doc["output"]
    assert out["per"] == "pixel" and out["labeled"] == 64 and out["train_miou"] - out["eval_miou"] > 0.4
    assert any(f["code"] == "accuracy-gap" for f in doc["findings"])
    assert doc["layers"][0]["name"] == "backbone.features.0.1"  # the stem's BN, still on domain A
    assert len(doc["pictures"]) == 4 and all(p["truth"] for p in doc["pictures"])
    assert (tmp_path / "out.html").read_text().count("data:image/png") == 16
    good = run_cli(["run", str(SEGMENTATION / "healthy.pt"), *SEGMENTATION_ARGS], tmp_path, cli_env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS" in good.stdout and "mIoU train-mode" in good.stdout
    assert tree_hashes(SAMPLES) == before


def test_json_to_stdout_is_only_json_and_valid(tmp_path, cli_env, resnet_case) -> None:
    ckpt, data = resnet_case
    before = tree_hashes(ckpt.parent)
    result = run_cli(
        ["run", str(ckpt), "--arch", "torchvision:resnet18", "--arch-kwargs", "{num_classes: 10}",
         "--data", str(data), "--batch-size", "8", "--json"],  # a bare --json means stdout
        tmp_path, cli_env,
    )
    doc = json.loads(result.stdout)  # nothing but JSON on stdout
    # a freshly built resnet never updated its running stats: never-updated errors, exit 1
    assert result.returncode == 1 and doc["verdict"] == "fail", result.stderr
    assert {f["code"] for f in doc["findings"] if f["severity"] == "error"} >= {"never-updated"}
    jsonschema.validate(doc, SCHEMA)
    assert doc["model"]["bn_layers"] == 20 and doc["model"]["format"] == "state_dict"
    assert len(doc["model"]["sha256"]) == 64
    # momentum is not in a state_dict: torchvision's default, said so and not reasoned from
    assert doc["model"]["momentum_from"] == "library-default"
    assert doc["data"] == {"source": str(data), "samples": 16, "batch_size": 8, "batches": 2,
                           "labels": False, "skipped": 0, "requested": 32, "input_shape": [3, 64, 64],
                           "preprocessing": "tensor file fed to the model as stored (no transforms)"}
    assert [layer["rank"] for layer in doc["layers"]] == list(range(1, 21))
    scores = [layer["score"] for layer in doc["layers"] if layer["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    assert "bncheck" in result.stderr  # the table went to stderr
    assert tree_hashes(ckpt.parent) == before
    # the run was saved, and `report --json` reproduces it
    report = run_cli(["report", "--json"], tmp_path, cli_env)
    assert report.returncode == 0 and json.loads(report.stdout) == doc


def test_cli_runner_report_renders_saved_run(tmp_path, tiny, batches) -> None:
    from bncheck.engine import analyze
    from bncheck.reporting.report import dumps

    with torch.no_grad():
        tiny.bn2.running_mean += 5.0
    path = tmp_path / "run.json"
    path.write_text(dumps(analyze(tiny, batches)))
    runner = CliRunner()
    table = runner.invoke(cli, ["report", str(path), "--top", "2"])
    assert table.exit_code == 0, table.output
    assert "FAIL" in table.output and "bn2" in table.output and "1 more layers" in table.output
    md = runner.invoke(cli, ["report", str(path), "--markdown"])
    assert md.exit_code == 0 and md.output.startswith("## ❌ bncheck: fail")
    js = runner.invoke(cli, ["report", str(path), "--json"])
    assert json.loads(js.output)["layers"][0]["name"] == "bn2"


def test_report_without_torch_is_fast(tmp_path, tiny, batches, cli_env) -> None:
    from bncheck.engine import analyze
    from bncheck.reporting.report import dumps

    (tmp_path / ".bncheck").mkdir()
    (tmp_path / ".bncheck" / "last-run.json").write_text(dumps(analyze(tiny, batches)))
    code = (
        "import sys; from bncheck.cli import cli;"
        "cli(['report'], standalone_mode=False);"
        "assert 'torch' not in sys.modules"
    )
    out = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PASS" in out.stdout  # speed is measured by benchmarks/, not asserted here


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["run", "missing.pt", "--arch", "torchvision:resnet18", "--data", "d"], 3, "does not exist"),
        (["run", "--no-such-flag"], 2, "No such option"),
        (["run", "--top", "0", "x.pt"], 2, "--top"),
        (["run", "x.pt", "--device", "tpu"], 2, "--device"),
        (["report", "nothing.json"], 3, "no saved run"),
    ],
)
def test_bad_input_exit_codes(tmp_path, args, code, needle) -> None:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_missing_checkpoint_via_subprocess_is_one_line(tmp_path, cli_env) -> None:
    result = run_cli(["run", "nope.pt", "--arch", "torchvision:resnet18", "--data", "."], tmp_path, cli_env)
    assert_clean_error(result, 3, "nope.pt", "does not exist")


def test_state_dict_without_arch_is_a_usage_error(tmp_path, cli_env) -> None:
    result = run_cli(["run", str(SAMPLES / "healthy.pt"), "--data", str(SAMPLES / "data")], tmp_path, cli_env)
    assert_clean_error(result, 2, "--arch")


def test_wrong_num_classes_suggests_arch_kwargs(tmp_path, cli_env) -> None:
    args = ["run", str(SAMPLES / "healthy.pt"), "--arch", "torchvision:shufflenet_v2_x0_5",
            "--data", str(SAMPLES / "data")]
    result = run_cli(args, tmp_path, cli_env)
    assert_clean_error(result, 3, "num_classes: 4")


def test_full_pickle_needs_trust_and_never_executes(tmp_path, cli_env) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = tmp_path / "evil.pt"
    with ckpt.open("wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    result = run_cli(["run", str(ckpt), "--data", str(SAMPLES / "data")], tmp_path, cli_env)
    assert_clean_error(result, 3, "--trust-checkpoint")
    assert not marker.exists()


def test_trusted_full_pickle_and_torchscript_load(tmp_path, cli_env) -> None:
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    model.load_state_dict(torch.load(SAMPLES / "pseudo_frozen.pt", weights_only=True))
    model.eval()
    torch.save(model, tmp_path / "full.pt")
    args = ["--data", str(SAMPLES / "data"), "--config", str(SAMPLES / "config.yaml"), "--json", "-", "-q"]
    result = run_cli(["run", str(tmp_path / "full.pt"), "--trust-checkpoint", *args], tmp_path, cli_env)
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["format"] == "pickled-module" and doc["layers"][0]["name"] == "conv1.1"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    result = run_cli(["run", str(tmp_path / "scripted.pt"), "--trust-checkpoint", *args], tmp_path, cli_env)
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["format"] == "torchscript" and doc["layers"][0]["name"] == "conv1.1"


def test_unknown_config_key_and_bad_yaml(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("thresholds:\n  stale_eror: 1\n")
    result = CliRunner().invoke(cli, ["run", "x.pt", "--data", ".", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "thresholds.stale_eror" in result.output
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    result = CliRunner().invoke(cli, ["report", "--config", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_unknown_arch_suggests_close_names(tmp_path, cli_env) -> None:
    result = CliRunner().invoke(cli, ["run", "--arch", "torchvision:resnet19", "--data", str(SAMPLES / "data")])
    assert result.exit_code == 3 and "torchvision:resnet18" in result.output
