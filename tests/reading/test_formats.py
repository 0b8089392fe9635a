"""Every checkpoint format reads into one ``Checkpoint`` and writes itself back: new BN buffers
in, everything else as it was read."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ROOT, TinyNet
from torch import nn

from bncheck.reading.checkpoint import open_checkpoint
from bncheck.runtime import find_bn_layers

ARCH = f"{ROOT / 'tests' / 'conftest.py'}:TinyNet"


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for layer in find_bn_layers(module):
        for name in ("running_mean", "running_var"):
            out[f"{layer.name}.{name}"] = layer.buffer(name).detach().clone()
    return out


def nudge(module: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for layer in find_bn_layers(module):
            layer.running_mean.add_(0.25)
            layer.running_var.mul_(2.0)
    return bn_state(module)


def write_source(kind: str, path, model: nn.Module) -> dict:
    example = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "state_dict":
            torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
        elif kind == "safetensors":
            from safetensors.torch import save_file

            save_file(model.state_dict(), str(path), metadata={"note": "kept"})
        elif kind == "torchscript":
            torch.jit.save(torch.jit.script(model), str(path))
        elif kind == "exported-program":
            torch.export.save(torch.export.export(model, (example,)), str(path))
        elif kind == "pickled-module":
            torch.save(model, path)
    return {"arch": ARCH} if kind in ("state_dict", "safetensors") else {}


@pytest.mark.parametrize("kind,suffix", [("state_dict", ".pt"), ("safetensors", ".safetensors"),
                                         ("torchscript", ".pt"), ("exported-program", ".pt2"),
                                         ("pickled-module", ".pt")])
def test_each_format_round_trips_new_batchnorm_buffers(kind, suffix, tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    source = tmp_path / f"model{suffix}"
    extra = write_source(kind, source, model)
    raw = source.read_bytes()
    checkpoint = open_checkpoint(source, extra.get("arch"), trust_checkpoint=True)
    assert checkpoint.format == kind
    others = {k: v.clone() for k, v in checkpoint.module.state_dict().items() if "running" not in k}
    wanted = nudge(checkpoint.module)
    out = tmp_path / f"fixed{suffix}"
    checkpoint.write(out)
    assert source.read_bytes() == raw  # the input is never touched
    again = open_checkpoint(out, extra.get("arch"), trust_checkpoint=True)
    assert again.format == kind
    got = bn_state(again.module)
    assert set(got) == set(wanted)
    assert all(torch.allclose(got[k], wanted[k]) for k in wanted)
    state = again.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in others.items() if k in state)
    if kind == "state_dict":
        container = torch.load(out, weights_only=True)
        assert container["epoch"] == 3 and all(k.startswith("module.") for k in container["state_dict"])
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as reader:
            assert reader.metadata() == {"note": "kept"}
