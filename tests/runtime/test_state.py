"""State that a run must leave as it found it: snapshots, fingerprints, mode switching, hooks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from bncheck.runtime import checksum, fingerprint, preserved_state, runtime_for


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


def test_checksum_sees_every_write_a_run_could_make_and_survives_the_runs_own_restores() -> None:
    m = model()
    before = checksum(m)
    with preserved_state(m) as snapshot:  # the passes write buffers and restore them: no change
        m[1].train()
        m[1](torch.randn(8, 4))
        snapshot.restore_buffers()
    assert checksum(m) == before
    with torch.no_grad():
        m[0].weight.mul_(1.0)  # same values, but a write through torch: its version counter moved
    assert checksum(m) != before
    before = checksum(m)
    m[0].bias.data[0] += 1  # bypasses the version counter: the bit sum sees it
    assert checksum(m) != before
    m[0].bias.data[0] -= 1
    assert checksum(m) == before
    m[1].running_var.data[1] = 2.0  # a buffer, written behind torch's back
    assert checksum(m) != before
    m[1].running_var.data[1] = 1.0
    m[1].num_batches_tracked.data += 1  # integer buffers too
    assert checksum(m) != before
    m[1].num_batches_tracked.data -= 1
    m.frozen.train()
    assert checksum(m) != before
    m.frozen.eval()
    half = nn.BatchNorm1d(4).half()  # 2-byte and 1-byte elements read as their own widths
    flags = nn.Module()
    flags.register_buffer("mask", torch.tensor([True, False]))
    for module in (half, flags):
        start = checksum(module)
        next(iter(module.buffers())).data[0] = not bool(next(iter(module.buffers()))[0]) \
            if module is flags else 3.0
        assert checksum(module) != start
    assert checksum(m) == before


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
