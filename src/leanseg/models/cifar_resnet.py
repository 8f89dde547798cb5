"""ResNet-18 for CIFAR-10 classification, the ACoSP image-classification model (acosp.md 10).

torchvision's ResNet-18 with the 7x7 s2 stem conv replaced by a 3x3 s1 conv and no maxpool,
so 32x32 images reach layer4 at 4x4; then global average pooling and ``fc`` to K classes.
Returns ``{"out": logits (N, K)}``; ``backbone`` is the ResNet (keys ``backbone.conv1`` ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from leanseg.models.backbones import resnet
from leanseg.models.layers import ConvLayer, NormLayer, norm_layers
from leanseg.models.registry import register_builder


class CifarResNet(nn.Module):
    """ResNet backbone with a CIFAR stem -> global average pool -> linear classifier ``fc``."""

    def __init__(
        self,
        num_classes: int,
        width_mult: float = 1.0,
        norm_layer: NormLayer | None = None,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.backbone = resnet(
            "resnet18",
            norm_layer=norm_layer,
            conv_layer=conv_layer,
            width_mult=width_mult,
            stem="cifar",
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)["out"]
        return {"out": self.fc(torch.flatten(self.avgpool(features), 1))}


def _build(*, num_classes: int, norm: str, width_mult: float) -> CifarResNet:
    return CifarResNet(num_classes, width_mult, **norm_layers(norm))


_OPTIONS: dict[str, Any] = {"norm": "bn", "width_mult": 1.0}
register_builder(
    "resnet18_cifar", _build, _OPTIONS, "ResNet-18 for 32x32 CIFAR images (3x3 stem, no maxpool)."
)
