"""Backbones keyed like torchvision; each returns a dict of features ("low", ["aux"], "out")."""

from __future__ import annotations

from functools import partial

from torch import nn

from leanseg.errors import ConfigError
from leanseg.models.backbones.mobilenetv2 import InvertedResidual, MobileNetV2, mobilenetv2
from leanseg.models.backbones.resnet import BasicBlock, Bottleneck, ResNet, resnet
from leanseg.models.backbones.resnet_deep_stem import resnet_deep_stem

BACKBONES = {
    "resnet18": partial(resnet, "resnet18"),
    "resnet50": partial(resnet, "resnet50"),
    "resnet101": partial(resnet, "resnet101"),
    "resnet50_deep_stem": partial(resnet_deep_stem, "resnet50"),
    "resnet101_deep_stem": partial(resnet_deep_stem, "resnet101"),
    "mobilenetv2": mobilenetv2,
}


def build_backbone(name: str, **options) -> nn.Module:
    """Build a backbone by name, e.g. ``build_backbone("resnet50", output_stride=16)``."""
    if name not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**options)


__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "build_backbone",
    "mobilenetv2",
    "resnet",
    "resnet_deep_stem",
]
