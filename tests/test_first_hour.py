"""A new user's first hour (issue 11): what the tool says about the data it read, quiet
failures, baselines, and builders that must never download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_ARGS, SAMPLES
from PIL import Image

from bncheck.cli import cli
from bncheck.reporting.report import Finding, LayerResult, load, to_dict

HEALTHY = str(SAMPLES / "healthy.pt")
ARCH = SAMPLE_ARGS[:4]


def invoke(args: list[str], tmp_path: Path):
    return CliRunner().invoke(cli, [*args, "--save", str(tmp_path / "last.json")])


def test_preprocessing_is_printed_with_its_sources_and_upscaling_is_warned(tmp_path) -> None:
    result = invoke(["run", HEALTHY, *ARCH, "--data", str(SAMPLES / "data"), "--num-batches", "1",
                     "--mean", "0.485,0.456,0.406"], tmp_path)
    assert "input  [3, 224, 224] per sample; resize shorter side to 256 (default), centre-crop 224 (default)" \
        in result.stdout
    assert "normalize mean [0.485, 0.456, 0.406] (flag)" in result.stdout
    assert "warning: images as small as 64 px were upscaled to 256 px (4x) by data.resize" in result.stderr
    saved = load(tmp_path / "last.json")
    assert saved.data.input_shape == (3, 224, 224) or list(saved.data.input_shape) == [3, 224, 224]
    assert "resize shorter side to 256 (default)" in saved.data.preprocessing
    # the same run at the images' own size: no warning, and the config's settings say "config"
    result = invoke(["run", HEALTHY, *SAMPLE_ARGS, "--num-batches", "1"], tmp_path)
    assert "no resize (config), no crop (config)" in result.stdout and "upscaled" not in result.stderr
    result = invoke(["run", HEALTHY, *ARCH, "--data", str(SAMPLES / "data"), "--num-batches", "1",
                     "--resize", "none", "--crop", "none"], tmp_path)
    assert "input  [3, 64, 64] per sample; no resize (flag), no crop (flag)" in result.stdout
    assert result.exit_code == 0 and "upscaled" not in result.stderr


def test_one_class_folder_is_no_labels(tmp_path) -> None:
    parent = tmp_path / "parent"
    shutil.copytree(SAMPLES / "data" / "0_circle", parent / "0_circle")
    result = invoke(["run", HEALTHY, *ARCH, "--data", str(parent), "--resize", "none", "--crop", "none",
                     "--batch-size", "16", "--num-batches", "2"], tmp_path)
    assert "one class is no labels" in result.stderr
    saved = load(tmp_path / "last.json")
    assert saved.data.labels is False and saved.output.train_accuracy is None
    assert "accuracy" not in result.stdout.split("output", 1)[1].splitlines()[0]


def test_counts_read_naturally_and_say_when_data_ran_short(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short data path keeps the header on one line
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(20, 3, 64, 64)).astype(np.float32))
    result = invoke(["run", HEALTHY, *ARCH, "--data", "x.npy", "--batch-size", "20"], tmp_path)
    assert "(20 samples = 1 batch of 20; the data held fewer than the 80 asked for)" in result.stdout
    result = invoke(["run", HEALTHY, *ARCH, "--data", "x.npy", "--batch-size", "8", "--num-batches", "3"], tmp_path)
    assert "(20 samples = 3 batches of up to 8; the data held fewer than the 24 asked for)" in result.stdout


def test_quiet_failure_still_says_why_on_one_line(tmp_path) -> None:
    result = invoke(["run", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "--quiet"], tmp_path)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bncheck FAIL (") and "error stale-running-stats conv1.1:" in lines[0]
    passing = invoke(["run", HEALTHY, *SAMPLE_ARGS, "--quiet"], tmp_path)
    assert passing.exit_code == 0 and passing.stdout == "" and passing.stderr == ""


def test_report_json_and_markdown_follow_one_rule(tmp_path) -> None:
    invoke(["run", HEALTHY, *SAMPLE_ARGS, "-q"], tmp_path)
    run = str(tmp_path / "last.json")
    to_stdout = CliRunner().invoke(cli, ["report", run, "--json"])
    assert json.loads(to_stdout.stdout)["schema"] == "bncheck/run/v1"
    both = CliRunner().invoke(cli, ["report", run, "--json", str(tmp_path / "r.json"), "--markdown"])
    assert both.exit_code == 0 and both.stdout.startswith("## ")
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "pass"


def finding(code: str, layer: str, severity: str = "error") -> Finding:
    return Finding(code, severity, layer, "m", "h")


def test_baseline_keeps_two_findings_on_one_layer_and_lists_every_new_one(tmp_path) -> None:
    from test_report import make_report

    from bncheck.reporting.baseline import apply_baseline, check_same_model
    from bncheck.reporting.render import render

    base = make_report()
    layers = tuple(LayerResult(**{**to_dict(base)["layers"][0], "name": f"l{i}", "worst_channels": (),
                                  "findings": ()}) for i in range(12))
    old = type(base)(**{**base.__dict__, "layers": layers, "findings": (finding("non-finite-stats", "l0"),)})
    new_findings = (finding("non-finite-stats", "l0"), finding("non-finite-stats", "l0"),
                    *(finding("stale-running-stats", f"l{i}") for i in range(1, 12)))
    new = type(base)(**{**base.__dict__, "layers": layers, "findings": new_findings})
    compared = apply_baseline(new, old, "old.json")
    assert len(compared.baseline.new) == 12  # the second NaN finding on l0 is new too
    text = render(compared, "table", top=3)
    assert "new      ... and 7 more" in text
    other = type(base)(**{**base.__dict__, "layers": tuple(
        LayerResult(**{**to_dict(base)["layers"][0], "name": f"x{i}", "worst_channels": (), "findings": ()})
        for i in range(2))})
    with pytest.raises(Exception, match="is from another model"):
        check_same_model(other, new, "other.json")


def test_no_builder_touches_the_network(monkeypatch) -> None:
    import torch.hub

    def no_network(*args, **kwargs):
        raise AssertionError("a builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    from bncheck.reading.architectures import build_arch

    for spec in ("torchvision:ssdlite320_mobilenet_v3_large", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                 "torchvision:deeplabv3_mobilenet_v3_large", "torchvision:lraspp_mobilenet_v3_large"):
        assert isinstance(build_arch(spec, {}), torch.nn.Module), spec
    pytest.importorskip("timm")
    assert isinstance(build_arch("timm:resnet18", {}), torch.nn.Module)


def test_a_gray_folder_of_one_size_needs_no_config(tmp_path) -> None:
    folder = tmp_path / "digits"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    result = invoke(["run", HEALTHY, *ARCH, "--data", str(folder), "--resize", "none", "--crop", "none",
                     "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--batch-size", "4"], tmp_path)
    assert "input  [3, 32, 32] per sample" in result.stdout, result.output
    saved = load(tmp_path / "last.json")
    assert "mean [0.5, 0.5, 0.5] (flag) std [0.25, 0.25, 0.25] (flag)" in saved.data.preprocessing
    assert saved.data.labels and saved.data.samples == 8
