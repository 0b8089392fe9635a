"""One contract over every kind of runnable model: the same weights and data through an eager
module, TorchScript (scripted, traced after ``.eval()``, traced in train mode) and a
``torch.export`` program (exported after ``.eval()`` and in train mode) give the same layers,
scores and findings as the eager model -- or, where the kind changes what the model computes
(``training`` frozen in), the finding documented for it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.runtime import BUFFERS, HOOKS, runtime_for
from bncheck.runtime.exported import load_program

HOOK_KINDS = ["eager", "exported"]
BUFFER_KINDS = ["scripted", "traced-eval"]
TRAIN_BAKED = ["traced-train", "exported-train"]


def stale_model() -> nn.Module:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(8, seed=123))
    with torch.no_grad():
        model.bn2.running_mean += 2 * model.bn2.running_var.sqrt()  # one stale layer
    model.drop.p = 0.0  # a trace in train mode bakes dropout in: keep outputs comparable
    return model.eval()


def as_kind(kind: str, model: nn.Module, example: torch.Tensor, tmp_path) -> nn.Module:
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "eager":
            return model
        if kind == "scripted":
            return torch.jit.script(model)
        if kind == "traced-eval":
            return torch.jit.trace(model.eval(), example)
        if kind == "traced-train":
            return torch.jit.trace(model.train(), example)
        program = torch.export.export(model.train() if kind == "exported-train" else model.eval(), (example,))
        torch.export.save(program, str(tmp_path / "model.pt2"))
        return load_program(tmp_path / "model.pt2")[1]


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, list[torch.Tensor], bncheck.Report]:
    model, data = stale_model(), make_batches()
    return model, data, bncheck.analyze(model, data)


def by_layer(report: bncheck.Report) -> dict[str, tuple[float, tuple[str, ...]]]:
    return {layer.name: (layer.score, tuple(sorted(f.code for f in layer.findings))) for layer in report.layers}


@pytest.mark.parametrize("kind", HOOK_KINDS + BUFFER_KINDS + TRAIN_BAKED)
def test_every_runtime_kind_keeps_the_contract(kind, reference, tmp_path) -> None:
    model, data, eager = reference
    runnable = as_kind(kind, model, data[0], tmp_path)
    runtime = runtime_for(runnable)
    assert [layer.name for layer in runtime.layers] == ["bn1", "bn2", "bn3"]
    assert {layer.type_name for layer in runtime.layers} == {"BatchNorm2d"}
    assert {layer.access for layer in runtime.layers} == {BUFFERS if kind.startswith(("scripted", "traced")) else HOOKS}
    state = {k: v.clone() for k, v in runnable.state_dict().items()}
    report = bncheck.analyze(runnable, data)
    assert all(torch.equal(v, state[k]) for k, v in runnable.state_dict().items())  # the caller's model untouched
    got, want = by_layer(report), by_layer(eager)
    assert set(got) == set(want)
    if kind in TRAIN_BAKED:
        # batch statistics in every mode: the running statistics never touch an output
        assert all(codes == ("traced-in-train-mode",) for _, codes in got.values())
        assert report.verdict == "fail"
        return
    assert report.verdict == eager.verdict == "fail"
    assert [(f.code, f.layer) for f in report.findings] == [(f.code, f.layer) for f in eager.findings]
    # hooks see the very inputs the eager model's layers see; buffer updates carry each batch's
    # unbiased variance (n/(n-1) with n = 16 x 12 x 12 values) and no per-sample spread, so the
    # scores agree to a fraction of a percent there (documented in README's runtime section)
    tolerance = 1e-4 if kind in HOOK_KINDS else 1e-2
    for name, (score, codes) in got.items():
        assert score == pytest.approx(want[name][0], rel=tolerance), name
        assert codes == want[name][1], name


def test_a_new_kind_sees_the_same_interface(reference) -> None:
    """What every stage relies on, for every kind: layers with resolved facts, observation, a
    measuring runtime, and where results go back."""
    model, data, _ = reference
    for kind in ("eager", "scripted", "traced-eval"):
        runtime = runtime_for(as_kind(kind, model, data[0], None))
        measuring = runtime.measuring()
        assert measuring.caller is runtime.model
        assert set(measuring.caller_buffers()) == set(dict(runtime.model.named_buffers()))
        assert [layer.momentum for layer in measuring.layers] == [0.1, 0.1, 0.1]
