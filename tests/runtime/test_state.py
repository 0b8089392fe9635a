"""State that a run must leave as it found it: snapshots, fingerprints, mode switching, hooks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from bncheck.runtime import fingerprint, preserved_state, runtime_for


class Net(nn.Sequential):
    """Linear -> BN -> Dropout, and a frozen look-alike that never runs."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.add_module("frozen", torchvision.ops.FrozenBatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[2](self[1](self[0](x)))


def model() -> nn.Module:
    return Net().eval()


def test_fingerprint_sees_buffers_parameters_and_modes() -> None:
    m = model()
    before = fingerprint(m)
    m[1].running_mean += 1
    assert fingerprint(m) != before
    m[1].running_mean -= 1
    assert fingerprint(m) == before
    m[2].train()
    assert fingerprint(m) != before


def test_preserved_state_restores_buffers_and_each_modules_own_flag_even_on_error() -> None:
    m = model()
    m[1].train()  # saved with one layer in train mode: restored as it was, not by model.train()
    before = fingerprint(m)
    with pytest.raises(RuntimeError), preserved_state(m):
        m.train()
        m(torch.randn(8, 3))  # updates the running statistics
        raise RuntimeError("boom")
    assert fingerprint(m) == before


def test_set_mode_puts_only_batchnorm_in_train_mode() -> None:
    m = model()
    runtime = runtime_for(m)
    runtime.set_mode(bn_training=True)
    assert (m.training, m[1].training, m[2].training, m.frozen.training) == (False, True, False, False)
    runtime.set_mode(bn_training=False)
    assert not any(module.training for module in m.modules())


def test_observe_hands_inputs_over_and_removes_its_hooks_even_on_error() -> None:
    m = model()
    runtime = runtime_for(m)
    seen: list[tuple[int, tuple[int, ...]]] = []

    class Sink:
        def __call__(self, index: int, x: torch.Tensor) -> None:
            seen.append((index, tuple(x.shape)))

        def from_buffers(self, index: int, mean: torch.Tensor, var: torch.Tensor, samples: int) -> None:
            raise AssertionError("no buffer-measured layer here")

    with pytest.raises(ValueError), runtime.observe(Sink()):
        m(torch.randn(5, 3))
        raise ValueError("a forward that fails")
    assert seen == [(0, (5, 4))]
    assert all(not module._forward_pre_hooks and not module._forward_hooks for module in m.modules())
