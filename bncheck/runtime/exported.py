"""``torch.export`` programs (``.pt2``): run the graph with its BN calls routed through
real BatchNorm modules, so hooks, train/eval switching and buffer restoration work as for
any other model.

``torch.export.load(f).module()`` is an FX ``GraphModule`` whose BN layers are plain
containers of buffers and whose graph calls ``aten.batch_norm`` (or the
``_native_batch_norm_legit*`` variants) with ``training`` baked in; ``.train()`` raises.
``ExportedProgramModule`` wraps it: one ``ExportedBatchNorm`` per BN call, sharing the
graph's own weight and buffer tensors, named after them (``layer1.0.bn1``), and an FX
interpreter that calls those modules instead of the baked-in op. ``ExportedRuntime`` is the
runtime of such a wrapper: its layers are those modules, measured by hooks, each with the
class the export traced and the ``training`` flag the export baked in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncheck.runtime.base import Runtime
from bncheck.runtime.eager import batchnorm_layer
from bncheck.runtime.layer import BNLayer

aten = torch.ops.aten
# target -> (index of the momentum arg, index of the eps arg, whether it returns (out, mean, rstd))
_BN_OPS: dict[Any, tuple[int, int, bool]] = {
    aten.batch_norm.default: (6, 7, False),
    aten.native_batch_norm.default: (6, 7, True),
    aten._native_batch_norm_legit.default: (6, 7, True),
    aten._native_batch_norm_legit_no_training.default: (5, 6, True),
}


class ExportedBatchNorm(_BatchNorm):
    """A BatchNorm module over tensors owned by an exported graph; any input rank."""

    original_type: str = "BatchNorm (exported)"
    """The eager class the export traced (``BatchNorm2d``)."""
    baked_training: Optional[bool] = None
    """The ``training`` flag the export baked into the call: True when exported from a model in
    train mode, so the program normalizes with batch statistics for good (the routing through
    this module would hide that, so it is kept here)."""

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _baked_training(node: Any) -> Optional[bool]:
    """The ``training`` flag an exported BN call carries (None: not a constant)."""
    if node.target is aten._native_batch_norm_legit_no_training.default:
        return False
    if node.target is aten._native_batch_norm_legit.default:
        return True
    value = node.args[5] if len(node.args) > 5 else None  # batch_norm / native_batch_norm
    return value if isinstance(value, bool) else None


def _attr_name(node: Any) -> Optional[str]:
    return node.target if getattr(node, "op", None) == "get_attr" else None


class ExportedRuntime(Runtime):
    kind = "exported"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return isinstance(model, ExportedProgramModule)

    @classmethod
    def layer_of(cls, name: str, module: nn.Module, frozen_by: Optional[str]) -> Optional[BNLayer]:
        if not isinstance(module, ExportedBatchNorm):
            return None
        return batchnorm_layer(name, module, module.original_type, traced_training=module.baked_training)

    @classmethod
    def opaque(cls, module: nn.Module) -> tuple[str, ...]:
        return ("exported_graph",) if isinstance(module, ExportedProgramModule) else ()


def load_program(path: Path) -> tuple[Any, nn.Module]:
    """``torch.export.load`` (callers inspect the archive first) and the wrapper that runs it."""
    with warnings.catch_warnings(), _quiet_logger("torch.export"):
        warnings.simplefilter("ignore")
        program = torch.export.load(str(path))
        return program, ExportedProgramModule(program.module(), getattr(program, "example_inputs", None))


def save_program(program: Any, module: nn.Module, path: Path, buffer_names: tuple[str, ...]) -> None:
    """Save ``program`` with the BN buffers (``buffer_names``) the wrapper ``module`` now holds."""
    live = dict(module.exported_graph.named_buffers())
    with torch.no_grad():
        for store in (program.state_dict, program.constants):
            for key, tensor in store.items():
                if key.rsplit(".", 1)[-1] in buffer_names and key in live and live[key] is not tensor:
                    tensor.copy_(live[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(program, str(path))


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a library logger that prints tracebacks of errors reported in one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class ExportedProgramModule(nn.Module):
    """Callable like the exported program; BN layers are ``ExportedBatchNorm`` submodules."""

    def __init__(self, graph_module: nn.Module, example_inputs: Any = None) -> None:
        super().__init__()
        self.exported_graph = graph_module
        self.example_inputs = example_inputs
        self._bn_for_node: dict[Any, ExportedBatchNorm] = {}
        for node in graph_module.graph.nodes:
            spec = _BN_OPS.get(node.target) if node.op == "call_function" else None
            if spec is not None:
                self._bn_for_node[node] = self._make_bn(graph_module, node, spec)

    def _make_bn(self, gm: nn.Module, node: Any, spec: tuple) -> ExportedBatchNorm:
        momentum_at, eps_at, _ = spec
        args = list(node.args)
        names = [_attr_name(a) for a in args[1:5]]  # weight, bias, running_mean, running_var
        weight, bias, running_mean, running_var = (_fetch(gm, n) for n in names)
        reference = running_mean if running_mean is not None else weight
        channels = int(reference.numel()) if reference is not None else 0
        momentum = args[momentum_at] if len(args) > momentum_at else 0.1
        eps = args[eps_at] if len(args) > eps_at else 1e-5
        bn = ExportedBatchNorm(
            channels, eps=float(eps), momentum=float(momentum) if momentum is not None else None,
            affine=weight is not None, track_running_stats=running_mean is not None,
        )
        if weight is not None:
            bn.weight = _as_parameter(weight)
            bn.bias = _as_parameter(bias) if bias is not None else None
        if running_mean is not None:
            bn.running_mean, bn.running_var = running_mean, running_var
            prefix = names[2].rsplit(".", 1)[0] if "." in names[2] else ""
            tracked = _fetch(gm, f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked")
            if tracked is not None:
                bn.num_batches_tracked = tracked
        bn.eval()
        bn.original_type = _original_type(node)
        bn.baked_training = _baked_training(node)
        layer_name = next((n.rsplit(".", 1)[0] for n in (names[2], names[0]) if n and "." in n), None)
        self._attach(layer_name or str(node.name), bn)
        return bn

    def _attach(self, dotted: str, module: nn.Module) -> None:
        parent: nn.Module = self
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        name = parts[-1]
        while name in parent._modules or name in ("exported_graph", "example_inputs"):
            name += "_"
        parent.add_module(name, module)

    def train(self, mode: bool = True) -> ExportedProgramModule:
        """Exported graphs refuse ``.train()``; only the BN wrappers switch."""
        self.training = mode
        for bn in self._bn_for_node.values():
            bn.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _Interpreter(self.exported_graph, self._bn_for_node).run(*args, **kwargs)


def _original_type(node: Any) -> str:
    """The eager class the export traced (``BatchNorm2d``), from the node's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        _, type_ref = list(stack.values())[-1]
        name = type_ref if isinstance(type_ref, str) else getattr(type_ref, "__qualname__", "")
        if name:
            return name.rsplit(".", 1)[-1]
    return "BatchNorm (exported)"


def _fetch(gm: nn.Module, name: Optional[str]) -> Optional[Tensor]:
    if not name:
        return None
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, Tensor) else None


def _as_parameter(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class _Interpreter(torch.fx.Interpreter):
    def __init__(self, gm: nn.Module, bn_for_node: dict) -> None:
        super().__init__(gm)
        self._bn_for_node = bn_for_node

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError("exported programs are called with positional inputs here")
        return super().run(*args)

    def run_node(self, n: Any) -> Any:
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            return None  # shape guards of the export; a failing shape fails in the ops instead
        bn = self._bn_for_node.get(n)
        if bn is None:
            return super().run_node(n)
        with self._set_current_node(n):
            args, _ = self.fetch_args_kwargs_from_env(n)
        out = bn(args[0])
        if _BN_OPS[n.target][2]:  # the op's (out, save_mean, save_rstd); consumers read [0]
            empty = out.new_empty(0)
            return out, empty, empty
        return out

