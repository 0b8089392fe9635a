"""freeze_batchnorm: BN layers normalize with their running statistics through model.train(),
nothing but a hook is left on the user's modules, and the handle undoes it."""

from __future__ import annotations

import torch
from torch import nn

import bncheck
from bncheck.curing.freeze import is_frozen


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))


def test_frozen_layers_keep_eval_through_train_and_the_handle_undoes_it() -> None:
    m = model()
    attributes = {name: set(vars(module)) for name, module in m.named_modules()}
    handle = bncheck.freeze_batchnorm(m)
    again = bncheck.freeze_batchnorm(m)  # a second call freezes nothing twice
    assert handle.layers == ["1", "3"] and again.layers == []
    assert {name: set(vars(module)) for name, module in m.named_modules()} == attributes
    before = m[1].running_mean.clone()
    m.train()(torch.randn(4, 3, 8, 8))
    assert torch.equal(m[1].running_mean, before) and int(m[1].num_batches_tracked) == 0
    assert is_frozen(m[1]) and is_frozen(m[3]) and not m[1].weight.requires_grad
    handle.remove()
    assert not m[1]._forward_pre_hooks and m[1].weight.requires_grad
    m.train()
    assert not is_frozen(m[1])


def test_unfreeze_removes_every_hook() -> None:
    m = model()
    bncheck.freeze_batchnorm(m, affine=False)
    bncheck.unfreeze_batchnorm(m)
    assert all(not module._forward_pre_hooks for module in m.modules())
    assert m[1].weight.requires_grad
