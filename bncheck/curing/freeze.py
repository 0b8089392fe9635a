"""Freezing BatchNorm the right way: what the seed user meant by ``momentum=0`` and
``requires_grad=False``.

A frozen BN layer must *normalize with its running statistics* (eval mode) and keep them,
even while the rest of the model trains. Setting momentum to 0 only stops the buffers
from updating -- in ``train()`` the layer still normalizes with each batch's statistics,
so the layers after it learn on batch-normalized inputs that eval mode never produces.
``freeze_batchnorm`` puts every BN layer in eval mode and keeps it there: a forward
pre-hook turns the layer back to eval before each call, so ``model.train()`` (which every
training loop calls) cannot undo it. Undo with the returned handle or
``unfreeze_batchnorm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _keep_eval(module: nn.Module, _args: Any) -> None:
    module.training = False


def _frozen_here(module: nn.Module) -> bool:
    """Whether ``freeze_batchnorm`` froze this module (its hook is the mark: nothing is set on
    the user's module besides it)."""
    return any(hook is _keep_eval for hook in module._forward_pre_hooks.values())


@dataclass
class FrozenBatchNorm:
    """Handle returned by ``freeze_batchnorm``; ``remove()`` restores what it changed."""

    layers: list[str]
    """Names of the layers it froze."""
    _undo: list[tuple[nn.Module, Any, bool, dict[str, bool]]] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Unfreeze: remove the hooks, restore each layer's training flag and its affine
        parameters' ``requires_grad`` as they were before freezing."""
        for module, handle, training, grads in self._undo:
            handle.remove()
            module.training = training
            for name, flag in grads.items():
                getattr(module, name).requires_grad_(flag)
        self._undo.clear()

    def __enter__(self) -> FrozenBatchNorm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def freeze_batchnorm(model: nn.Module, *, affine: bool = True) -> FrozenBatchNorm:
    """Keep every BatchNorm layer of ``model`` in eval mode with its running statistics,
    even after ``model.train()``; with ``affine=True`` also stop gradients to gamma/beta.

    Works on torchvision and timm models (any ``_BatchNorm`` subclass, SyncBatchNorm and
    timm's BatchNormAct2d included). Returns a handle: ``handle.remove()`` (or
    ``unfreeze_batchnorm(model)``) undoes it; also usable as a context manager.

    >>> import torch, bncheck
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> handle = bncheck.freeze_batchnorm(model)
    >>> _ = model.train()(torch.randn(2, 3, 8, 8))
    >>> model[1].training, int(model[1].num_batches_tracked), model[1].weight.requires_grad
    (False, 0, False)
    >>> handle.remove(); model[1].weight.requires_grad
    True
    """
    handle = FrozenBatchNorm(layers=[])
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or _frozen_here(module):
            continue
        grads = {}
        if affine:
            for pname in ("weight", "bias"):
                param = getattr(module, pname, None)
                if isinstance(param, nn.Parameter):
                    grads[pname] = param.requires_grad
                    param.requires_grad_(False)
        hook = module.register_forward_pre_hook(_keep_eval)
        handle._undo.append((module, hook, module.training, grads))
        module.training = False
        handle.layers.append(name)
    return handle


def unfreeze_batchnorm(model: nn.Module) -> None:
    """Remove every ``freeze_batchnorm`` hook from ``model`` (requires_grad is left as is;
    use the handle's ``remove()`` to restore it too)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _keep_eval:
                del module._forward_pre_hooks[key]


def is_frozen(module: nn.Module) -> bool:
    """Whether a BN module will normalize with its running statistics at its next call."""
    return _frozen_here(module) or not module.training
