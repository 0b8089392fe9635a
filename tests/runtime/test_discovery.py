"""Which modules are BN layers, and the facts each runtime kind resolves for them once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from bncheck.runtime import BUFFERS, HOOKS, ScriptedRuntime, find_bn_layers, runtime_for
from bncheck.runtime.exported import load_program


class OwnForward(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # e.g. ghost BN: chunks its input
        return torch.cat([super(OwnForward, self).forward(c) for c in x.chunk(2)])


class FusedQat(nn.Module):
    """What torch.ao's ConvBn modules look like after ``freeze_bn_stats``."""

    def __init__(self) -> None:
        super().__init__()
        self.freeze_bn = True
        self.bn = nn.BatchNorm2d(3)


def traced(module: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, example)


def test_eager_layers_kinds_momentum_and_native_statistics() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(4, momentum=None), nn.BatchNorm3d(4, momentum=0.0), nn.SyncBatchNorm(4, momentum=0.3),
        OwnForward(4), torchvision.ops.FrozenBatchNorm2d(4), FusedQat(), nn.Linear(4, 4),
    )
    layers = {layer.name: layer for layer in find_bn_layers(model)}
    assert list(layers) == ["0", "1", "2", "3", "4", "5.bn"]
    assert [layers[n].kind for n in layers] == ["batchnorm"] * 4 + ["frozen", "batchnorm"]
    assert [layers[n].momentum for n in ("0", "1", "2", "3")] == [None, 0.0, 0.3, 0.1]
    assert {layer.access for layer in layers.values()} == {HOOKS}
    # BN's own forward keeps batch statistics in its buffers at momentum 1; SyncBatchNorm (every
    # rank's batch) and a forward of its own (chunks) do not
    assert [layers[n].native for n in ("0", "1", "2", "3")] == [True, True, False, False]
    assert layers["4"].type_name == "FrozenBatchNorm2d"
    assert layers["5.bn"].frozen_by == "5" and layers["0"].frozen_by is None


def test_torchscript_facts_come_from_the_graph_when_the_module_has_none() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01)).eval()
    x = torch.randn(4, 3, 5, 5)
    trace_eval = find_bn_layers(traced(model, x))[0]
    assert (trace_eval.name, trace_eval.type_name, trace_eval.access) == ("1", "BatchNorm2d", BUFFERS)
    assert (trace_eval.momentum, trace_eval.momentum_from, trace_eval.traced_training) == (0.01, "graph", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = find_bn_layers(torch.jit.script(model))[0]
    assert (scripted.momentum, scripted.momentum_from, scripted.traced_training) == (0.01, "module", None)
    train_model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert find_bn_layers(traced(train_model, x))[0].traced_training is True


def test_a_twin_measures_stuck_torchscript_layers_and_keeps_their_saved_facts() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.0), nn.BatchNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    runtime = runtime_for(scripted)
    assert isinstance(runtime, ScriptedRuntime)
    code = dict(scripted.named_modules())["1"].code
    twin = runtime.measuring()
    assert twin.model is not scripted and twin.caller is scripted
    stuck, moving = twin.layers[0], twin.layers[1]
    assert (stuck.momentum, stuck.applied_momentum, stuck.update_momentum) == (0.0, 1.0, 1.0)
    assert (moving.momentum, moving.applied_momentum) == (0.1, None)
    assert stuck.module is not runtime.layers[0].module
    assert dict(scripted.named_modules())["1"].code == code  # the caller's graph is never edited


def test_mixed_models_measure_each_layer_its_own_way() -> None:
    inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), traced(inner, torch.randn(2, 4, 3, 3)))
    layers = find_bn_layers(model)
    assert [(layer.name, layer.access) for layer in layers] == [("1", HOOKS), ("2.1", BUFFERS)]


@pytest.mark.parametrize("train", [False, True])
def test_exported_programs_name_layers_after_the_eager_model(train, tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.2), nn.ReLU(), nn.BatchNorm2d(4))
    model.train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (torch.randn(2, 3, 4, 4),)), str(tmp_path / "m.pt2"))
    _, wrapper = load_program(tmp_path / "m.pt2")
    runtime = runtime_for(wrapper)
    assert runtime.kind == "exported"
    assert [(layer.name, layer.type_name, layer.access) for layer in runtime.layers] == [
        ("1", "BatchNorm2d", HOOKS), ("3", "BatchNorm2d", HOOKS)]
    assert [layer.traced_training for layer in runtime.layers] == [train, train]
    assert runtime.layers[0].momentum == pytest.approx(0.2)
    assert not any(name.startswith("exported_graph") for name in (layer.name for layer in runtime.layers))


def test_a_torchscript_module_with_running_buffers_that_is_not_batchnorm_is_no_layer() -> None:
    class TwoCalls(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + super().forward(x * 2)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), TwoCalls(4)).eval()
    assert [layer.kind for layer in find_bn_layers(model)] == ["batchnorm"]
    scripted = traced(model, torch.randn(2, 3, 4, 4))  # two batch_norm calls: not read as one layer
    assert find_bn_layers(scripted) == []
