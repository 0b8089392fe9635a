"""torch.distributed: `torchrun -m bncheck run/fix` with 2 gloo processes on CPU gives the
single-process result; a failing rank ends every rank with one error (never a hang); inside a
user's own process group, BN buffers that differ between ranks are `rank-divergent-stats`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, TinyNet, calibrate, make_batches

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

ARCH = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from conftest import TinyNet


def build():
    return TinyNet()
"""

FLAKY = """
import os
import torch


class Failing:
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        yield torch.randn(16, 3, 12, 12, generator=g)
        raise OSError("shard 3 is unreadable")


def data():
    if os.environ.get("RANK") == "1":
        return Failing()
    return [torch.randn(16, 3, 12, 12) for _ in range(4)]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    (root / "arch.py").write_text(ARCH)
    (root / "flaky.py").write_text(FLAKY)
    torch.manual_seed(0)
    stale = calibrate(TinyNet(), make_batches(seed=1))
    with torch.no_grad():
        stale.bn1.running_mean += 1.5  # a stale first layer: findings, attribution, noise check
    torch.save(stale.state_dict(), root / "stale.pt")
    torch.save(calibrate(TinyNet(), make_batches(n_batches=8)).state_dict(), root / "healthy.pt")
    gen = torch.Generator().manual_seed(3)
    torch.save((torch.randn(128, 3, 12, 12, generator=gen), torch.randint(0, 5, (128,), generator=gen)),
               root / "data.pt")
    return root


def bncheck(args: list[str], cwd: Path, nproc: int = 1, timeout: float = 180,
            dist_timeout: int = 60) -> subprocess.CompletedProcess:
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [PYTHON]), "-m", "bncheck", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BNCHECK_DIST_TIMEOUT": str(dist_timeout)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def common(root: Path, checkpoint: str) -> list[str]:
    return [str(root / checkpoint), "--arch", f"{root / 'arch.py'}:build", "--data", str(root / "data.pt"),
            "--batch-size", "16", "--num-batches", "8"]


@pytest.mark.parametrize("checkpoint, expected", [("stale.pt", 1), ("healthy.pt", 0)])
def test_two_processes_give_the_single_process_result(setup, checkpoint, expected) -> None:
    args = ["run", *common(setup, checkpoint), "-q", "--save", str(setup / "last.json")]
    single = bncheck([*args, "--json", str(setup / "single.json")], setup)
    multi = bncheck([*args, "--json", str(setup / "multi.json")], setup, nproc=2)
    assert single.returncode == expected, single.stderr
    assert multi.returncode == expected, multi.stderr  # torchrun passes 0 through; any failure is 1
    a, b = (json.loads((setup / name).read_text()) for name in ("single.json", "multi.json"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["verdict"] == b["verdict"] and a["data"]["samples"] == b["data"]["samples"] == 128
    assert [la["name"] for la in a["layers"]] == [la["name"] for la in b["layers"]]  # same ranking
    for x, y in zip(a["layers"], b["layers"]):
        for key in ("score", "eval_score", "noise_floor", "mean_shift", "attribution"):
            if x[key] is None:
                assert y[key] is None
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-12), (x["name"], key)
    assert b["output"]["kl"] == pytest.approx(a["output"]["kl"], rel=1e-9)
    assert b["output"]["train_accuracy"] == a["output"]["train_accuracy"]
    assert [(f["code"], f["layer"]) for f in a["findings"]] == [(f["code"], f["layer"]) for f in b["findings"]]
    if expected:
        assert "bncheck FAIL" in multi.stderr and multi.stderr.count("bncheck FAIL (") == 1  # rank 0 only


@pytest.mark.slow  # two processes, ~8 s: `make test-slow`
def test_fix_under_torchrun_writes_what_one_process_writes(setup) -> None:
    args = ["fix", *common(setup, "stale.pt"), "-q", "--force"]
    assert bncheck([*args, "--out", str(setup / "one.pt")], setup).returncode == 0
    multi = bncheck([*args, "--out", str(setup / "two.pt")], setup, nproc=2)
    assert multi.returncode == 0, multi.stderr
    one, two = torch.load(setup / "one.pt"), torch.load(setup / "two.pt")
    for key in one:
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(two[key], one[key]), key


def test_a_failing_rank_ends_every_rank_with_one_error(setup) -> None:
    started = time.perf_counter()
    result = bncheck(["run", str(setup / "healthy.pt"), "--arch", f"{setup / 'arch.py'}:build",
                      "--data", f"{setup / 'flaky.py'}:data", "--batch-size", "16"], setup, nproc=2, timeout=120)
    assert result.returncode != 0
    assert time.perf_counter() - started < 90  # no hang
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 failed: OSError: shard 3 is unreadable"], result.stderr


HUNG = """
import os
import time
import torch


def data():
    if os.environ.get("RANK") == "1":
        time.sleep(3600)  # a data pipeline that never returns on one rank
    return [torch.randn(16, 3, 12, 12) for _ in range(4)]
"""


@pytest.mark.slow  # waits out a timeout, ~12 s: `make test-slow`
def test_a_hung_rank_is_named_and_is_not_an_internal_error(setup) -> None:
    (setup / "hung.py").write_text(HUNG)
    started = time.perf_counter()
    result = bncheck(["run", str(setup / "healthy.pt"), "--arch", f"{setup / 'arch.py'}:build",
                      "--data", f"{setup / 'hung.py'}:data", "--batch-size", "16"], setup, nproc=2, timeout=150,
                     dist_timeout=8)
    assert result.returncode != 0
    assert time.perf_counter() - started < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: rank 1 of 2 did not arrive"), result.stderr
    assert "BNCHECK_DIST_TIMEOUT" in errors[0] and "bncheck bug" not in result.stderr


DDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import TinyNet, calibrate, make_batches
import bncheck

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = calibrate(TinyNet(), make_batches(n_batches=8))
if rank == 1:  # broadcast_buffers=False: this rank kept its own statistics in bn2
    with torch.no_grad():
        model.bn2.running_var *= 1.5
before = {{k: v.clone() for k, v in model.state_dict().items()}}
report = bncheck.analyze(model, torch.cat(make_batches(n_batches=4)), batch_size=16, attribute=0)
assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
found = [(f.code, f.layer, f.severity, f.message) for f in report.findings if f.code == "rank-divergent-stats"]
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as fh:
    json.dump({{"found": found, "world": report.world_size, "samples": report.data.samples,
               "scores": [la.score for la in report.layers]}}, fh)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_inside_a_users_process_group_divergent_buffers_are_found(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(tmp_path))))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1  # one report on every rank
    assert rank0["world"] == 2 and rank0["samples"] == 64  # the tensor was split between the ranks
    [(code, layer, severity, message)] = rank0["found"]
    assert (code, layer, severity) == ("rank-divergent-stats", "bn2", "warning")
    assert "rank 1 (0.22)" in message and "this report describes rank 0's" in message


def test_pooled_state_declares_how_each_field_reduces() -> None:
    """Each pooled quantity says how it reduces across ranks (sum, max, any, concatenation,
    first), as torchmetrics' add_state does; a field that does not say is an error."""
    from collections import Counter
    from dataclasses import dataclass

    from bncheck.measuring.distributed import SampleCounts, combine, pooled
    from bncheck.measuring.outputs import OutputTally

    a = SampleCounts(10, 2, 8, False, None, [torch.tensor([1, 2])])
    b = SampleCounts(6, 1, 6, True, (3, 12, 12), [None])
    pooled_counts = combine([a, b])
    assert (pooled_counts.samples, pooled_counts.batches, pooled_counts.largest) == (16, 3, 8)
    assert pooled_counts.any_labels and pooled_counts.input_shape == (3, 12, 12)
    assert len(pooled_counts.labels_per_batch) == 2
    left, right = OutputTally(kind="classifier", samples=3, kl=0.5, classes=4, eval_predicted=Counter({1: 3})), \
        OutputTally(kind="classifier", samples=2, kl=0.25, classes=4, eval_predicted=Counter({1: 1, 2: 1}))
    total = combine([left, right])
    assert total.kind == "classifier" and total.samples == 5 and total.kl == 0.75 and total.classes == 4
    assert total.eval_predicted == Counter({1: 4, 2: 1})
    assert combine([left, OutputTally(kind="tensor")]).kind == "none"  # ranks disagree on what outputs are

    @dataclass
    class Undeclared:
        count: int = 0

    with pytest.raises(TypeError, match="does not say how it pools"):
        combine([Undeclared(), Undeclared()])
    with pytest.raises(ValueError):
        pooled("median")
