"""A segmentation state_dict without --arch: the error names the torchvision builder and the
kwargs that rebuild it (aux heads need aux_loss: true), and that command loads it."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision.models.segmentation as segmentation
from click.testing import CliRunner

from bncheck.cli import cli
from bncheck.reading.architectures import guess_arch


@pytest.mark.parametrize("name, aux", [
    ("deeplabv3_mobilenet_v3_large", True), ("lraspp_mobilenet_v3_large", False), ("fcn_resnet50", True),
    ("deeplabv3_resnet50", False),
])
def test_segmentation_checkpoints_are_guessed_with_their_kwargs(name: str, aux: bool) -> None:
    kwargs = dict(weights=None, weights_backbone=None, num_classes=6)
    if name.startswith(("deeplab", "fcn")):
        kwargs["aux_loss"] = aux
    state = getattr(segmentation, name)(**kwargs).state_dict()
    guess = guess_arch(state)
    assert guess is not None and f"torchvision:{name}" in guess and "num_classes: 6" in guess
    assert ("aux_loss: true" in guess) == aux
    assert guess_arch({f"model.{k}": v for k, v in state.items()}) == guess  # a wrapper's prefix


def test_the_guessed_command_loads_the_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3,
                                                      aux_loss=True)
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    refused = CliRunner().invoke(cli, ["run", str(tmp_path / "seg.pt")])
    assert refused.exit_code == 2 and "aux_loss: true" in refused.output, refused.output
    arch = re.search(r"--arch (\S+)", refused.output).group(1)
    kwargs = re.search(r"--arch-kwargs '([^']+)'", refused.output).group(1)
    loaded = CliRunner().invoke(cli, ["run", str(tmp_path / "seg.pt"), "--arch", arch, "--arch-kwargs", kwargs])
    assert loaded.exit_code in (0, 1), loaded.output


@pytest.mark.parametrize("decoder, encoder", [
    ("Unet", "resnet34"), ("FPN", "resnet18"), ("DeepLabV3Plus", "resnet50"), ("DeepLabV3", "resnet18"),
    ("UnetPlusPlus", "resnet18"), ("PSPNet", "resnet34"), ("Linknet", "resnet18"), ("MAnet", "resnet18"),
    ("PAN", "resnet18"),
])
def test_smp_checkpoints_name_the_decoder_the_encoder_and_the_classes(decoder: str, encoder: str) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    state = getattr(smp, decoder)(encoder, encoder_weights=None, classes=4).state_dict()
    guess = guess_arch(state)
    assert guess == (f"$arch segmentation_models_pytorch:{decoder} $arch_kwargs '{{encoder_name: {encoder}, "
                     "encoder_weights: null, classes: 4}'")
    assert guess_arch({f"model.{k}": v for k, v in state.items()}) == guess  # Lightning's prefix


def test_the_smp_guess_rebuilds_the_model(tmp_path) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.save(smp.Unet("resnet18", encoder_weights=None, classes=2).state_dict(), tmp_path / "unet.pt")
    refused = CliRunner().invoke(cli, ["run", str(tmp_path / "unet.pt")])
    assert refused.exit_code == 2 and "segmentation_models_pytorch:Unet" in refused.output, refused.output
    arch = re.search(r"--arch (\S+)", refused.output).group(1)
    kwargs = re.search(r"--arch-kwargs '([^']+)'", refused.output).group(1)
    loaded = CliRunner().invoke(cli, ["run", str(tmp_path / "unet.pt"), "--arch", arch, "--arch-kwargs", kwargs])
    assert loaded.exit_code in (0, 1), loaded.output
