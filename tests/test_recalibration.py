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
