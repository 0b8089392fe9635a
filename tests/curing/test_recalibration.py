"""recalibrate(): exact population statistics, checked against numpy over every value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyNet
from torch import nn

import bncheck
from bncheck.errors import UsageError


def population(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance over every value of ``[N, C, ...]`` arrays."""
    channels_last = np.moveaxis(values.astype(np.float64), 1, -1).reshape(-1, values.shape[1])
    return channels_last.mean(0), channels_last.var(0, ddof=1)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3)
        self.drop = nn.Dropout(0.5)  # must stay off while measuring
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.drop(self.conv(x)))


def test_statistics_equal_numpy_with_an_uneven_last_batch() -> None:
    model = ConvBN().eval()
    data = torch.randn(10, 3, 7, 9) * 3 + 2  # batches of 4, 4, 2
    with torch.no_grad():
        inputs = model.conv(data).numpy()
    result = bncheck.recalibrate(model, data, batch_size=4)
    mean, var = population(inputs)
    np.testing.assert_allclose(model.bn.running_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.numpy(), var, rtol=1e-6)
    assert result.samples == 10 and result.batches == 3 and result.in_place
    assert int(model.bn.num_batches_tracked) == 3
    assert result.layers[0].values == 10 * 5 * 7
    assert not model.training and not model.drop.training  # modes restored


def test_a_lone_last_sample_joins_the_batch_before() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    data = torch.randn(9, 3)
    result = bncheck.recalibrate(model, data, batch_size=4)  # 4, then 5: train-mode BN needs 2 per batch
    assert result.samples == 9 and result.batches == 2
    mean, var = population(data.numpy())
    np.testing.assert_allclose(model[0].running_var.numpy(), var, rtol=1e-6)


class Ghost(nn.Module):
    """Ghost BN: the batch normalized in chunks of 3 by one module."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.cat([self.bn(chunk) for chunk in x.split(3)])


class Shared(nn.Module):
    """One BN shared by two branches (an FPN head, say): called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(x) + self.bn(2 * x[..., :3, :3] + 1).mean()


def test_ghost_bn_pools_every_chunk() -> None:
    model = Ghost().eval()
    data = torch.randn(16, 4, 5, 5) * 0.5 - 1
    result = bncheck.recalibrate(model, data, batch_size=8)
    mean, var = population(data.numpy())
    np.testing.assert_allclose(model.bn.running_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.numpy(), var, rtol=1e-6)
    assert result.layers[0].calls == 6  # 2 batches x 3 chunks


def test_a_shared_bn_pools_both_calls() -> None:
    model = Shared().eval()
    data = torch.randn(12, 4, 6, 6)
    bncheck.recalibrate(model, data, batch_size=6)
    second = (2 * data[..., :3, :3] + 1).numpy()
    flat = [np.moveaxis(a, 1, -1).reshape(-1, 4) for a in (data.numpy(), second)]
    every = np.concatenate(flat).astype(np.float64)
    np.testing.assert_allclose(model.bn.running_mean.numpy(), every.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.numpy(), every.var(0, ddof=1), rtol=1e-6)


def test_not_in_place_leaves_the_model_and_previous_undoes() -> None:
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bncheck.recalibrate(model, torch.randn(16, 3, 8, 8), batch_size=8, in_place=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(result.state) == {f"bn{i}.{b}" for i in (1, 2, 3) for b in ("running_mean", "running_var",
                                                                          "num_batches_tracked")}
    model.load_state_dict(result.state, strict=False)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])
    model.load_state_dict(result.previous, strict=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layers_globs_num_samples_and_a_data_loader() -> None:
    model = TinyNet().eval()
    untouched = model.bn2.running_mean.clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 3, 8, 8)), batch_size=8)
    result = bncheck.recalibrate(model, loader, layers=["bn1", "bn3"], num_samples=16)
    assert [layer.name for layer in result.layers] == ["bn1", "bn3"]
    assert result.samples == 16 and result.batches == 2
    assert torch.equal(model.bn2.running_mean, untouched)
    with pytest.raises(UsageError, match="layers"):
        bncheck.recalibrate(model, torch.randn(8, 3, 8, 8), layers=["nope*"])


def test_frozen_and_untracked_layers_are_kept_with_a_reason() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), FrozenBatchNorm2d(3), nn.BatchNorm2d(3))
    result = bncheck.recalibrate(model, torch.randn(8, 3, 4, 4), batch_size=4)
    assert [layer.name for layer in result.layers] == ["2"]
    reasons = dict(result.skipped)
    assert "track_running_stats=False" in reasons["0"] and "frozen by design" in reasons["1"]


def test_small_samples_name_how_many_would_be_enough() -> None:
    model = ConvBN().eval()
    result = bncheck.recalibrate(model, torch.randn(4, 3, 5, 5), batch_size=2)
    assert result.worst_standard_error is not None and result.worst_standard_error > 0.05
    needed = result.samples_for_stable_statistics()
    assert needed is not None and needed > 4


def test_errors_name_python_arguments_and_the_cli_spells_flags() -> None:
    with pytest.raises(UsageError) as caught:
        bncheck.analyze(TinyNet(), torch.randn(8, 3, 8, 8), batch_size=1)
    assert "batch_size must be" in str(caught.value) and "--batch-size must be" in caught.value.for_cli()
    with pytest.raises(UsageError, match="thresholds.stale_eror"):
        bncheck.analyze(TinyNet(), torch.randn(8, 3, 8, 8), thresholds={"stale_eror": 1})


# BN's own statistics (momentum 1 for the pass) replace the hook's reduction after the first
# NATIVE_SPREAD_SAMPLES samples, except on batches 4, 8, 16, ...: the result must not change.


class ChunkingBNAct(nn.BatchNorm2d):
    """A BN whose own forward normalizes in chunks (its buffers end up holding the last chunk's
    statistics, not the call's): the check must keep it on the hook. Named like timm's layer,
    whose forward is trusted."""

    def forward(self, x):
        return torch.cat([nn.functional.batch_norm(c, self.running_mean, self.running_var, self.weight, self.bias,
                                                   self.training, self.momentum, self.eps) for c in x.split(2)])


ChunkingBNAct.__name__ = "BatchNormAct2d"


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, momentum=None)  # cumulative average: momentum must come back as None
        self.shared = nn.BatchNorm2d(4, momentum=0.0)  # the seed bug's momentum: still measured
        self.chunky = ChunkingBNAct(4)
        self.flat = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.shared(y) + self.shared(y[..., :2, :2] * 3 - 1).mean()
        y = self.chunky(y)
        return self.flat(y.mean((2, 3)))


def _hook_only(model: nn.Module, data: torch.Tensor, batch_size: int):
    from bncheck.measuring import statistics as collect
    saved = collect.NATIVE_SPREAD_SAMPLES
    collect.NATIVE_SPREAD_SAMPLES = 10**9
    try:
        return bncheck.recalibrate(model, data, batch_size=batch_size, in_place=False)
    finally:
        collect.NATIVE_SPREAD_SAMPLES = saved


def test_bn_own_statistics_give_the_hook_result_and_every_variant_stays_exact() -> None:
    model = Mixed().eval()
    data = torch.randn(120, 3, 6, 6) * 2 + 3  # 15 batches of 8: 6 hooked (1-4, 8), 9 from BN itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    native = bncheck.recalibrate(model, data, batch_size=8, in_place=False)
    hook = _hook_only(model, data, 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.bn.momentum is None and model.shared.momentum == 0.0 and model.chunky.momentum == 0.1
    assert native.state.keys() == hook.state.keys()
    for key, value in hook.state.items():
        torch.testing.assert_close(native.state[key], value, rtol=2e-6, atol=1e-7)
    for a, b in zip(native.layers, hook.layers):
        assert (a.name, a.values, a.calls) == (b.name, b.values, b.calls)
        assert a.standard_error == pytest.approx(b.standard_error, rel=0.5)  # fewer groups, same scale
    with torch.no_grad():  # and both equal numpy over every value
        inputs = model.conv(data).numpy()
    mean, var = population(inputs)
    np.testing.assert_allclose(native.state["bn.running_mean"].numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(native.state["bn.running_var"].numpy(), var, rtol=1e-5)


def test_which_layers_use_bn_own_statistics() -> None:
    from bncheck.measuring.statistics import statistics_pass
    from bncheck.runtime import runtime_for

    model = Mixed().eval()
    runtime = runtime_for(model)
    layers = runtime.layers
    with statistics_pass(runtime, precise=True, native=True) as stats:
        assert all(layer.module.momentum == 1.0 for i, layer in enumerate(layers) if i in stats.native)
        for batch in torch.randn(48, 3, 6, 6).split(8):  # 6 batches: 1-4 hooked, 5 and 6 native
            stats.forward(batch, "train")
    by_name = {layers[i].name: checked for i, checked in stats.native.items()}
    assert by_name == {"bn": True, "shared": True, "flat": True}  # the chunking layer failed its check
    moments = {entry.layer.name: entry.train for entry in stats.stats}
    assert moments["bn"].groups == 32 and moments["bn"].batches == 6  # groups only from hooked batches
    assert moments["chunky"].groups == 48
    assert model.bn.momentum is None and model.chunky.momentum == 0.1


def test_momentum_comes_back_when_the_forward_fails() -> None:
    model = Mixed().eval()

    def batches():
        yield from torch.randn(40, 3, 6, 6).split(8)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        bncheck.recalibrate(model, batches())
    assert model.bn.momentum is None and model.shared.momentum == 0.0 and model.flat.momentum == 0.1
