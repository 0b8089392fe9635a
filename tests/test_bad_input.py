"""The bad-input matrix: every case exits with its code and one line naming the problem
and the fix, prints no traceback, and leaves every input file byte-identical."""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES, TinyNet, calibrate, make_batches, tree_hashes
from PIL import Image

from bncheck.cli import cli

TINY_ARCH_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(num_classes=5):
    return Tiny(num_classes)


def broken(**kwargs):
    raise RuntimeError("database connection refused")


def no_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]
    code: int
    needles: tuple[str, ...]
    setup: Optional[Callable[[Path], None]] = None
    check: Optional[Callable[[Path, object], None]] = None
    expect_error_line: bool = True
    extra: dict = field(default_factory=dict)


def write_images(folder: Path, n: int = 6, size: tuple[int, int] = (20, 20), mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"img{i}.png")


def build_root(root: Path) -> None:
    """Every file the matrix needs, made once."""
    (root / "arch.py").write_text(TINY_ARCH_SOURCE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_input_arch", root / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = module.build()
    calibrate(tiny, make_batches(4, batch=8, size=16))
    torch.save(tiny.state_dict(), root / "tiny.pt")
    good = root / "tiny.pt"
    raw = good.read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "notes.pt").write_text("these are my notes, not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "ckpt_dir").mkdir()
    torch.save(TinyNet().state_dict(), root / "other_arch.pt")
    torch.save(TinyNet().eval(), root / "full_module.pt")
    torch.save(module.build(num_classes=7).state_dict(), root / "seven_classes.pt")
    from safetensors.torch import save_file

    save_file({k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in tiny.state_dict().items()},
              str(root / "int8.safetensors"))
    write_images(root / "images")
    write_images(root / "images_one_bad")
    (root / "images_one_bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("hi")
    (root / "all_bad").mkdir()
    for i in range(3):
        (root / "all_bad" / f"x{i}.jpg").write_bytes(b"not a jpeg")
    (root / "empty_dir").mkdir()
    write_images(root / "mixed", n=3, size=(20, 20))
    write_images(root / "mixed" / "more", n=3, size=(24, 30))
    gray = root / "gray16"
    gray.mkdir()
    for i in range(4):
        Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * (i + 1) * 40).save(gray / f"g{i}.png")
    np.save(root / "rank1.npy", np.zeros(10, dtype=np.float32))
    np.save(root / "five_channels.npy", np.zeros((4, 5, 16, 16), dtype=np.float32))
    with_nan = np.random.default_rng(2).normal(size=(4, 3, 16, 16)).astype(np.float32)
    with_nan[1, 0, 3, 3] = np.nan
    np.save(root / "nan.npy", with_nan)
    np.save(root / "one.npy", np.zeros((1, 3, 16, 16), dtype=np.float32))
    np.savez(root / "two.npz", a=np.zeros((4, 3, 16, 16), np.float32), b=np.ones((4, 3, 16, 16), np.float32))
    (root / "table.csv").write_text("a,b\n1,2\n")
    (root / "bad.yaml").write_text("data: [unclosed\n")
    (root / "typo.yaml").write_text("thresholds:\n  stale_eror: 1\n")
    (root / "blocked").write_text("a file where a folder should be")

    (root / "batch1.yaml").write_text("batch_size: 1\n")
    (root / "inverted.yaml").write_text("thresholds:\n  stale_warning: 0.9\n  stale_error: 0.3\n")
    (root / "kwargs_list.yaml").write_text("arch_kwargs: [1, 2]\n")
    (root / "arch_syntax.py").write_text("def build(:\n    pass\n")
    (root / "incomplete.json").write_text('{"schema": "bncheck/run/v1", "bncheck_version": "0"}')
    (root / "notjson.json").write_text("score: high\n")
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    with zipfile.ZipFile(root / "bad_script.pt", "w") as archive:
        archive.writestr("m/code/__torch__.py", "garbage")
        archive.writestr("m/constants.pkl", b"garbage")
    with zipfile.ZipFile(root / "bad_program.pt2", "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/models/model.json", "{garbage")
    # hostile files (tests/test_security.py builds the payloads that prove nothing runs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(calibrate(TinyNet(), make_batches(2))), root / "scripted.pt")
    (root / "nan.yaml").write_text("thresholds:\n  drift_to_noise: .nan\n")
    (root / "laughs.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6)))
    (root / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    import os

    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.pt")
    from bncheck.engine import analyze
    from bncheck.reporting.report import dumps

    (root / "other_model_run.json").write_text(dumps(analyze(calibrate(TinyNet(), make_batches(2)), make_batches(2))))
    (root / "exists.pt").write_bytes(b"keep")

    class Evil:
        def __reduce__(self):
            return (Path.touch, (root / "PWNED",))

    with (root / "evil.pt").open("wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)


TINY = lambda r: ["--arch", f"{r}/arch.py:build"]  # noqa: E731
DATA = lambda r: ["--data", f"{r}/images", "--batch-size", "3"]  # noqa: E731
SHUFFLE = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", "{num_classes: 4}"]

CASES = [
    Case("missing checkpoint", lambda r: ["run", f"{r}/nope.pt", *TINY(r), *DATA(r)], 3, ("nope.pt", "does not exist")),
    Case("directory as checkpoint", lambda r: ["run", f"{r}/ckpt_dir", *TINY(r), *DATA(r)], 3,
         ("ckpt_dir", "is a directory")),
    Case("empty checkpoint", lambda r: ["run", f"{r}/empty.pt", *TINY(r), *DATA(r)], 3, ("empty.pt", "empty")),
    Case("truncated zip", lambda r: ["run", f"{r}/truncated.pt", *TINY(r), *DATA(r)], 3,
         ("truncated.pt", "not a readable PyTorch checkpoint")),
    Case("random bytes", lambda r: ["run", f"{r}/random.pt", *TINY(r), *DATA(r)], 3, ("random.pt", "not a readable")),
    Case("text file", lambda r: ["run", f"{r}/notes.pt", *TINY(r), *DATA(r)], 3, ("notes.pt", "text file")),
    Case("state_dict of another architecture", lambda r: ["run", f"{r}/other_arch.pt", *TINY(r), *DATA(r)], 3,
         ("other_arch.pt", "does not fit", "missing", "--arch")),
    Case("wrong num_classes", lambda r: ["run", f"{r}/seven_classes.pt", *TINY(r), *DATA(r)], 3,
         ("seven_classes.pt", "--arch-kwargs '{num_classes: 7}'")),
    Case("full pickle without trust", lambda r: ["run", f"{r}/evil.pt", *TINY(r), *DATA(r)], 3,
         ("evil.pt", "--trust-checkpoint"), check=lambda r, res: not (r / "PWNED").exists() or pytest.fail("ran")),
    Case("torch.save(model) without trust", lambda r: ["run", f"{r}/full_module.pt", *DATA(r)], 3,
         ("full_module.pt", "pickled Python objects", "TinyNet", "--trust-checkpoint")),
    Case("unknown torchvision arch", lambda r: ["run", "--arch", "torchvision:resnet19", *DATA(r)], 3,
         ("--arch torchvision:resnet19", "did you mean", "torchvision:resnet18")),
    Case("unknown module arch", lambda r: ["run", "--arch", "no_such_pkg.models:build", *DATA(r)], 3,
         ("--arch no_such_pkg.models:build", "cannot import")),
    Case("user callable raises", lambda r: ["run", "--arch", f"{r}/arch.py:broken", *DATA(r)], 3,
         ("arch.py:broken", "database connection refused")),
    Case("arch spec without a colon", lambda r: ["run", "--arch", "resnet18", *DATA(r)], 2, ("--arch", "SOURCE:NAME")),
    Case("arch kwargs not a mapping", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--arch-kwargs", "[1, 2]", *DATA(r)],
         2, ("--arch-kwargs", "mapping")),
    Case("state_dict without --arch", lambda r: ["run", f"{r}/tiny.pt", *DATA(r)], 2, ("tiny.pt", "--arch")),
    Case("missing data path", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/nowhere"], 3,
         ("nowhere", "does not exist", "--data")),
    Case("empty data folder", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/empty_dir"], 3,
         ("empty_dir", "no images")),
    Case("folder of non-images", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/no_images"], 3,
         ("no_images", "no images")),
    Case("folder of corrupt images", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/all_bad"], 3,
         ("all_bad", "could be used", "valid image")),
    Case("single image as data", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/images/img0.png"], 3,
         ("img0.png", "folder")),
    Case("unknown data format", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/table.csv"], 3,
         ("table.csv", "tensor file")),
    Case("mixed image sizes without crop",
         lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/mixed", "--config", f"{r}/nocrop.yaml"], 3,
         ("mixed", "different sizes", "data.crop"),
         setup=lambda r: (r / "nocrop.yaml").write_text("data:\n  resize: null\n  crop: null\n")),
    Case("tensor of rank 1", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/rank1.npy"], 3,
         ("rank1.npy", "batch dimension")),
    Case("tensor with wrong channel count", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data",
                                                        f"{r}/five_channels.npy"], 3,
         ("(4, 5, 16, 16)", "forward pass failed", "check that the data matches")),
    Case("NaN in data", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/nan.npy"], 3, ("nan.npy", "NaN")),
    Case("a single sample", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/one.npy"], 3,
         ("one.npy", "at least 2")),
    Case("batch size 1", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r)[:2], "--batch-size", "1"], 2,
         ("--batch-size",)),
    Case("npz with several arrays and no key", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/two.npz"],
         3, ("two.npz", "a, b", ":NAME")),
    Case("int8 safetensors for a float model", lambda r: ["run", f"{r}/int8.safetensors", *TINY(r), *DATA(r)], 3,
         ("int8.safetensors", "torch.int8", "float32")),
    Case("malformed YAML config", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--config", f"{r}/bad.yaml"],
         2, ("bad.yaml", "not valid YAML")),
    Case("unknown config key", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--config", f"{r}/typo.yaml"], 2,
         ("typo.yaml", "thresholds.stale_eror")),
    Case("--top 0", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--top", "0"], 2, ("--top",)),
    Case("negative --num-batches", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--num-batches", "-2"], 2,
         ("--num-batches",)),
    Case("unknown flag", lambda r: ["run", "--colour"], 2, ("--colour",)),
    # config values validate like the flags they stand for
    Case("batch_size 1 in a config", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r)[:2], "--config",
                                                f"{r}/batch1.yaml"], 2,
         ("batch1.yaml", "'batch_size' must be at least 2")),
    Case("inverted thresholds", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--config", f"{r}/inverted.yaml"],
         2, ("thresholds.stale_warning (0.9) is above thresholds.stale_error",)),
    Case("arch_kwargs list in a config", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--config",
                                                    f"{r}/kwargs_list.yaml"], 2, ("'arch_kwargs' must be a mapping",)),
    Case("--resize not a number", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--resize", "big"], 2,
         ("--resize must be a size in pixels or 'none'",)),
    # --arch file.py:fn failures
    Case("arch file missing", lambda r: ["run", f"{r}/tiny.pt", "--arch", f"{r}/nope.py:build", *DATA(r)], 3,
         ("nope.py", "does not exist")),
    Case("arch file without the callable", lambda r: ["run", f"{r}/tiny.pt", "--arch", f"{r}/arch.py:buld", *DATA(r)],
         3, ("arch.py:buld", "no attribute 'buld'")),
    Case("arch file with a syntax error", lambda r: ["run", f"{r}/tiny.pt", "--arch", f"{r}/arch_syntax.py:build",
                                                     *DATA(r)], 3, ("arch_syntax.py", "raised SyntaxError")),
    # unreadable archives of every format
    Case("unreadable safetensors", lambda r: ["run", f"{r}/garbage.safetensors", *TINY(r), *DATA(r)], 3,
         ("garbage.safetensors", "not a readable safetensors file")),
    Case("unreadable TorchScript", lambda r: ["run", f"{r}/bad_script.pt", "--trust-checkpoint", *DATA(r)], 3,
         ("bad_script.pt", "TorchScript archive that failed to load")),
    Case("unreadable .pt2", lambda r: ["run", f"{r}/bad_program.pt2", *DATA(r)], 3,
         ("bad_program.pt2", "torch.export archive that failed to load")),
    Case("npz key that is not there", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--data", f"{r}/two.npz:c"], 3,
         ("two.npz has no array 'c'", "a, b")),
    # what the file is, and what it is not
    Case("sample state_dict without --arch names its architecture",
         lambda r: ["run", str(SAMPLES / "healthy.pt"), *DATA(r)], 2,
         ("--arch torchvision:shufflenet_v2_x0_5 --arch-kwargs '{num_classes: 4}'",)),
    Case("shufflenet weights as resnet18", lambda r: ["run", str(SAMPLES / "healthy.pt"), "--arch",
                                                      "torchvision:resnet18", *DATA(r)], 3,
         ("keys match by name", "its keys look like --arch torchvision:shufflenet_v2_x0_5")),
    # report inputs
    Case("report of a missing run", lambda r: ["report", f"{r}/nothing.json"], 3, ("no saved run",)),
    Case("report of a run that is not JSON", lambda r: ["report", f"{r}/notjson.json"], 3, ("not valid JSON",)),
    Case("report of an incomplete run", lambda r: ["report", f"{r}/incomplete.json"], 3,
         ("incomplete.json is not a valid bncheck/run/v1 document",)),
    Case("report with two formats on stdout", lambda r: ["report", f"{r}/other_model_run.json", "--json",
                                                         "--markdown"], 2, ("would both print to stdout",)),
    Case("baseline of another model", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--baseline",
                                                 f"{r}/other_model_run.json"], 2, ("is from another model",)),
    # unwritable outputs
    Case("unwritable --json path", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--json",
                                              f"{r}/blocked/run.json"], 2,
         ("cannot write the json report to", "blocked/run.json")),
    # fix
    Case("fix without --data", lambda r: ["fix", f"{r}/tiny.pt", *TINY(r), "--out", "new.pt"], 2, ("--data",)),
    Case("fix without --out", lambda r: ["fix", f"{r}/tiny.pt", *TINY(r), *DATA(r)], 2, ("--out NEW", "--dry-run")),
    Case("fix over an existing file", lambda r: ["fix", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--out", f"{r}/exists.pt"],
         3, ("exists.pt already exists", "--force")),
    Case("fix over its input", lambda r: ["fix", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--out", f"{r}/tiny.pt"], 3,
         ("is the input checkpoint",)),
    Case("fix into a missing folder", lambda r: ["fix", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--out",
                                                 f"{r}/no/such/dir/new.pt"], 3, ("does not exist",)),
    # untrusted files (security model in README)
    Case("TorchScript without --trust-checkpoint", lambda r: ["run", f"{r}/scripted.pt"], 3,
         ("TorchScript archive", "--trust-checkpoint")),
    Case("non-finite threshold", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--config", f"{r}/nan.yaml"],
         2, ("drift_to_noise", "finite")),
    Case("YAML alias bomb", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), "--config", f"{r}/laughs.yaml"], 2,
         ("YAML aliases",)),
    Case("saved run nested too deep", lambda r: ["report", f"{r}/deep.json"], 3, ("nested too deeply",)),
    Case("--json over the checkpoint", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--json",
                                                  f"{r}/tiny.pt"], 2, ("is the input checkpoint",)),
    Case("two outputs on one path", lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--html", "same.out",
                                               "--junit", "same.out"], 2, ("both write",)),
]
if hasattr(__import__("os"), "mkfifo"):
    CASES.append(Case("a FIFO as checkpoint", lambda r: ["run", f"{r}/fifo.pt", *TINY(r)], 3, ("FIFO",)))
if not torch.cuda.is_available():
    CASES.append(Case("--device cuda without CUDA",
                      lambda r: ["run", f"{r}/tiny.pt", *TINY(r), *DATA(r), "--device", "cuda"], 2,
                      ("--device cuda", "--device cpu")))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_input")
    build_root(path)
    return path


def stderr_of(result) -> str:
    return result.stderr if result.stderr_bytes is not None else result.output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if case.setup:
        case.setup(root)
    before = tree_hashes(root)
    samples_before = tree_hashes(SAMPLES)
    result = CliRunner().invoke(cli, case.args(root))
    err = stderr_of(result)
    assert result.exit_code == case.code, (result.exit_code, err, result.stdout)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if case.code == 3:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:
        assert any(line.lower().startswith(("error", "usage", "try")) for line in lines), err
    message = err if case.code == 2 else lines[0]
    for needle in case.needles:
        assert needle in message, (needle, message)
    if case.check:
        case.check(root, result)
    assert tree_hashes(root) == before
    assert tree_hashes(SAMPLES) == samples_before
    assert not (root / "PWNED").exists()


def test_one_corrupt_image_is_skipped_and_counted(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(root)
    result = CliRunner().invoke(cli, ["run", f"{root}/tiny.pt", *TINY(root), "--data", f"{root}/images_one_bad",
                                      "--batch-size", "4", "--json", "-", "-q"])
    doc = json.loads(result.stdout)
    assert result.exit_code == (1 if doc["verdict"] == "fail" else 0), result.output
    assert doc["data"]["skipped"] == 1 and doc["data"]["samples"] == 6
    assert "warning: skipped unreadable file" in stderr_of(result) and "broken.png" in stderr_of(result)
    assert tree_hashes(root) == before


def test_sixteen_bit_grayscale_images_are_converted(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", f"{root}/tiny.pt", *TINY(root), "--data", f"{root}/gray16",
                                      "--batch-size", "2", "--json", "-", "-q"])
    doc = json.loads(result.stdout)
    assert result.exit_code == (1 if doc["verdict"] == "fail" else 0), stderr_of(result)
    assert doc["data"]["samples"] == 4


def test_model_without_batchnorm_exits_zero(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--arch", f"{root}/arch.py:no_bn", *DATA(root), "--json", "-"])
    assert result.exit_code == 0, stderr_of(result)
    assert json.loads(result.stdout)["verdict"] == "no-batchnorm"
    assert "No BatchNorm layers" in stderr_of(result) and "RANDOM weights" in stderr_of(result)


def test_unwritable_save_dir_still_prints(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", f"{root}/tiny.pt", *TINY(root), *DATA(root),
                                      "--save", f"{root}/blocked/last-run.json"])
    assert result.exit_code == (1 if "bncheck FAIL" in result.stdout else 0), stderr_of(result)
    assert "bncheck" in result.stdout
    assert "warning: cannot write the run to" in stderr_of(result)


def test_unexpected_exception_is_exit_4_with_debug_hint(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    def explode(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("bncheck.engine.analyze", explode)
    result = CliRunner().invoke(cli, ["run", f"{root}/tiny.pt", *TINY(root), *DATA(root)])
    assert result.exit_code == 4
    err = stderr_of(result)
    assert "internal error: ZeroDivisionError: boom" in err and "--debug" in err and "Traceback" not in err
    debug = CliRunner().invoke(cli, ["--debug", "run", f"{root}/tiny.pt", *TINY(root), *DATA(root)])
    assert debug.exit_code == 4 and "Traceback" in stderr_of(debug)


def test_matrix_covers_every_command_and_exit_code() -> None:
    """Every command has bad-input cases, and both user-error codes are exercised."""
    commands = {case.args(Path("/r"))[0] for case in CASES if not case.args(Path("/r"))[0].startswith("-")}
    assert {"run", "report", "fix"} <= commands
    assert {case.code for case in CASES} == {2, 3}
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


def test_zip_detection_does_not_misread_a_plain_zip(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "photos.pt", "w") as archive:
        archive.writestr("a.txt", "hello")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "photos.pt"), *TINY(root), *DATA(root)])
    assert result.exit_code == 3 and "not a readable PyTorch checkpoint" in stderr_of(result)
