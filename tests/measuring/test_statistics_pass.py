"""The statistics pass: pooled input statistics per layer and mode, by hooks and by buffer
updates, with hand-computed expectations; the model is left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bncheck.measuring.statistics import per_sample_stats, statistics_pass
from bncheck.runtime import fingerprint, runtime_for


def test_per_sample_statistics_by_hand() -> None:
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]], [[[0.0, 4.0]], [[5.0, 7.0]]]])  # [N=2, C=2, 1, 2]
    mean, var, positions = per_sample_stats(x)
    assert positions == 2
    assert mean.tolist() == [[2.0, 2.0], [2.0, 6.0]]
    assert var.tolist() == [[1.0, 0.0], [4.0, 1.0]]
    flat_mean, flat_var, one = per_sample_stats(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert one == 1 and flat_mean.tolist() == [[1.0, 2.0], [3.0, 4.0]] and flat_var.abs().sum() == 0


def test_both_modes_pool_every_value_once_and_the_model_is_unchanged() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    data = [torch.tensor([[0.0, 10.0], [2.0, 10.0]]), torch.tensor([[4.0, 16.0], [6.0, 12.0], [8.0, 12.0]])]
    before = fingerprint(model)
    with statistics_pass(runtime_for(model)) as stats:
        for x in data:
            stats.forward(x, "eval")
            stats.forward(x, "train")
    assert fingerprint(model) == before
    first, second = stats.stats
    everything = torch.cat(data).double()
    for moments in (first.eval, first.train):  # the first layer sees the data itself in both modes
        assert moments.mean.tolist() == pytest.approx(everything.mean(0).tolist())
        assert moments.var.tolist() == pytest.approx(everything.var(0, correction=0).tolist())
        assert moments.values == 5
    assert (first.depth, second.depth) == (0, 1)
    assert (first.train_calls, second.train_calls) == (2, 2)
    # in train mode the second layer's input comes from batch-normalized activations: per batch,
    # Linear of zero-mean inputs has the bias as its mean
    assert second.train.mean.tolist() == pytest.approx(model[1].bias.double().tolist(), abs=1e-4)


def test_a_layer_called_twice_per_forward_pools_both_calls() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) + self.bn(x + 2.0)

    model = Shared().eval()
    with statistics_pass(runtime_for(model)) as stats:
        stats.forward(torch.tensor([[0.0], [2.0]]), "train")
    (entry,) = stats.stats
    assert entry.train_calls == 2 and entry.train.values == 4
    assert entry.train.mean.item() == pytest.approx(2.0)  # 0, 2, 2, 4


def test_buffer_updates_give_the_batch_statistics_where_hooks_cannot_reach() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2, momentum=0.5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.tensor([[0.0, 10.0], [2.0, 10.0], [4.0, 16.0]])
    runtime = runtime_for(scripted)
    before = fingerprint(scripted)
    with statistics_pass(runtime) as stats:
        stats.forward(x, "eval")
        stats.forward(x, "train")
    assert fingerprint(scripted) == before
    (entry,) = stats.stats
    assert entry.eval is None  # no hooks: the eval pass is not observed
    # r_new = 0.5 r_old + 0.5 mu_B  =>  mu_B = (r_new - 0.5 r_old) / 0.5; the variance arrives unbiased
    assert entry.train.mean.tolist() == pytest.approx([2.0, 12.0])
    assert entry.train.var.tolist() == pytest.approx([4.0, 12.0])
    assert entry.train_calls == 1
