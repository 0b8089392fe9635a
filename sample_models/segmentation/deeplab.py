"""The segmentation sample's architecture: torchvision's ``DeepLabV3`` (an ASPP head on a
dilated backbone, as ``deeplabv3_resnet50`` builds it) made small enough to train on two CPU
cores in a minute: the first nine blocks of a dilated MobileNetV3-Small as the backbone
(output stride 16) and a 64-channel ASPP head. Use it as ``--arch
sample_models/segmentation/deeplab.py:build``."""

from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3


class Backbone(nn.Module):
    """The dilated MobileNetV3-Small's blocks 0-8 (48 channels at stride 16), returning what
    torchvision's segmentation models expect: ``{"out": features}``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.mobilenet_v3_small(weights=None, dilated=True).features[:9]

    def forward(self, x):
        return OrderedDict(out=self.features(x))


def build(num_classes: int = 3) -> DeepLabV3:
    head = nn.Sequential(
        ASPP(48, [6, 12, 18], out_channels=64),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, num_classes, 1),
    )
    return DeepLabV3(Backbone(), head)
