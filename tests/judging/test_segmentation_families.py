"""Segmentation models of four families, trained briefly the way their libraries show
(issue 28, done-when): torchvision (LR-ASPP, ``{'out'}``), segmentation_models_pytorch (a
U-Net with 3 classes, and a binary one with float ``[N, 1, H, W]`` masks as smp's losses take
them), Hugging Face (MobileViT: BatchNorm2d, logits at reduced resolution) and MONAI (a 3-D
U-Net with BatchNorm3d on ``{"image", "label"}`` dict batches). Each: the report speaks in
pixels and mIoU; its running statistics settled with ``update_bn`` it is not failed on the
data it learned; on the same scenes darker and flatter -- a change train mode's batch statistics
absorb and eval mode's running statistics do not -- the mIoU gap is beyond chance and never
passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bncheck

SIZE = 64


def scenes(n: int, seed: int, dims: int = 2, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Discs (class 1) and boxes (class 2) on noise: images ``[n, 3, size, size]`` (a volume:
    ``[n, 1, size, size, size]``) and masks of class indices."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij"))
    masks = torch.zeros(n, *[size] * dims, dtype=torch.long)
    for i in range(n):
        for cls in (1, 2):
            centre = torch.rand(dims, 1, generator=g) * (size * 0.6) + size * 0.2
            radius = float(torch.rand(1, generator=g)) * size * 0.12 + size * 0.1
            offset = (grid.reshape(dims, -1) - centre).reshape(dims, *[size] * dims)
            inside = offset.pow(2).sum(0).sqrt() < radius if cls == 1 else (offset.abs() < radius).all(0)
            masks[i][inside] = cls
    channels = 3 if dims == 2 else 1
    x = torch.randn(n, channels, *[size] * dims, generator=g) * 0.3
    x += (masks == 1).unsqueeze(1).float() * 1.5 - (masks == 2).unsqueeze(1).float() * 1.5
    if channels == 3:
        x[:, 1] += (masks == 2).float() * 1.0
    return x, masks


def darker(x: torch.Tensor) -> torch.Tensor:
    """The same scenes darker and flatter, the same change on every channel."""
    return x * 0.4 - 1.2


def logits(output) -> torch.Tensor:
    if hasattr(output, "logits"):  # a Hugging Face model output (dict-like too)
        return output.logits
    if isinstance(output, dict):
        return output["out"]
    return output


def train(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, steps: int, batch: int = 8,
          binary: bool = False) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        out = logits(model(x[idx]))
        target = masks[idx]
        if out.shape[2:] != target.shape[1:]:
            mode = "bilinear" if out.dim() == 4 else "trilinear"
            out = nn.functional.interpolate(out, size=target.shape[1:], mode=mode, align_corners=False)
        if binary:
            loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], (target > 0).float())
        else:
            loss = nn.functional.cross_entropy(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # settle the running statistics on the training data, as torch.optim.swa_utils.update_bn does
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for start in range(0, len(x), batch):
            model(x[start:start + batch])
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


def torchvision_lraspp() -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3)


def smp_unet(classes: int = 3) -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, classes=classes, decoder_channels=(64, 32, 16, 16, 8))


def hf_upernet() -> nn.Module:
    """UperNet on a Hugging Face ResNet backbone, both from transformers' own classes (BN in
    the backbone and in the head); its logits come back as a ``SemanticSegmenterOutput``."""
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                         out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.UperNetConfig(backbone_config=backbone, num_labels=3, hidden_size=32,
                                        use_auxiliary_head=False)
    return transformers.UperNetForSemanticSegmentation(config)


def monai_unet() -> nn.Module:
    monai = pytest.importorskip("monai")
    return monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32),
                                    strides=(2, 2), num_res_units=1, norm="batch")


FAMILIES = {"torchvision": (torchvision_lraspp, 40), "smp": (smp_unet, 40), "huggingface": (hf_upernet, 40)}


def miou(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, classes: int = 3) -> float:
    with torch.no_grad():
        out = logits(model.eval()(x))
    if out.shape[2:] != masks.shape[1:]:
        out = nn.functional.interpolate(out, size=masks.shape[1:], mode="bilinear", align_corners=False)
    predicted = out.argmax(1)
    ious = [((predicted == c) & (masks == c)).sum().item() / ((predicted == c) | (masks == c)).sum().item()
            for c in range(classes) if ((predicted == c) | (masks == c)).any()]
    return sum(ious) / len(ious)


def judged(model: nn.Module, batches: list) -> bncheck.Report:
    report = bncheck.analyze(model, batches, batch_size=8, attribute=0)
    assert report.output.per == "pixel" and report.output.eval_miou is not None
    return report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_segmentation_family_speaks_in_mIoU_and_a_gap_never_passes(family: str) -> None:
    build, steps = FAMILIES[family]
    x, masks = scenes(64, 1)
    model = train(build(), x, masks, steps)
    test_x, test_masks = scenes(32, 2)
    healthy = judged(model, [(test_x[i:i + 8], test_masks[i:i + 8]) for i in range(0, 32, 8)])
    assert healthy.output.train_miou > 0.5, healthy.output  # it learned something
    assert healthy.output.eval_miou == pytest.approx(miou(model, test_x, test_masks), abs=1e-6)
    assert not any(f.code == "accuracy-gap" for f in healthy.findings)
    shifted = judged(model, [(darker(test_x[i:i + 8]), test_masks[i:i + 8]) for i in range(0, 32, 8)])
    out = shifted.output
    assert out.train_miou - out.eval_miou > 0.1, out
    assert out.accuracy_gap_p < 0.01 and shifted.verdict == "fail"
    assert any(f.code == "accuracy-gap" and "mIoU" in f.message for f in shifted.findings)
    assert shifted.pictures and shifted.pictures[0].truth is not None


def test_smp_binary_masks_as_float_channels() -> None:
    """smp with classes=1 and masks ``[N, 1, H, W]`` float, as its Dice/BCE losses take them."""
    x, masks = scenes(64, 3)
    model = train(smp_unet(classes=1), x, masks, 40, binary=True)
    test_x, test_masks = scenes(32, 4)
    fg = (test_masks > 0).float().unsqueeze(1)
    batches = [(darker(test_x[i:i + 8]), fg[i:i + 8]) for i in range(0, 32, 8)]
    report = judged(model, batches)
    out = report.output
    assert out.binary and out.classes == 2 and out.labeled == 32
    with torch.no_grad():
        predicted = (model.eval()(darker(test_x))[:, 0] > 0).long()
    truth = fg[:, 0].long()
    ious = [((predicted == c) & (truth == c)).sum().item() / ((predicted == c) | (truth == c)).sum().item()
            for c in (0, 1)]
    assert out.eval_miou == pytest.approx(sum(ious) / 2, abs=1e-9)
    assert report.verdict == "fail" and out.train_miou > out.eval_miou


def test_monai_3d_unet_on_dict_batches() -> None:
    x, masks = scenes(24, 5, dims=3, size=16)
    model = train(monai_unet(), x, masks, 40, batch=4)
    test_x, test_masks = scenes(16, 6, dims=3, size=16)
    label = test_masks.unsqueeze(1).float()  # MONAI's label: [N, 1, D, H, W], float
    healthy = judged(model, [{"image": test_x[i:i + 4], "label": label[i:i + 4]} for i in range(0, 16, 4)])
    assert healthy.output.train_miou > 0.5 and not any(f.code == "accuracy-gap" for f in healthy.findings)
    assert healthy.layers[0].type == "BatchNorm3d"
    shifted = judged(model, [{"image": darker(test_x[i:i + 4]), "label": label[i:i + 4]} for i in range(0, 16, 4)])
    assert shifted.verdict == "fail" and shifted.output.train_miou - shifted.output.eval_miou > 0.1
    assert math.isfinite(shifted.output.accuracy_gap_p) and shifted.output.accuracy_gap_p < 0.05
    assert shifted.pictures[0].image is not None  # the volume's middle slice
