"""``torch.export`` programs (``.pt2``): run the graph with its BN calls routed through
real BatchNorm modules, so hooks, train/eval switching and buffer restoration work as for
any other model.

``torch.export.load(f).module()`` is an FX ``GraphModule`` whose BN layers are plain
containers of buffers and whose graph calls ``aten.batch_norm`` (or the
``_native_batch_norm_legit*`` variants) with ``training`` baked in; ``.train()`` raises.
``ExportedProgramModule`` wraps it: one ``ExportedBatchNorm`` per BN call, sharing the
graph's own weight and buffer tensors, named after them (``layer1.0.bn1``), and an FX
interpreter that calls those modules instead of the baked-in op.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

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


class ExportedProgramModule(nn.Module):
    """Callable like the exported program; BN layers are ``ExportedBatchNorm`` submodules."""

    _bncheck_opaque_children = ("exported_graph",)

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
        bn.bncheck_type_name = _original_type(node)
        # exported from a model in train(): the program normalizes with batch statistics for
        # good (bncheck's routing would hide that, so it is recorded here)
        bn.bncheck_frozen_training = _baked_training(node)
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

