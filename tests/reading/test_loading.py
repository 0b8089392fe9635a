"""Checkpoint layouts and data formats that load, and what they load into."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES, TinyNet, calibrate, make_batches

from bncheck.cli import cli
from bncheck.config import load_settings
from bncheck.engine import analyze
from bncheck.errors import InputError
from bncheck.reading.checkpoint import open_checkpoint as load_model
from bncheck.reading.data import open_data


@pytest.fixture
def stale_tiny() -> TinyNet:
    torch.manual_seed(0)
    model = calibrate(TinyNet(), make_batches(8, seed=123))
    with torch.no_grad():
        model.bn2.running_mean += 3 * model.bn2.running_var.sqrt()
    return model


@pytest.fixture
def arch(tmp_path, monkeypatch) -> str:
    (tmp_path / "tinyarch.py").write_text("from conftest import TinyNet\n\ndef build():\n    return TinyNet()\n")
    return f"{tmp_path}/tinyarch.py:build"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},  # Lightning
        lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        lambda sd: {"ema": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
        lambda sd: {"net": sd, "meta": {"note": "x"}},
        # a training checkpoint with a teacher beside the student: the student's prefix wins
        lambda sd: {"state_dict": {**{f"student.{k}": v for k, v in sd.items()},
                                   **{f"teacher.{k}": torch.zeros_like(v) for k, v in sd.items()},
                                   "loss.weight": torch.ones(3)}},
    ],
    ids=["plain", "lightning", "ddp", "compiled-ema", "net", "student-teacher"],
)
def test_state_dict_layouts(tmp_path, stale_tiny, arch, wrap) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(stale_tiny.state_dict()), path)
    loaded = load_model(path, arch)
    assert loaded.info.format == "state_dict" and len(loaded.info.sha256) == 64
    for key, value in stale_tiny.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert not loaded.module.training


def test_checkpoint_without_num_batches_tracked(tmp_path, stale_tiny, arch) -> None:
    state = {k: v for k, v in stale_tiny.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", arch)
    assert torch.equal(loaded.module.bn2.running_mean, stale_tiny.bn2.running_mean)
    report = analyze(loaded.module, make_batches())
    assert report.layers[0].name == "bn2"
    # a zero counter with real statistics is noted, not called never-updated
    assert not any(f.code == "never-updated" for f in report.findings)
    assert {f.severity for f in report.findings if f.code == "counter-reset"} == {"info"}
    assert ("stale-running-stats", "bn2") in {(f.code, f.layer) for f in report.findings}


def test_safetensors_checkpoint(tmp_path, stale_tiny, arch) -> None:
    from safetensors.torch import save_file

    save_file(stale_tiny.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model(tmp_path / "w.safetensors", arch)
    report = analyze(loaded.module, make_batches())
    assert report.layers[0].name == "bn2"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_exported_program_runs_both_modes(tmp_path, stale_tiny) -> None:
    program = torch.export.export(stale_tiny, (torch.randn(16, 3, 12, 12),))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.info.format == "exported-program"
    report = analyze(loaded.module, make_batches())
    eager = analyze(stale_tiny, make_batches())
    assert [layer.name for layer in report.layers] == [layer.name for layer in eager.layers]
    assert report.layers[0].type == "BatchNorm2d"
    for a, b in zip(report.layers, eager.layers):
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-6)
    # buffers shared with the graph are untouched
    graph_buffers = dict(loaded.module.exported_graph.named_buffers())
    assert torch.equal(graph_buffers["bn2.running_mean"], stale_tiny.bn2.running_mean)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_exported_program_with_baked_batch_size_says_so(tmp_path) -> None:
    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet()

        def forward(self, x):
            return self.net(x).view(16, -1)

    torch.export.save(torch.export.export(Flat().eval(), (torch.randn(16, 3, 12, 12),)), tmp_path / "f.pt2")
    loaded = load_model(tmp_path / "f.pt2")
    with pytest.raises(InputError, match=r"exported with input shape \(16, 3, 12, 12\).*batch_size=16"):
        analyze(loaded.module, [torch.randn(8, 3, 12, 12)] * 2)


def test_npz_with_key_and_labels(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(8, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=x, other=x * 2, labels=np.arange(8) % 5)
    cfg = load_settings().data
    source = open_data(tmp_path / "d.npz", cfg, 4, 4)  # picks "images" by name
    batches = list(source.batches())
    assert len(batches) == 2 and torch.equal(batches[0][0], torch.from_numpy(x[:4]))
    assert batches[0][1].tolist() == [0, 1, 2, 3]
    keyed = list(open_data(tmp_path / f"{'d.npz'}:other", cfg, 4, 1).batches())
    assert torch.equal(keyed[0][0], torch.from_numpy(x[:4] * 2))
    with pytest.raises(InputError, match="holds arrays"):
        open_data(tmp_path / "d.npz:missing", cfg, 4, 1)


def test_pt_tensor_file_with_labels_gives_accuracy(tmp_path, stale_tiny, arch) -> None:
    x = torch.cat(make_batches())
    torch.save({"inputs": x, "labels": stale_tiny(x).argmax(1)}, tmp_path / "d.pt")
    torch.save(stale_tiny.state_dict(), tmp_path / "m.pt")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "m.pt"), "--arch", arch, "--data", str(tmp_path / "d.pt"),
                                      "--batch-size", "16", "--json", "-", "-q", "--save", str(tmp_path / "r.json")])
    doc = json.loads(result.stdout)
    assert doc["data"]["labels"] is True and doc["output"]["eval_accuracy"] == 1.0
    # this untrained net predicts one class in both modes: equal accuracies cannot tell stale
    # statistics from BN kept on purpose, so bn2 stays stale (bn-frozen-in-eval needs eval mode
    # strictly better: tests/test_never_silent.py)
    assert doc["output"]["train_accuracy"] == 1.0
    assert doc["layers"][0]["name"] == "bn2" and result.exit_code == 1
    assert doc["layers"][0]["findings"][0]["code"] == "stale-running-stats"
    # (labels that make eval mode the worse mode keep stale-running-stats: test_diagnosis, pseudo-frozen)


def test_image_sample_is_deterministic_and_seeded() -> None:
    cfg = load_settings(overrides={"data": {"resize": None, "crop": None}}).data
    first = [b[1].tolist() for b in open_data(SAMPLES / "data", cfg, 8, 2).batches()]
    again = [b[1].tolist() for b in open_data(SAMPLES / "data", cfg, 8, 2).batches()]
    assert first == again and len(set(first[0])) > 1  # mixed classes, same order
    other = load_settings(overrides={"data": {"resize": None, "crop": None, "seed": 7}}).data
    assert [b[1].tolist() for b in open_data(SAMPLES / "data", other, 8, 2).batches()] != first


def test_timm_without_timm_is_a_clear_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(InputError, match="pip install timm"):
        load_model(None, "timm:resnet18")


def test_timm_models_and_their_bn_variants() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    from bncheck.runtime import find_bn_layers

    loaded = load_model(None, "timm:efficientnet_b0", {"num_classes": 4})
    model = loaded.module
    layers = find_bn_layers(model)
    assert len(layers) == 49 and {(la.type_name, la.kind) for la in layers} == {("BatchNormAct2d", "batchnorm")}
    calibrate(model, [torch.randn(8, 3, 32, 32) for _ in range(4)])
    with torch.no_grad():
        model.bn1.running_mean += 3 * model.bn1.running_var.sqrt()
    report = analyze(model, [torch.randn(8, 3, 32, 32) for _ in range(3)])
    assert report.layers[0].name == "bn1" and report.verdict == "fail"
    frozen = freeze_batch_norm_2d(timm.create_model("resnet18", pretrained=False, num_classes=4))
    assert {(la.type_name, la.kind) for la in find_bn_layers(frozen)} == {("FrozenBatchNorm2d", "frozen")}
    with pytest.raises(InputError, match="did you mean timm:resnet18"):
        load_model(None, "timm:resnet19")
