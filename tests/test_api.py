"""The Python API as a user reads it from help() and the README."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torchvision
from conftest import TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.testing import assert_bn_frozen, assert_no_bn_drift


@pytest.mark.parametrize("module", ["bncheck.engine", "bncheck.curing.recalibration", "bncheck.curing.freeze",
                                    "bncheck.testing", "bncheck.monitor", "bncheck.integrations.lightning"])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_names_resolve() -> None:
    for name in bncheck.__all__:
        assert getattr(bncheck, name) is not None
    assert callable(bncheck.recalibrate)  # a function, not the module of the same job


class Counting:
    """An iterable of batches that counts what was taken from it."""

    def __init__(self, batches) -> None:
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def test_num_batches_caps_a_data_loader_and_the_model_is_untouched() -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Counting(make_batches(13, batch=8))
    report = bncheck.analyze(model, data, num_batches=2)
    assert data.taken == 2 and report.data.batches == 2 and report.data.samples == 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(40, 3, 12, 12), torch.randint(0, 5, (40,))), batch_size=8
    )
    report = bncheck.analyze(model, loader, num_batches=3, device="cpu")
    assert report.data.batches == 3 and report.data.labels
    assert report.output.train_accuracy * 24 == round(report.output.train_accuracy * 24)  # a share of 24 samples


def test_a_tensor_is_cut_into_batches_and_thresholds_take_a_mapping() -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    with torch.no_grad():
        model.bn2.running_mean += 0.35 * model.bn2.running_var.sqrt()
    data = torch.cat(make_batches(4, batch=16))
    default = bncheck.analyze(model, data, batch_size=16)
    assert default.data.batches == 4 and default.verdict == "pass"  # 0.35 is below stale_error (0.5)
    strict = bncheck.analyze(model, data, batch_size=16, thresholds={"stale_error": 0.3})
    assert strict.verdict == "fail" and strict.layers[0].name == "bn2"
    assert bncheck.analyze(model, data, batch_size=16, thresholds={"stale_error": 0.3}, fail_on="never").verdict \
        == "pass"


def test_report_reads_naturally() -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    report = bncheck.analyze(model, make_batches(2))
    layer = report.layers[0]
    assert report.top_finding(layer) is None or report.top_finding(layer).layer == layer.name
    assert isinstance(report, bncheck.Report)


def test_freeze_batchnorm_survives_train_and_a_training_step() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    handle = bncheck.freeze_batchnorm(model)
    assert len(handle.layers) == 20
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    head = model.fc.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # statistics kept
    assert not torch.equal(head, model.fc.weight)  # the rest trained
    assert model.bn1.weight.grad is None
    assert_bn_frozen(model)
    handle.remove()
    model.train()
    assert model.bn1.training and model.bn1.weight.requires_grad
    with pytest.raises(AssertionError, match="not frozen"):
        assert_bn_frozen(model)


def test_freeze_batchnorm_on_timm_batchnormact() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3)
    with bncheck.freeze_batchnorm(model) as handle:
        model.train()
        model(torch.randn(2, 3, 32, 32))
        assert handle.layers and all(not m.training for m in model.modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm))
    bncheck.unfreeze_batchnorm(model)


def test_assert_no_bn_drift_lists_the_worst_layers() -> None:
    model = calibrate(TinyNet(), make_batches(8, seed=1))
    assert assert_no_bn_drift(model, make_batches(2)).verdict == "pass"
    with torch.no_grad():
        model.bn3.running_mean += 4 * model.bn3.running_var.sqrt()
    with pytest.raises(AssertionError, match=r"(?s)stale-running-stats.*bn3 \(BatchNorm2d\): score"):
        assert_no_bn_drift(model, make_batches(2))
    with pytest.raises(AssertionError, match="max_score=0.01"):
        assert_no_bn_drift(model, make_batches(2), fail_on="never", max_score=0.01)


def test_a_report_is_built_once_with_its_sources(tmp_path) -> None:
    """The engine puts where the model and the data came from into the report as it builds it
    (no in-memory placeholder patched afterwards); the data describes itself after its batches
    were read (a folder counts unreadable files while it is read)."""
    import torch
    from conftest import TinyNet, calibrate, make_batches

    import bncheck
    from bncheck.reporting.report import ModelInfo, Sources

    model = calibrate(TinyNet(), make_batches(4))
    read = []

    def batches():
        for batch in make_batches(2):
            read.append(len(batch))
            yield batch

    info = ModelInfo("model.pt", "tiny", "state_dict", "abc", 0, momentum_from="builder")
    sources = Sources(model=info, describe_data=lambda: {"source": "imgs/", "skipped": len(read),
                                                          "preprocessing": "as stored"})
    report = bncheck.analyze(model, batches(), sources=sources)
    assert report.model.checkpoint == "model.pt" and report.model.bn_layers == 3
    assert (report.data.source, report.data.skipped, report.data.samples) == ("imgs/", 2, 32)
    assert report.data.preprocessing == "as stored" and report.world_size == 1
    plain = bncheck.analyze(model, torch.cat(make_batches(2)))
    assert plain.model.format == "in-memory" and plain.data.source is None
