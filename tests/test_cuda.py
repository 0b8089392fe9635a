"""The CUDA path (skipped without a GPU): same numbers as on the CPU, the model stays where it
was and bit-identical, recalibration exact on the device, fix writes a file that loads on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_ARGS, SAMPLES, TinyNet, calibrate, make_batches

import bncheck
from bncheck.cli import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def stale() -> torch.nn.Module:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    with torch.no_grad():
        model.bn2.running_mean += 2 * model.bn2.running_var.sqrt()
    return model


def test_cuda_scores_match_cpu_and_model_is_untouched() -> None:
    cpu_model = stale()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    batches = make_batches(4)
    on_cpu = bncheck.analyze(cpu_model, batches)
    on_gpu = bncheck.analyze(gpu_model, batches)
    assert on_gpu.device.startswith("cuda")
    assert [layer.name for layer in on_gpu.layers] == [layer.name for layer in on_cpu.layers]
    for a, b in zip(on_cpu.layers, on_gpu.layers):
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-6)
    assert on_gpu.verdict == on_cpu.verdict == "fail"
    assert all(torch.equal(before[k], v) for k, v in gpu_model.state_dict().items())
    assert all(p.is_cuda for p in gpu_model.parameters())


def test_device_argument_moves_the_model_and_back() -> None:
    model = stale()
    params = [id(p) for p in model.parameters()]
    report = bncheck.analyze(model, make_batches(2), device="cuda")
    assert report.device.startswith("cuda")
    assert all(not p.is_cuda for p in model.parameters()) and [id(p) for p in model.parameters()] == params


def test_recalibration_on_cuda_equals_cpu() -> None:
    data = torch.cat(make_batches(4))
    cpu = bncheck.recalibrate(stale(), data, batch_size=16, in_place=False).state
    gpu_model = stale().cuda()
    gpu = bncheck.recalibrate(gpu_model, data, batch_size=16).state
    for key, value in cpu.items():
        torch.testing.assert_close(gpu[key].cpu(), value, rtol=1e-5, atol=1e-6)
    assert gpu_model.bn2.running_mean.is_cuda


def test_fix_on_cuda_writes_a_checkpoint_that_loads_on_cpu(tmp_path) -> None:
    out = tmp_path / "fixed.pt"
    result = CliRunner().invoke(cli, ["fix", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "--device", "cuda",
                                      "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())


def _syncs(layers_count: int, native: bool) -> int:
    """Host synchronisations torch reports in two statistics passes (eval + train, or two native
    recalibration batches after the hooked ones) over a stack of conv+BN blocks."""
    import warnings

    from bncheck.measuring.statistics import statistics_pass
    from bncheck.runtime import runtime_for

    blocks = [torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)) for _ in range(layers_count)]
    model = torch.nn.Sequential(*blocks).cuda().eval()
    x = torch.randn(16, 4, 6, 6, device="cuda")
    with statistics_pass(runtime_for(model), precise=native, native=native) as stats:
        modes = ["train"] * 4 if native else ["eval", "train"]
        for mode in modes:  # warm-up; native: batches 1, 2 and 4 are hooked and checked
            stats.forward(x, mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for mode in (["train"] * 3 if native else ["eval", "train"]):  # native: batches 5-7
                    stats.forward(x, mode)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("native", [False, True], ids=["analyze", "recalibrate-native"])
def test_no_host_synchronisation_per_layer(native: bool) -> None:
    assert _syncs(12, native) == _syncs(3, native)
