"""bncheck diff A B: BN statistics against the weights around them, with no data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES, TinyNet, calibrate, make_batches

from bncheck.cli import cli

ARCH = ["--arch", f"{Path(__file__).resolve().parent / 'conftest.py'}:TinyNet"]


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    base = calibrate(TinyNet(), make_batches(4, seed=1))
    # the seed bug: weights fine-tuned, running statistics never moved (momentum 0)
    stuck = copy.deepcopy(base)
    with torch.no_grad():
        for conv in (stuck.conv1, stuck.conv2, stuck.conv3):
            conv.weight.mul_(1.2)
    # a frozen backbone left in train mode: statistics followed new data, weights did not
    drifted = copy.deepcopy(base)
    with torch.no_grad():
        drifted.bn2.running_mean += 0.5 * drifted.bn2.running_var.sqrt()
    paths = {}
    for name, model in (("base", base), ("stuck", stuck), ("drifted", drifted)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    return paths


def test_identical_statistics_around_changed_weights_are_blamed(checkpoints, tmp_path) -> None:
    result = CliRunner().invoke(cli, ["diff", str(checkpoints["base"]), str(checkpoints["stuck"]), *ARCH,
                                      "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 1, result.output
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["schema"] == "bncheck/diff/v1" and doc["verdict"] == "fail"
    jsonschema = pytest.importorskip("jsonschema")
    from bncheck.reporting.report import schema_path

    jsonschema.validate(doc, json.loads(schema_path("diff").read_text()))
    assert {(f["code"], f["layer"]) for f in doc["findings"]} == {
        ("stats-not-updated", "bn1"), ("stats-not-updated", "bn2"), ("stats-not-updated", "bn3")}
    bn1 = next(layer for layer in doc["layers"] if layer["name"] == "bn1")
    assert bn1["stats_identical"] and bn1["feeding"] == "conv1" and bn1["feeding_change"] == pytest.approx(0.2)
    assert "running stats identical in 3" in result.output


def test_layers_and_findings_rank_by_how_far_the_weights_moved(checkpoints, tmp_path) -> None:
    model = TinyNet()
    model.load_state_dict(torch.load(checkpoints["stuck"], weights_only=True))
    with torch.no_grad():
        model.conv3.weight.mul_(1.5)  # bn3's weights moved most (1.2 x 1.5), then bn1 and bn2 (1.2)
    torch.save(model.state_dict(), tmp_path / "stuck3.pt")
    result = CliRunner().invoke(cli, ["diff", str(checkpoints["base"]), str(tmp_path / "stuck3.pt"), *ARCH, "--json"])
    doc = json.loads(result.stdout)
    assert doc["layers"][0]["name"] == "bn3" and doc["layers"][0]["feeding_change"] == pytest.approx(0.8)
    assert [f["layer"] for f in doc["findings"]][0] == "bn3"


def test_statistics_that_moved_under_frozen_weights_are_blamed(checkpoints) -> None:
    result = CliRunner().invoke(cli, ["diff", str(checkpoints["base"]), str(checkpoints["drifted"]), *ARCH,
                                      "--json"])
    assert result.exit_code == 0  # a warning: below the default --fail-on error
    doc = json.loads(result.stdout)
    assert [(f["code"], f["layer"], f["severity"]) for f in doc["findings"]] == [
        ("stats-moved-frozen-weights", "bn2", "warning")]
    assert doc["layers"][0]["name"] == "bn2" and doc["layers"][0]["mean_shift"] == pytest.approx(0.5, rel=1e-3)


def test_a_checkpoint_against_itself_and_against_another_architecture(checkpoints, tmp_path) -> None:
    same = CliRunner().invoke(cli, ["diff", str(checkpoints["base"]), str(checkpoints["base"]), *ARCH, "--markdown"])
    assert same.exit_code == 0 and "## ✅ bncheck diff: pass" in same.stdout
    shufflenet = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", "{num_classes: 4}"]
    other = CliRunner().invoke(cli, ["diff", str(checkpoints["base"]), str(SAMPLES / "healthy.pt"), *shufflenet])
    assert other.exit_code == 3 and "does not fit" in other.output
