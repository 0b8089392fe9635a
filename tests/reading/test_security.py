"""Hostile inputs: a file from a stranger runs nothing, writes nothing outside --out, cannot open
the gate, cannot forge output and cannot exhaust the machine. Each test builds the hostile
input; a marker file that must not exist proves that nothing ran."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import PYTHON, ROOT, TinyNet, calibrate, file_hash, make_batches, module_from_file
from torch import nn

from bncheck.cli import cli
from bncheck.errors import InputError, UsageError

TINY_ARCH = f"{ROOT / 'tests' / 'conftest.py'}:TinyNet"


def invoke(args: list[str], **kwargs):
    return CliRunner().invoke(cli, args, **kwargs)


def stderr_of(result) -> str:
    return result.stderr if result.stderr_bytes is not None else result.output


@pytest.fixture
def data(tiny_data: Path) -> Path:
    return tiny_data


@pytest.fixture
def weights(tiny_weights: Path) -> Path:
    return tiny_weights


class Marker:
    """Unpickling this creates ``path``: proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- formats that are programs ------------------------------------------------------------

def _exported(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    return path


def _rewrite(source: Path, target: Path, edit) -> Path:
    """Copy a zip archive member by member; ``edit(name, data)`` returns new bytes (or None: same)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            changed = edit(info.filename, data)
            new.writestr(info, data if changed is None else changed)
    return target


def _pickled_weight_pt2(tmp_path: Path, marker: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(Marker(marker), buffer)

    def edit(name: str, data: bytes):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return buffer.getvalue()
        return None

    return _rewrite(_exported(tmp_path), tmp_path / "evil.pt2", edit)


def test_a_pt2_with_a_pickled_weight_is_refused_before_it_loads(tmp_path, data) -> None:
    marker = tmp_path / "ran"
    evil = _pickled_weight_pt2(tmp_path, marker)
    for args in (["run", str(evil), "--data", str(data)], ["run", str(evil)],
                 ["fix", str(evil), "--data", str(data), "--out", str(tmp_path / "o.pt2")],
                 ["diff", str(evil), str(evil)]):
        result = invoke(args)
        assert result.exit_code == 3, stderr_of(result)
        assert "is a pickle" in stderr_of(result) and "--trust-checkpoint" in stderr_of(result)
        assert not marker.exists(), args
    # the payload is real: torch.export.load itself runs it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.export.load(evil)
        except Exception:
            pass
    assert marker.exists()


@pytest.mark.parametrize("what, edit", [
    ("guards code", lambda program: program.__setitem__(
        "guards_code", ["__import__('pathlib').Path('MARK').touch() or True"])),
    ("call target", lambda program: program["graph_module"]["graph"]["nodes"][-1].__setitem__(
        "target", "torch.os.system")),
    ("shape expression", lambda program: program.__setitem__(
        "range_constraints", {"__import__('os').system('touch MARK')": {"min_val": 0, "max_val": 1}})),
    ("file operator", lambda program: program["graph_module"]["graph"]["nodes"][-1].__setitem__(
        "target", "torch.ops.aten.from_file.default")),
])
def test_a_pt2_whose_graph_is_code_is_refused(tmp_path, data, what, edit) -> None:
    def rewrite(name: str, raw: bytes):
        if "/models/" in name and name.endswith(".json"):
            program = json.loads(raw)
            edit(program)
            return json.dumps(program).replace("MARK", str(tmp_path / "ran")).encode()
        return None

    evil = _rewrite(_exported(tmp_path), tmp_path / "evil.pt2", rewrite)
    result = invoke(["run", str(evil), "--data", str(data)])
    assert result.exit_code == 3, stderr_of(result)
    assert "would run code" in stderr_of(result)
    assert not (tmp_path / "ran").exists()


def test_a_clean_pt2_with_dynamic_shapes_still_loads_untrusted(tmp_path, data) -> None:
    model = calibrate(TinyNet(), make_batches(8))
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (torch.randn(16, 3, 12, 12),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "dyn.pt2")
    result = invoke(["run", str(tmp_path / "dyn.pt2"), "--data", str(data), "--batch-size", "16", "--json", "-",
                     "--attribute", "0"])
    assert result.exit_code in (0, 1), stderr_of(result)
    assert json.loads(result.stdout)["model"]["format"] == "exported-program"


class FileWriter(nn.Module):
    """A TorchScript forward that creates (or overwrites) any file it names."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = torch.from_file(self.path, shared=True, size=4)
        return self.bn(self.conv(x)) + touched.sum() * 0


def test_torchscript_needs_trust_even_for_lint_and_diff(tmp_path, data) -> None:
    marker = tmp_path / "created-by-forward"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(FileWriter(str(marker))), tmp_path / "evil.pt")
    for args in (["run", str(tmp_path / "evil.pt")], ["run", str(tmp_path / "evil.pt"), "--data", str(data)],
                 ["diff", str(tmp_path / "evil.pt"), str(tmp_path / "evil.pt")]):
        result = invoke(args)
        assert result.exit_code == 3, stderr_of(result)
        assert "TorchScript archive" in stderr_of(result) and "--trust-checkpoint" in stderr_of(result)
        assert not marker.exists()


def test_diff_of_two_trusted_scripted_copies_works(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, tmp_path / "a.pt")
        torch.jit.save(scripted, tmp_path / "b.pt")
    result = invoke(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--trust-checkpoint", "--json", "-"])
    assert result.exit_code == 0, stderr_of(result)
    assert json.loads(result.stdout)["layers"][0]["feeding"] == "0"


# --- Hub folders ----------------------------------------------------------------------------

def _hf_folder(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=3)
    folder = tmp_path / "hf"
    transformers.ResNetForImageClassification(config).save_pretrained(str(folder))
    return folder


def test_a_hub_folder_with_auto_map_runs_none_of_its_python(tmp_path) -> None:
    folder = _hf_folder(tmp_path)
    marker = tmp_path / "remote-code-ran"
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import ResNetConfig as EvilConfig\n"
    (folder / "evil.py").write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    config.pop("architectures")
    config["model_type"] = "evil-net"  # not a model transformers knows: only the folder's code could build it
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "x.pt")
    result = subprocess.run([PYTHON, "-m", "bncheck", "run", str(folder), "--data", str(tmp_path / "x.pt"),
                             "--batch-size", "4", "--json", "-"], input="y\ny\n", capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not marker.exists(), result.stderr
    if result.returncode in (0, 1):  # built without the folder's code: stdout is only JSON
        json.loads(result.stdout)
    else:
        assert result.returncode == 3 and result.stdout == "", result.stderr


def test_a_timm_config_cannot_allocate_a_huge_head(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    folder = tmp_path / "timm"
    save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=3), str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = 5_000_000
    config.setdefault("model_args", {})["num_classes"] = 5_000_000
    (folder / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    result = invoke(["run", str(folder)])
    assert result.exit_code == 3, stderr_of(result)
    assert "num_classes 5000000" in stderr_of(result)
    assert time.perf_counter() - started < 30


def test_fix_of_a_model_folder_copies_no_link_target(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    folder = tmp_path / "timm"
    torch.manual_seed(0)
    save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=3), str(folder))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("KEY")
    (folder / "notes").symlink_to(secrets)
    (folder / "zero").symlink_to("/dev/zero")
    (folder / "key.txt").symlink_to(secrets / "id_rsa")
    (folder / "README.md").write_text("mine")
    torch.save(torch.randn(8, 3, 32, 32), tmp_path / "x.pt")
    out = tmp_path / "fixed"
    out.mkdir()  # an earlier result of bncheck's (marked), replaced with --force
    (out / ".bncheck-output").write_text("")
    result = invoke(["fix", str(folder), "--data", str(tmp_path / "x.pt"), "--batch-size", "4", "--out", str(out),
                     "--force"])
    assert result.exit_code in (0, 1), stderr_of(result)
    assert out.is_dir()
    names = sorted(p.name for p in out.iterdir())
    assert "notes" not in names and "zero" not in names and "key.txt" not in names
    assert "README.md" in names and "config.json" in names
    assert not any(p.read_bytes() == b"KEY" for p in out.rglob("*") if p.is_file())


# --- gates a file could open ----------------------------------------------------------------

@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_thresholds_are_input_errors(tmp_path, weights, data, value) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"thresholds:\n  drift_to_noise: {value}\n")
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--config", str(config)])
    assert result.exit_code == 2, stderr_of(result)
    assert "finite" in stderr_of(result)
    import bncheck

    with pytest.raises(UsageError, match="finite"):
        bncheck.analyze(TinyNet(), make_batches(1)[0], thresholds={"stale_error": float("nan")})


@pytest.fixture
def failing_run(tmp_path: Path, data: Path) -> Path:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(8))
    with torch.no_grad():
        model.bn1.running_mean += 3.0
    torch.save(model.state_dict(), tmp_path / "stale.pt")
    result = invoke(["run", str(tmp_path / "stale.pt"), "--arch", TINY_ARCH, "--data", str(data),
                     "--batch-size", "16", "--json", str(tmp_path / "run.json"), "--attribute", "0"])
    assert result.exit_code == 1, stderr_of(result)
    return tmp_path / "run.json"


@pytest.mark.parametrize("forgery", [
    {"verdict": "pass"},
    {"verdict": "no-batchnorm"},
])
def test_a_saved_run_whose_verdict_contradicts_its_findings_is_refused(tmp_path, failing_run, forgery) -> None:
    document = json.loads(failing_run.read_text())
    document.update(forgery)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(document))
    for args in (["report", str(forged)], ["report", "--compare", str(failing_run), str(forged)]):
        result = invoke(args)
        assert result.exit_code == 3, stderr_of(result)
        assert "contradict" in stderr_of(result) or "give" in stderr_of(result)


def test_report_compare_judges_at_the_readers_fail_on(tmp_path, failing_run) -> None:
    """A run saved with fail_on: never (so verdict pass, consistently) still fails the reader's
    gate: the gate is the reader's --fail-on (or config), never the file's."""
    document = json.loads(failing_run.read_text())
    baseline = dict(document, findings=[], layers=[dict(layer, findings=[]) for layer in document["layers"]],
                    verdict="pass")
    document.update(fail_on="never", verdict="pass")
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    (tmp_path / "never.json").write_text(json.dumps(document))
    result = invoke(["report", "--compare", str(tmp_path / "base.json"), str(tmp_path / "never.json")])
    assert result.exit_code == 1, stderr_of(result)
    result = invoke(["report", "--compare", str(tmp_path / "base.json"), str(tmp_path / "never.json"),
                     "--fail-on", "never"])
    assert result.exit_code == 0, stderr_of(result)


# --- output that untrusted names could forge ------------------------------------------------

HOSTILE_ARCH = '''
import torch
from torch import nn


class Hostile(nn.Module):
    NAMES = {names!r}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        for name in self.NAMES:
            self.add_module(name, nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.stem(x)
        for name in self.NAMES:
            x = torch.relu(getattr(self, name)(x))
        return x.mean((2, 3))
'''

NAMES = ["bn\n::stop-commands::TOKEN", "bn\x1b]0;owned\x07\x1b[2J", "<img src=x onerror=alert(1)>`",
         "x\n# heading\n", "ctl\x01\x02"]


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "hostile_arch.py").write_text(HOSTILE_ARCH.format(names=NAMES))
    torch.manual_seed(0)
    model = module_from_file(tmp_path / "hostile_arch.py").Hostile()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_mean.fill_(3.0)  # every layer stale: names in findings and groups
    torch.save(model.state_dict(), tmp_path / "hostile.pt")
    return tmp_path / "hostile.pt", tmp_path / "hostile_arch.py"


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_layer_names_cannot_forge_terminal_or_annotations(tmp_path, hostile, data) -> None:
    ckpt, arch = hostile
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GITHUB_ACTIONS": "true"}
    result = subprocess.run([PYTHON, "-m", "bncheck", "run", str(ckpt), "--arch", f"{arch}:Hostile", "--data",
                             str(data), "--batch-size", "16", "--attribute", "0"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    both = result.stdout + result.stderr
    assert "\x1b" not in both and "\x07" not in both and "\x01" not in both
    for line in _lines(both):
        assert not line.startswith("::stop-commands"), line
        assert not line.startswith("# heading")
    assert any(line.startswith("::error") for line in _lines(result.stdout))  # our own annotations stay
    assert "\\n::stop-commands::TOKEN" in both  # shown, escaped


def test_layer_names_cannot_forge_markdown_or_break_junit(tmp_path, hostile, data) -> None:
    ckpt, arch = hostile
    result = invoke(["run", str(ckpt), "--arch", f"{arch}:Hostile", "--data", str(data), "--batch-size", "16",
                     "--attribute", "0", "--markdown", str(tmp_path / "r.md"), "--junit", str(tmp_path / "r.xml")])
    assert result.exit_code == 1, stderr_of(result)
    markdown = (tmp_path / "r.md").read_text()
    assert "<img" not in markdown and "<script" not in markdown
    assert not any(line.startswith("# heading") for line in _lines(markdown))
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert markdown.count("`") % 2 == 0  # no code span broken open by a name
    ET.fromstring((tmp_path / "r.xml").read_bytes())  # valid XML despite control bytes


def test_a_file_name_cannot_forge_a_workflow_command(tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 20, 90)).save(folder / f"{i}.png")
    (folder / "x\n::error title=forged::pwned\n.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    torch.save(calibrate(TinyNet(), make_batches(8)).state_dict(), tmp_path / "tiny.pt")
    result = subprocess.run([PYTHON, "-m", "bncheck", "run", str(tmp_path / "tiny.pt"), "--arch", TINY_ARCH,
                             "--data", str(folder), "--batch-size", "2", "--resize", "none", "--crop", "none"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "GITHUB_ACTIONS": "true"})
    assert "skipped unreadable file" in result.stderr, result.stderr
    for line in _lines(result.stdout + result.stderr):
        assert not line.startswith("::error title=forged"), line


# --- resources ------------------------------------------------------------------------------

def test_an_extreme_aspect_png_is_skipped_not_blown_up(tmp_path, weights) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (20000, 1), (i, i, i)).save(folder / f"strip{i}.png")
        Image.new("RGB", (40, 40), (i * 50, 30, 60)).save(folder / f"ok{i}.png")
    started = time.perf_counter()
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(folder), "--batch-size", "2",
                     "--resize", "256", "--crop", "32"])
    assert result.exit_code in (0, 1), stderr_of(result)
    assert "after resizing the shorter side" in stderr_of(result)
    assert time.perf_counter() - started < 60


def _npz_bomb(path: Path, rows: int) -> None:
    """A deflated .npy member that inflates to rows x 3 x 64 x 64 float32 (48 KB a row) of zeros."""
    row = 3 * 64 * 64 * 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (rows, 3, 64, 64)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())  # magic string and header
            zeros = bytes(row * 1024)
            for _ in range(rows // 1024):
                member.write(zeros)


def test_an_npz_bomb_reads_only_the_samples_used(tmp_path) -> None:
    bomb = tmp_path / "bomb.npz"
    _npz_bomb(bomb, 40 * 1024)  # 2 GB inflated, a few MB on disk
    assert bomb.stat().st_size < 20 * 1024 * 1024
    script = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from pathlib import Path\nfrom bncheck.reading.data.tensors import tensor_file\n"
              f"source = tensor_file(Path({str(bomb)!r}), 2, 1)\nbatch = next(iter(source.batches()))\n"
              # VmHWM: this process's own peak (ru_maxrss starts at the forking parent's, the test runner's)
              "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
              "print(tuple(batch[0].shape), peak)")
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shape, peak_kb = out.stdout.split(")")
    assert shape == "(2, 3, 64, 64"
    assert int(peak_kb) < 1_500_000  # torch alone is ~0.5 GB; the whole array would be 2 GB more


def test_a_deflated_tensor_record_is_refused(tmp_path) -> None:
    buffer = io.BytesIO()
    torch.save(torch.zeros(30, 3, 512, 512), buffer)  # 94 MB of zeros
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as old, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    result = invoke(["run", "--arch", TINY_ARCH, "--data", str(tmp_path / "deflated.pt")])
    assert result.exit_code == 3, stderr_of(result)
    assert "torch.save never compresses" in stderr_of(result)


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def test_yaml_billion_laughs_is_refused_fast(tmp_path, weights) -> None:
    config = tmp_path / "laughs.yaml"
    config.write_text("thresholds:\n  " + BILLION_LAUGHS.replace("\n", "\n  ").rstrip() + "\n")
    started = time.perf_counter()
    for args in (["run", str(weights), "--arch", TINY_ARCH, "--config", str(config)],
                 ["run", str(weights), "--arch", TINY_ARCH, "--arch-kwargs", "{" + BILLION_LAUGHS.replace(
                     "\n", ", ").rstrip(", ") + "}"]):
        result = invoke(args)
        assert result.exit_code == 2, stderr_of(result)
        assert len(stderr_of(result)) < 1000
    assert time.perf_counter() - started < 30


def test_a_huge_or_deep_saved_run_is_an_input_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("bncheck.reading.untrusted.MAX_RUN_BYTES", 16 * 1024 * 1024)  # the limit is 256 MB
    huge = tmp_path / "huge.json"
    with huge.open("w") as fh:
        fh.write('{"schema": "bncheck/run/v1", "pad": "')
        fh.write("x" * (17 * 1024 * 1024))
        fh.write('"}')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for path in (huge, deep):
        result = invoke(["report", str(path)])
        assert result.exit_code == 3, stderr_of(result)
        assert "bncheck bug" not in stderr_of(result)
    assert "larger than 16 MB" in stderr_of(invoke(["report", str(huge)]))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_never_read(tmp_path, weights, data) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    cases = [(["run", str(fifo), "--arch", TINY_ARCH], 3),
             (["run", str(weights), "--arch", TINY_ARCH, "--data", str(fifo)], 3),
             (["run", str(weights), "--arch", TINY_ARCH, "--config", str(fifo)], 2),
             (["report", str(fifo)], 3)]
    for args, code in cases:
        result = subprocess.run([PYTHON, "-m", "bncheck", *args], capture_output=True, text=True, timeout=120,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == code, (args, result.stderr)
        assert "FIFO" in result.stderr


# --- writing ----------------------------------------------------------------------------------

def test_an_output_cannot_overwrite_an_input_or_another_output(tmp_path, weights, data) -> None:
    before = file_hash(weights), file_hash(data)
    common = [str(weights), "--arch", TINY_ARCH, "--data", str(data)]
    for args in (["run", *common, "--json", str(weights)], ["run", *common, "--html", str(data)],
                 ["run", *common, "--json", str(tmp_path / "a"), "--markdown", str(tmp_path / "a")],
                 ["fix", *common, "--out", str(tmp_path / "new.pt"), "--json", str(tmp_path / "new.pt")],
                 ["fix", *common, "--out", str(tmp_path / "new.pt"), "--html", str(data)]):
        result = invoke(args)
        assert result.exit_code == 2, (args, stderr_of(result))
        assert "never overwrites its inputs" in stderr_of(result) or "both write" in stderr_of(result)
    assert (file_hash(weights), file_hash(data)) == before
    assert not (tmp_path / "new.pt").exists()


def test_an_unwritable_output_is_noticed_before_any_work(tmp_path, data) -> None:
    (tmp_path / "blocked").write_text("a file, not a folder")
    result = invoke(["run", str(tmp_path / "missing.pt"), "--arch", TINY_ARCH, "--data", str(data),
                     "--json", str(tmp_path / "blocked" / "run.json")])
    assert result.exit_code == 2, stderr_of(result)
    assert "cannot write the json report" in stderr_of(result)  # not "missing.pt does not exist": checked first


def test_a_full_disk_keeps_the_previous_output(tmp_path, weights, data, monkeypatch) -> None:
    target = tmp_path / "run.json"
    target.write_text("previous good run")
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".run.json."):
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = invoke(["run", str(weights), "--arch", TINY_ARCH, "--data", str(data), "--json", str(target)])
    assert result.exit_code == 2, stderr_of(result)
    assert "No space left on device" in stderr_of(result) and "bncheck bug" not in stderr_of(result)
    assert target.read_text() == "previous good run"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_writes_clean_up_and_never_replace_a_file_that_appeared(tmp_path) -> None:
    from bncheck.files import atomic_write

    target = tmp_path / "out.pt"

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 1000)
        raise SystemExit(143)  # what the CLI's SIGTERM handler raises

    with pytest.raises(SystemExit):
        atomic_write(target, interrupted)
    assert list(tmp_path.iterdir()) == []

    def racing(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"someone else's")

    with pytest.raises(InputError, match="appeared"):
        atomic_write(target, racing, exclusive=True)
    assert target.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_sigterm_ends_a_run_cleanly(tmp_path, weights) -> None:
    (tmp_path / "slow.py").write_text(
        "import os, signal, torch\n"
        "def data():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return [torch.randn(16, 3, 12, 12) for _ in range(2)]\n")
    result = subprocess.run([PYTHON, "-m", "bncheck", "run", str(weights), "--arch", TINY_ARCH, "--data",
                             f"{tmp_path / 'slow.py'}:data"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.tmp"))


def test_building_from_a_folder_is_sealed_offline_with_no_stdin(monkeypatch) -> None:
    import sys as system

    from bncheck.reading.formats.hub_folder import OFFLINE_ENV, sealed

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    stdin, stdout = system.stdin, system.stdout
    with sealed():
        assert all(os.environ[key] == "1" for key in OFFLINE_ENV)
        assert system.stdin.read() == ""  # a library's prompt gets no answer
        assert system.stdout is system.stderr  # and its chatter stays off stdout (--json -)
    assert "HF_HUB_OFFLINE" not in os.environ and system.stdin is stdin and system.stdout is stdout


def test_the_default_gate_is_the_stricter_of_the_file_and_the_config() -> None:
    from bncheck.reporting.report import stricter

    assert stricter("never", "error") == "error"  # a file cannot switch the gate off
    assert stricter("warning", "error") == "warning"  # nor is a stricter saved gate loosened
    assert stricter("error", "never") == "error"
