"""Hub-style model folders (timm exports, transformers save_pretrained), built locally: run
without --arch, the folder's preprocessing, fix writing a folder in the same layout, and a
one-line error for every folder that is not one."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import calibrate, tree_hashes

from bncheck.cli import cli
from bncheck.reading.checkpoint import open_checkpoint
from bncheck.reporting.report import validate

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def run_cli(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "x.pt"
    torch.save(torch.randn(16, 3, 32, 32) * 2 + 1, path)
    return path


def timm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    return calibrate(model, [torch.randn(8, 3, 32, 32) for _ in range(4)])


@pytest.fixture
def timm_folder(tmp_path: Path) -> Path:
    from timm.models._hub import save_for_hf

    folder = tmp_path / "timm_resnet10t"
    save_for_hf(timm_model(), str(folder), safe_serialization=True)
    return folder


def hf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=3)
    model = transformers.ResNetForImageClassification(config)
    return calibrate(model, [torch.randn(8, 3, 32, 32) for _ in range(4)])


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf_resnet"
    hf_model().save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
        "size": {"shortest_edge": 40}, "crop_pct": 0.8, "image_processor_type": "ConvNextImageProcessor",
    }))
    return folder


def run_json(args: list[str]) -> dict:
    result = run_cli(["run", *args, "--json", "-", "--batch-size", "4", "--attribute", "0"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_timm_folder_runs_without_arch_and_equals_the_model_it_holds(timm_folder, data, tmp_path) -> None:
    doc = run_json([str(timm_folder), "--data", str(data)])
    assert doc["model"]["format"] == "timm-folder"
    assert doc["model"]["arch"] == "timm:resnet10t"
    assert doc["model"]["momentum_from"] == "library-default"
    # the same weights as a plain safetensors file with --arch give the same scores
    from safetensors.torch import save_file

    save_file(timm_model().state_dict(), str(tmp_path / "w.safetensors"))
    plain = run_json([str(tmp_path / "w.safetensors"), "--arch", "timm:resnet10t", "--arch-kwargs",
                      "{num_classes: 3}", "--data", str(data)])
    assert [la["name"] for la in doc["layers"]] == [la["name"] for la in plain["layers"]]
    # both formats' results are valid run documents (a safetensors run once failed `bncheck report`)
    for result in (doc, plain):
        validate(result)
    for a, b in zip(doc["layers"], plain["layers"]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-6)


def test_timm_folder_with_pytorch_model_bin(timm_folder, data) -> None:
    from safetensors.torch import load_file

    state = load_file(str(timm_folder / "model.safetensors"))
    (timm_folder / "model.safetensors").unlink()
    torch.save(state, timm_folder / "pytorch_model.bin")
    loaded = open_checkpoint(timm_folder)
    assert loaded.info.format == "timm-folder"
    assert torch.equal(loaded.module.state_dict()["bn1.running_mean"], state["bn1.running_mean"])


def test_timm_folder_preprocessing_is_used_unless_a_flag_says_otherwise(tmp_path) -> None:
    from PIL import Image
    from timm.models._hub import save_for_hf

    folder = tmp_path / "m"
    save_for_hf(timm_model(), str(folder), safe_serialization=True,
                data_config={"input_size": (3, 48, 48), "crop_pct": 0.75, "mean": (0.5, 0.5, 0.5),
                             "std": (0.2, 0.2, 0.2)})
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (64, 64), (i * 30, 100, 200)).save(images / f"{i}.png")
    doc = run_json([str(folder), "--data", str(images)])
    text = doc["data"]["preprocessing"]
    assert "resize shorter side to 64 (model folder)" in text
    assert "centre-crop 48 (model folder)" in text
    assert "mean [0.5, 0.5, 0.5] (model folder) std [0.2, 0.2, 0.2] (model folder)" in text
    doc = run_json([str(folder), "--data", str(images), "--crop", "32", "--std", "1,1,1"])
    assert "centre-crop 32 (flag)" in doc["data"]["preprocessing"]
    assert "std [1, 1, 1] (flag)" in doc["data"]["preprocessing"]


def test_transformers_folder_counts_model_output_logits_as_a_classifier(hf_folder, data) -> None:
    doc = run_json([str(hf_folder), "--data", str(data)])
    assert doc["model"]["format"] == "transformers-folder"
    assert doc["model"]["arch"] == "transformers:ResNetForImageClassification"
    assert doc["output"]["kind"] == "classifier"
    assert doc["output"]["top1_agreement"] is not None
    assert len(doc["layers"]) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in hf_model().modules()
    )


def test_transformers_preprocessor_config_gives_resize_and_crop(hf_folder) -> None:
    loaded = open_checkpoint(hf_folder)
    assert loaded.preprocessing == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": 50, "crop": 40}


@pytest.mark.parametrize("shards", [False, True])
def test_fix_writes_a_folder_in_the_same_layout(hf_folder, data, tmp_path, shards) -> None:
    if shards:  # a sharded save: model-0000x-of-0000y.safetensors + index
        shutil.rmtree(hf_folder)
        hf_model().save_pretrained(str(hf_folder), max_shard_size="20KB")
        assert (hf_folder / "model.safetensors.index.json").is_file()
    before = tree_hashes(hf_folder)
    out = tmp_path / "fixed"
    result = run_cli(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert tree_hashes(hf_folder) == before  # the input is untouched
    after = tree_hashes(out)
    assert after.pop(".bncheck-output")  # bncheck's mark: only a marked folder is ever replaced
    assert sorted(after) == sorted(before)  # same files
    assert after["config.json"] == before["config.json"]
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed and all(name.endswith(".safetensors") for name in changed)
    fixed, original = open_checkpoint(out), open_checkpoint(hf_folder)
    fixed_state, original_state = fixed.module.state_dict(), original.module.state_dict()
    bn_keys = set(fixed.bn_buffer_keys())
    moved = [k for k in bn_keys if k.endswith("running_mean") and not torch.equal(fixed_state[k], original_state[k])]
    assert moved
    assert all(torch.equal(fixed_state[k], original_state[k]) for k in fixed_state if k not in bn_keys)
    rerun = run_json([str(out), "--data", str(data)])
    assert max(la["score"] for la in rerun["layers"]) < 0.05
    assert oct((out / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fix_refuses_an_existing_folder_and_the_input(hf_folder, data, tmp_path) -> None:
    (tmp_path / "exists").mkdir()
    for out, text in ((tmp_path / "exists", "already exists"), (hf_folder, "is the input folder"),
                      (hf_folder / "sub", "inside the input folder")):
        result = run_cli(["fix", str(hf_folder), "--data", str(data), "--out", str(out)])
        assert result.exit_code == 3, result.output
        assert text in result.output


def test_bad_folders_get_one_line_errors(tmp_path, data, hf_folder, monkeypatch) -> None:
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "is a directory without config.json"))
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text('{"hidden_size": 3}')
    cases.append((neither, "is neither a timm export"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases.append((broken, "is not readable JSON"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"architecture": "resnet10t", "num_classes": 3}')
    cases.append((no_weights, "no weights (looked for model.safetensors, pytorch_model.bin"))
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_sizes"] = [8, 32]
    (wrong / "config.json").write_text(json.dumps(config))
    cases.append((wrong, "does not fit"))
    for folder, text in cases:
        result = run_cli(["run", str(folder), "--data", str(data)])
        assert result.exit_code == 3, (folder, result.output)
        assert text in result.output, result.output
        assert "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = run_cli(["run", str(hf_folder), "--data", str(data)])
    assert result.exit_code == 3
    assert "install transformers: pip install 'bncheck[hub]'" in result.output
