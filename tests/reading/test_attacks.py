"""Issue 26's attacks, each rebuilt: outputs that could destroy data, configs that name code,
exported programs with admitted-by-default operators, allocations sized by a file, numbers that
switch a gate off, and the smaller leaks. Every test builds the hostile input in a scratch
folder and checks that nothing outside what the user named changed, that no payload ran
(a marker file), and the exit code and message."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, TinyNet, calibrate, file_hash, make_batches, tree_hashes
from test_security import invoke, stderr_of
from torch import nn

from bncheck.config import THRESHOLD_RANGES
from bncheck.errors import UsageError
from bncheck.files import OUTPUT_MARK, atomic_write

TINY_ARCH = f"{ROOT / 'tests' / 'conftest.py'}:TinyNet"


@pytest.fixture
def data(tiny_data: Path) -> Path:
    return tiny_data


@pytest.fixture
def weights(tiny_weights: Path) -> Path:
    return tiny_weights


def clean_error(result, code: int, *needles: str) -> None:
    text = stderr_of(result)
    assert result.exit_code == code, text
    assert "Traceback" not in text and "bncheck bug" not in text, text
    for needle in needles:
        assert needle in text, text


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=3)
    folder = tmp_path / "hf"
    transformers.ResNetForImageClassification(config).save_pretrained(str(folder))
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _private_null(tmp_path: Path) -> Path:
    """A character device like /dev/null, made in the scratch folder (never the real one)."""
    node = tmp_path / "devnull"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc})")
    return node


# --- 1. writing that cannot destroy ---------------------------------------------------------

def test_fix_force_never_deletes_a_folder_bncheck_did_not_write(tmp_path, hf_folder, data) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree_hashes(mine)
    result = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(mine), "--force"])
    clean_error(result, 3, "bncheck did not write", OUTPUT_MARK)
    assert tree_hashes(mine) == before


def test_fix_force_never_replaces_a_folder_that_holds_the_input(tmp_path, hf_folder, data) -> None:
    sibling = tmp_path / "sibling.txt"
    sibling.write_text("keep")
    before = tree_hashes(tmp_path)
    (tmp_path / OUTPUT_MARK).write_text("")  # even a folder that looks like ours
    result = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(tmp_path),
                     "--force"])
    clean_error(result, 3, "holds the input")
    (tmp_path / OUTPUT_MARK).unlink()
    assert tree_hashes(tmp_path) == before


def test_fix_force_replaces_a_folder_it_wrote_itself(tmp_path, hf_folder, data) -> None:
    out = tmp_path / "fixed"
    first = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(out), "-q"])
    assert first.exit_code in (0, 1), stderr_of(first)
    assert (out / OUTPUT_MARK).is_file()
    again = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(out), "-q"])
    clean_error(again, 3, "already exists")
    forced = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(out), "-q",
                     "--force"])
    assert forced.exit_code in (0, 1), stderr_of(forced)


@pytest.mark.parametrize("shard_name", ["ABSOLUTE", "../outside/shard.safetensors"])
def test_a_shard_index_cannot_name_a_file_outside_its_folder(tmp_path, hf_folder, data, shard_name) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "shard.safetensors"
    (hf_folder / "model.safetensors").rename(victim)  # real weights, so reading it would "work"
    name = str(victim) if shard_name == "ABSOLUTE" else shard_name
    keys = list(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(victim)))
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, name)}))
    before = file_hash(victim)
    for args in (["run", str(hf_folder), "--data", str(data), "--batch-size", "4"],
                 ["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(tmp_path / "o")]):
        result = invoke(args)
        clean_error(result, 3, "outside the model folder")
    assert file_hash(victim) == before and not (tmp_path / "o").exists()


def test_a_linked_config_file_leaves_no_secret_in_the_output(tmp_path, hf_folder, data) -> None:
    secret = tmp_path / "credentials"
    secret.write_text('{"image_mean": [0.5, 0.5, 0.5], "aws_secret": "SECRET"}')
    (hf_folder / "preprocessor_config.json").symlink_to(secret)
    result = invoke(["fix", str(hf_folder), "--data", str(data), "--batch-size", "4", "--out", str(tmp_path / "o")])
    clean_error(result, 3, "links outside the model folder")
    assert not (tmp_path / "o").exists()
    (hf_folder / "preprocessor_config.json").unlink()
    (hf_folder / "config.json").rename(tmp_path / "real-config.json")
    (hf_folder / "config.json").symlink_to(tmp_path / "real-config.json")
    clean_error(invoke(["run", str(hf_folder)]), 3, "links outside the model folder")


def test_an_output_at_a_device_node_is_refused_and_the_device_stays(tmp_path, weights, data) -> None:
    node = _private_null(tmp_path)
    for flag in ("--json", "--html", "--save"):
        result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), flag, str(node)])
        if flag == "--save":  # --save only warns (the run still prints), and writes nothing
            assert "a device" in stderr_of(result), stderr_of(result)
        else:
            clean_error(result, 2, "a device")
        assert stat.S_ISCHR(os.lstat(node).st_mode), flag
    out = invoke(["fix", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--out", str(node), "--force"])
    clean_error(out, 3, "a device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_output_at_a_fifo_is_refused_without_hanging(tmp_path, weights, data) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = subprocess.run([PYTHON, "-m", "bncheck", "run", str(weights), "--arch", TINY_ARCH, "--data", str(data),
                             "--json", str(fifo)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "a FIFO" in result.stderr, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_put_in_place_during_the_write_is_not_replaced(tmp_path) -> None:
    node = _private_null(tmp_path)
    target = tmp_path / "report.json"

    def write(tmp: Path) -> None:
        tmp.write_text("{}")
        os.rename(node, target)  # the path became a device between the check and the rename

    with pytest.raises(UsageError, match="a device"):
        atomic_write(target, write)
    assert stat.S_ISCHR(os.lstat(target).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_an_output_inside_an_input_folder_is_refused(tmp_path, hf_folder, images, weights) -> None:
    picture = images / "0.png"
    before = file_hash(picture)
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(images), "--crop", "32",
                     "--json", str(picture)])
    clean_error(result, 2, "inside the data")
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(images), "--crop", "32",
                     "--html", str(images / "new.html")])
    clean_error(result, 2, "inside the data")
    assert file_hash(picture) == before and not (images / "new.html").exists()
    folder_before = tree_hashes(hf_folder)
    result = invoke(["run", str(hf_folder), "--json", str(hf_folder / "model.safetensors")])
    clean_error(result, 2, "inside the input checkpoint")
    result = invoke(["run", str(hf_folder), "--json", str(hf_folder / "model.safetensors.index.json")])
    clean_error(result, 2, "inside the input checkpoint")
    assert tree_hashes(hf_folder) == folder_before


def test_run_with_data_dot_still_saves_into_its_own_folder(tmp_path, weights, data, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", ".", "--batch-size", "4"])
    assert "never writes into its inputs" not in stderr_of(result)


@pytest.mark.parametrize("key, value", [
    ("outputs:\n  html", "ABSOLUTE"), ("save", "../escaped.json"), ("outputs:\n  json", "~/.bashrc"),
])
def test_a_config_cannot_write_outside_the_working_directory(tmp_path, weights, data, monkeypatch, key,
                                                              value) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    victim = tmp_path / "bashrc"
    victim.write_text("alias ls='ls --color'\n")
    text = str(victim) if value == "ABSOLUTE" else value
    (work / "c.yaml").write_text(f"{key}: {json.dumps(text)}\n")
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--config", "c.yaml"])
    clean_error(result, 2, "outside the working directory")
    assert victim.read_text() == "alias ls='ls --color'\n" and not (tmp_path / "escaped.json").exists()


def test_a_config_output_replaces_an_existing_file_only_with_force(tmp_path, weights, data, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("my notes\n")
    (tmp_path / "c.yaml").write_text("outputs:\n  markdown: notes.md\n")
    args = ["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--config", "c.yaml"]
    clean_error(invoke(args), 2, "--force")
    assert (tmp_path / "notes.md").read_text() == "my notes\n"
    assert invoke([*args, "--force"]).exit_code in (0, 1)
    assert "bncheck" in (tmp_path / "notes.md").read_text()
    again = invoke(args)  # a file bncheck wrote is its own: replaced on the next run, as a saved run is
    assert again.exit_code in (0, 1), stderr_of(again)


# --- 2. configs name no code ----------------------------------------------------------------

def test_a_config_naming_code_runs_none(tmp_path, weights, data) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "c.yaml").write_text(f"arch: os:system\narch_kwargs: {{command: 'touch {marker}'}}\n")
    for command in (["run", str(weights), "--data", str(data)],
                    ["fix", str(weights), "--data", str(data), "--out", str(tmp_path / "o.pt")]):
        result = invoke([*command, "--config", str(tmp_path / "c.yaml")])
        clean_error(result, 2, "names code in 'arch'", "--trust-config")
        assert not marker.exists()


def test_a_python_file_beside_a_config_is_never_imported(tmp_path, weights, data) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "helpers.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef load():\n    return []\n")
    (tmp_path / "c.yaml").write_text(f"data:\n  path: {tmp_path / 'helpers.py'}:load\n")
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--config", str(tmp_path / "c.yaml")])
    clean_error(result, 2, "names code in 'data.path'")
    (tmp_path / "c2.yaml").write_text(f"arch: {tmp_path / 'helpers.py'}:load\n")
    result = invoke(["run", str(weights), "--data", str(data), "--config", str(tmp_path / "c2.yaml")])
    clean_error(result, 2, "names code in 'arch'")
    assert not marker.exists()


def test_code_named_by_a_flag_or_a_trusted_config_is_honoured(tmp_path, weights, data) -> None:
    (tmp_path / "c.yaml").write_text(f"arch: {TINY_ARCH}\nbatch_size: 8\n")
    args = ["run", str(weights), "--data", str(data), "--config", str(tmp_path / "c.yaml")]
    assert invoke([*args, "--trust-config"]).exit_code in (0, 1)
    assert invoke([*args, "--arch", TINY_ARCH]).exit_code in (0, 1)  # the flag is the user's own
    (tmp_path / "lib.yaml").write_text("arch: torchvision:resnet18\n")  # a library's model by name: no code
    result = invoke(["run", "--config", str(tmp_path / "lib.yaml")])
    assert "names code" not in stderr_of(result)


# --- 3. .pt2 programs on an allowlist -------------------------------------------------------

def _exported(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    return path


def _rewrite_program(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            raw = old.read(info)
            if "/models/" in info.filename and info.filename.endswith(".json"):
                raw = edit(raw)
            new.writestr(info, raw)
    return target


def _retarget(target: str):
    def edit(raw: bytes) -> bytes:
        program = json.loads(raw)
        program["graph_module"]["graph"]["nodes"][-1]["target"] = target
        return json.dumps(program).encode()
    return edit


def _operator_argument(raw: bytes) -> bytes:
    program = json.loads(raw)
    node = program["graph_module"]["graph"]["nodes"][-1]
    node["inputs"].append({"name": "op", "arg": {"as_operator": "torch.ops.aten.from_file.default"}})
    return json.dumps(program).encode()


@pytest.mark.parametrize("what, edit", [
    ("print", _retarget("torch.ops.higher_order.print")),
    ("inline asm", _retarget("torch.ops.higher_order.inline_asm_elementwise")),
    ("triton kernel", _retarget("torch.ops.higher_order.triton_kernel_wrapper_functional")),
    ("operator argument", _operator_argument),
    ("deep nesting", lambda raw: (b'{"x": ' * 100_000) + b"1" + (b"}" * 100_000)),
])
def test_a_pt2_with_a_dangerous_operator_is_refused(tmp_path, data, what, edit) -> None:
    evil = _rewrite_program(_exported(tmp_path), tmp_path / "evil.pt2", edit)
    result = invoke(["run", str(evil), "--data", str(data), "--json", "-"])
    clean_error(result, 3, "--trust-checkpoint")
    assert "os.environ" not in result.stdout and "::" not in result.stdout


def test_a_pt2_with_control_flow_still_loads_untrusted(tmp_path) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.bn(x), lambda x: self.bn(x) * 2, (x,))

    path = tmp_path / "cond.pt2"
    torch.export.save(torch.export.export(Branchy().eval(), (torch.randn(2, 3, 4, 4),)), path)
    torch.save(torch.randn(8, 3, 4, 4), tmp_path / "x.pt")
    result = invoke(["run", str(path), "--data", str(tmp_path / "x.pt"), "--batch-size", "4"])
    assert "would run code" not in stderr_of(result), stderr_of(result)


# --- 4. memory bounded before allocation ----------------------------------------------------

def test_a_crop_larger_than_the_images_is_refused_before_padding(tmp_path, weights, images) -> None:
    started = time.perf_counter()
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(images), "--crop", "12000"])
    clean_error(result, 3, "Mpx")
    assert time.perf_counter() - started < 30


def test_a_timm_folder_input_size_cannot_pad_images_to_gigabytes(tmp_path, images) -> None:
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    folder = tmp_path / "timm"
    save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=3), str(folder))
    config = json.loads((folder / "config.json").read_text())
    for key in ("input_size", "test_input_size"):
        config["pretrained_cfg"][key] = [3, 8000, 8000]
    config["pretrained_cfg"].update(crop_pct=1.0, test_crop_pct=1.0)
    (folder / "config.json").write_text(json.dumps(config))
    clean_error(invoke(["run", str(folder), "--data", str(images)]), 3, "Mpx")


def test_a_transformers_config_is_sized_before_it_allocates(tmp_path, hf_folder) -> None:
    config = json.loads((hf_folder / "config.json").read_text())
    config["hidden_sizes"] = [8, 200_000]
    (hf_folder / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    result = invoke(["run", str(hf_folder)])
    clean_error(result, 3, "describes a model of")
    assert time.perf_counter() - started < 60


def test_arch_kwargs_from_a_config_are_sized_and_the_limit_can_be_raised(tmp_path, monkeypatch) -> None:
    (tmp_path / "c.yaml").write_text("arch: torchvision:resnet18\narch_kwargs: {num_classes: 1000000000}\n")
    clean_error(invoke(["run", "--config", str(tmp_path / "c.yaml")]), 3, "BNCHECK_MAX_MODEL_GB")
    monkeypatch.setenv("BNCHECK_MAX_MODEL_GB", "0.001")  # the knob: a normal model above a tiny limit
    clean_error(invoke(["run", "--arch", "torchvision:resnet18"]), 3, "above the 0.0 GiB limit")


def test_fix_bounds_a_deflated_npz_as_run_does(tmp_path, weights) -> None:
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, inputs=np.zeros((200_000, 3, 12, 12), dtype=np.float32))  # 346 MB of zeros
    assert bomb.stat().st_size < 2_000_000
    started = time.perf_counter()
    result = invoke(["fix", str(weights), "--arch", TINY_ARCH, "--data", str(bomb), "--out", str(tmp_path / "o.pt")])
    clean_error(result, 3, "decompression bomb")
    assert time.perf_counter() - started < 60 and not (tmp_path / "o.pt").exists()


# --- 5. the gate cannot be switched off by a number ----------------------------------------

def test_negative_running_variance_fails_run_and_lint(tmp_path, data) -> None:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(8))
    model.bn2.running_var[0] = -1.0
    assert not torch.isfinite(model.eval()(make_batches(1)[0])).all()  # the truth: eval outputs NaN
    torch.save(model.state_dict(), tmp_path / "neg.pt")
    ran = invoke(["run", str(tmp_path / "neg.pt"), "--arch", TINY_ARCH, "--data", str(data), "--json", "-"])
    assert ran.exit_code == 1, stderr_of(ran)
    found = {(f["code"], f["severity"]) for f in json.loads(ran.stdout)["findings"]}
    assert ("non-finite-stats", "error") in found and ("output-divergence", "error") in found
    assert json.loads(ran.stdout)["output"]["eval_nonfinite"] == 32
    linted = invoke(["run", str(tmp_path / "neg.pt"), "--arch", TINY_ARCH])
    assert linted.exit_code == 1 and "non-finite-stats" in linted.output


@pytest.mark.parametrize("name", sorted(THRESHOLD_RANGES))
def test_every_threshold_has_a_checked_range(tmp_path, weights, data, name) -> None:
    low, high, low_included = THRESHOLD_RANGES[name]
    for value in (high * 1e10, 1e300, -1.0) + (() if low_included else (low,)):
        (tmp_path / "c.yaml").write_text(f"thresholds:\n  {name}: {value}\n")
        result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--config",
                         str(tmp_path / "c.yaml")])
        clean_error(result, 2, f"thresholds.{name}")


def test_the_readme_lists_every_threshold_range() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in THRESHOLD_RANGES:
        assert f"`{name}`" in readme, name


# --- 6. the smaller ones --------------------------------------------------------------------

def test_a_full_disk_during_fix_is_a_clear_error(tmp_path, weights, data) -> None:
    small = tmp_path / "small"
    small.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        torch.manual_seed(0)
        torch.save(TinyNet(64).state_dict(), tmp_path / "big.pt")
        for name in ("big.pt",):
            result = invoke(["fix", str(tmp_path / name), "--arch", TINY_ARCH, "--arch-kwargs", "{channels: 64}",
                             "--data", str(data), "--batch-size", "8", "--out", str(small / name), "-q"])
            clean_error(result, 2, "disk full")
            assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True, timeout=30)


def test_a_safetensors_write_error_on_a_full_disk_is_not_a_bug(tmp_path, weights, data, monkeypatch) -> None:
    from safetensors.torch import save_file

    save_file(torch.load(weights), str(tmp_path / "tiny.safetensors"))

    def full(*_args, **_kwargs):
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    result = invoke(["fix", str(tmp_path / "tiny.safetensors"), "--arch", TINY_ARCH, "--data", str(data),
                     "--batch-size", "8", "--out", str(tmp_path / "o.safetensors"), "-q"])
    clean_error(result, 2, "disk full")


LINKY = ["bn_![pic](https:__e_x)", "bn_[click](javascript:alert(1))", "bn_**bold**", "bn_http:__evil",
         "bn_www_evil"]


def test_names_never_become_markdown_links_images_or_html_bidi(tmp_path, data) -> None:
    source = tmp_path / "linky.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n\nclass Linky(nn.Module):\n"
        f"    NAMES = {LINKY!r}\n\n"
        "    def __init__(self):\n        super().__init__()\n        self.stem = nn.Conv2d(3, 4, 3, padding=1)\n"
        "        for name in self.NAMES:\n            self.add_module(name, nn.BatchNorm2d(4))\n"
        "        self.add_module('bn_\\u202eevil', nn.BatchNorm2d(4))\n\n"
        "    def forward(self, x):\n        x = self.stem(x)\n        for layer in list(self.children())[1:]:\n"
        "            x = torch.relu(layer(x))\n        return x.mean((2, 3))\n")
    torch.manual_seed(0)
    from conftest import module_from_file

    model = module_from_file(source).Linky()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.fill_(3.0)  # every layer stale: names in findings and in the folded group
    torch.save(model.state_dict(), tmp_path / "linky.pt")
    result = invoke(["run", str(tmp_path / "linky.pt"), "--arch", f"{source}:Linky", "--data", str(data),
                     "--attribute", "0", "--markdown", str(tmp_path / "r.md"), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1, stderr_of(result)
    markdown = (tmp_path / "r.md").read_text()
    prose = [line for line in markdown.splitlines() if line.startswith("- **")]
    assert prose and any("click" in line for line in prose)
    for line in prose:
        outside_code = "".join(line.split("`")[::2])
        assert "](" not in outside_code.replace("\\](", "").replace("\\]\\(", ""), line
        assert "![" not in outside_code.replace("\\!\\[", ""), line
    page = (tmp_path / "r.html").read_text()
    assert "\u202e" not in page and "\\u202e" in page


def test_a_saved_run_of_ten_thousand_layers_is_read_back(tmp_path, weights, data) -> None:
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--json",
                     str(tmp_path / "r.json"), "--fail-on", "never"])
    assert result.exit_code == 0, stderr_of(result)
    run = json.loads((tmp_path / "r.json").read_text())
    template = run["layers"][-1]
    run["layers"] = run["layers"] + [{**template, "name": f"extra.{i}", "rank": len(run["layers"]) + i + 1,
                                      "findings": []} for i in range(12_000)]
    big = tmp_path / "big.json"
    big.write_text(json.dumps(run, indent=2))
    assert big.stat().st_size > 16 * 1024 * 1024
    shown = invoke(["report", str(big), "--top", "3"])
    assert shown.exit_code == 0, stderr_of(shown)


def test_fix_on_an_endless_pipeline_ends_and_says_so(tmp_path, weights, monkeypatch) -> None:
    monkeypatch.setattr("bncheck.reading.data.pipeline.UNSIZED_SAMPLES", 64)
    (tmp_path / "endless.py").write_text(
        "import itertools\nimport torch\n\n\ndef stream(batch_size=8):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    for _ in itertools.count():\n        yield torch.randn(batch_size, 3, 12, 12, generator=g)\n")
    result = invoke(["fix", str(weights), "--arch", TINY_ARCH, "--data", f"{tmp_path / 'endless.py'}:stream",
                     "--batch-size", "8", "--out", str(tmp_path / "o.pt")])
    assert result.exit_code in (0, 1), stderr_of(result)
    assert "has no length: read its first 64 samples" in stderr_of(result)
