"""Zoo sweep (``make test-zoo``): every torchvision classification builder that has BN layers,
the detection and segmentation models, video ``r3d_18`` (BatchNorm3d) and timm models with
``BatchNormAct2d``. Each is built with random weights, its BN statistics set to one batch of
data (``bncheck.recalibrate``), then diagnosed on other batches of the same distribution:
no crash, the model bit-identical afterwards, every reached layer scored, no error finding.
With ``BNCHECK_ZOO_RESULTS=path.md`` each model's overhead (analyze vs one eval-mode and one
train-mode forward per batch) is appended there as a table row.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import pytest
import torch
import torchvision

import bncheck
from bncheck.runtime import find_bn_layers, preserved_state, set_bn_train_mode

pytestmark = pytest.mark.zoo

# Models whose construction alone needs more memory or time than a 2-core CI box has.
TOO_BIG = {"regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf", "regnet_x_16gf",
           "vit_h_14", "efficientnet_b7", "efficientnet_b6", "efficientnet_v2_l", "resnext101_64x4d",
           "wide_resnet101_2", "resnet152", "resnext101_32x8d"}
DETECTION = ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"]
SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"]
TIMM = ["efficientnet_b0", "mobilenetv3_small_050", "regnety_002", "cspresnet50", "tf_mobilenetv3_small_minimal_100"]


def classification_models() -> list[str]:
    """Every classification builder, less the families without BN (transformers, ConvNeXt's
    LayerNorm, SqueezeNet, AlexNet, VGG without ``_bn``) and those too big to build here."""
    names = torchvision.models.list_models(module=torchvision.models)
    no_bn = ("vit_", "swin_", "convnext", "squeezenet", "alexnet")
    return [n for n in names if n not in TOO_BIG and not n.startswith(no_bn)
            and not (n.startswith("vgg") and not n.endswith("_bn"))]


def state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check(name: str, model: torch.nn.Module, calibrate: list, test: list, size: str) -> None:
    if not find_bn_layers(model):
        pytest.skip(f"{name} has no BN layer")
    bncheck.recalibrate(model, calibrate)
    model.eval()
    before = state(model)
    modes = [m.training for m in model.modules()]
    started = time.perf_counter()
    report = bncheck.analyze(model, test, attribute=0)
    elapsed = time.perf_counter() - started
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    assert modes == [m.training for m in model.modules()]
    reached = [la for la in report.layers if la.depth is not None]
    assert reached, f"{name}: no BN layer reached"
    assert all(la.score is not None and math.isfinite(la.score) for la in reached)
    errors = [f for f in report.findings if f.severity == "error"]
    assert not errors, (name, [(f.code, f.layer, f.message[:120]) for f in errors])
    results = os.environ.get("BNCHECK_ZOO_RESULTS")
    if results:
        layers = find_bn_layers(model)
        floor = _floor(model, layers, test)
        worst = max(la.score for la in reached)
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(f"| {name} | {len(layers)} | {size} | {floor:.2f} s | {elapsed:.2f} s | {elapsed / floor:.2f}× "
                     f"| {worst:.3f} | {report.verdict} |\n")


def _floor(model: torch.nn.Module, layers: list, test: list) -> float:
    from bncheck.measuring.batches import forward, split_batch

    started = time.perf_counter()
    with torch.no_grad(), preserved_state(model) as snapshot:
        for batch in test:
            inputs, _ = split_batch(batch)
            set_bn_train_mode(model, layers, bn_training=False)
            forward(model, inputs, "eval")
            set_bn_train_mode(model, layers, bn_training=True)
            forward(model, inputs, "train")
            snapshot.restore_buffers()
    return time.perf_counter() - started


def images(count: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("name", classification_models())
def test_classification(name) -> None:
    torch.manual_seed(0)
    size = {"inception_v3": 299, "maxvit_t": 224}.get(name, 96)  # their smallest input
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    calibrate = images(2 if size > 200 else 4, size, 1)
    check(name, model, calibrate, images(2 if size > 200 else 3, size, 2), f"8×{size}²")


def detection_batches(count: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.rand(3, 160, 200, generator=gen), torch.rand(3, 180, 160, generator=gen)] for _ in range(count)]


@pytest.mark.parametrize("name", DETECTION)
def test_detection(name) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
    check(name, model, detection_batches(3, 1), detection_batches(3, 2), "2 images")


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation(name) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3, aux_loss=None)
    check(name, model, images(3, 128, 1), images(3, 128, 2), "8×128²")


def test_video_batchnorm3d() -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(weights=None, num_classes=5)
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(4, 3, 8, 56, 56, generator=gen) for _ in range(6)]
    check("r3d_18", model, clips[:3], clips[3:], "4×8×56²")


@pytest.mark.parametrize("name", TIMM)
def test_timm_batchnormact(name) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    check(f"timm:{name}", model, images(4, 96, 1), images(3, 96, 2), "8×96²")


NATIVE = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "timm:efficientnet_b0", "r3d_18",
          "fasterrcnn_mobilenet_v3_large_320_fpn", "deeplabv3_mobilenet_v3_large"]


def _native_model(name: str) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return timm.create_model(name[5:], pretrained=False, num_classes=10), images(10, 64, 3)
    if name == "r3d_18":
        return (torchvision.models.video.r3d_18(weights=None, num_classes=5),
                [torch.randn(8, 3, 4, 32, 32, generator=gen) for _ in range(10)])
    if name in DETECTION:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
        return model, [[torch.rand(3, 128, 160, generator=gen) for _ in range(4)] for _ in range(10)]
    if name in SEGMENTATION:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3, aux_loss=None)
        return model, images(10, 64, 3)
    return torchvision.models.get_model(name, weights=None, num_classes=10), images(10, 64, 3)


@pytest.mark.parametrize("name", NATIVE)
def test_recalibration_from_bn_own_statistics_equals_the_hooks(name, monkeypatch) -> None:
    """Recalibration takes standard BN layers' own batch statistics after the first 32 samples
    (batches 5-7, 9, 10 here): across architectures, BN variants and input layouts the result
    equals the all-hooks one."""
    from bncheck.judging.metrics import ChannelMoments
    from bncheck.measuring import statistics as collect

    model, batches = _native_model(name)
    model.eval()
    native = bncheck.recalibrate(model, batches, in_place=False)
    pooled = []
    original = ChannelMoments.add_pooled
    monkeypatch.setattr(ChannelMoments, "add_pooled", lambda self, *a: (pooled.append(1), original(self, *a)))
    monkeypatch.setattr(collect, "NATIVE_SPREAD_SAMPLES", 10**9)
    hooks = bncheck.recalibrate(model, batches, in_place=False)
    assert not pooled  # the reference took no BN statistics
    monkeypatch.setattr(collect, "NATIVE_SPREAD_SAMPLES", 32)
    again = bncheck.recalibrate(model, batches, in_place=False)
    assert pooled, f"{name}: no layer used BN's own statistics"
    assert native.state.keys() == hooks.state.keys() == again.state.keys()
    worst = 0.0
    for key in native.state:
        if key.endswith("num_batches_tracked"):
            continue
        difference = (native.state[key].double() - hooks.state[key].double()).abs()
        var = hooks.state[key.replace("running_mean", "running_var")].double() + 1e-5
        scale = var.sqrt() if key.endswith("running_mean") else var  # in stds / relative variance
        worst = max(worst, float((difference / scale).max()))
    print(f"native-vs-hooks {name}: worst {worst:.2e}, {len(pooled)} pooled calls")
    assert worst < 1e-4, (name, worst)
