"""semseg's deep-stem ResNet-50/101 (``deep_base``), the PSPNet backbone (deeplab.md section 2).

The stem is three 3x3 convs (3->64 s2, 64->64, 64->128, each with BN + ReLU) and a maxpool;
the Bottleneck stages start from 128 channels. Keys follow semseg's ``resnet.py``
(``conv1/bn1/conv2/bn2/conv3/bn3``, ``layer1..4``), so semseg's ImageNet checkpoints
(``resnet50_v2.pth``, ``resnet101_v2.pth``) load by name; torchvision's do not fit (semseg#73).

Dilated stages follow semseg: *every* block's conv2 uses the stage's new rate (no first-block
exception) and every stride is 1, so at output stride 8 layer3 runs at rate 2 and layer4 at 4.
"""

from __future__ import annotations

from torch import nn

from leanseg.models.backbones.resnet import ResNet, resnet
from leanseg.models.layers import ConvLayer, NormLayer


def resnet_deep_stem(
    name: str,
    *,
    output_stride: int = 8,
    norm_layer: NormLayer | None = None,
    conv_layer: ConvLayer = nn.Conv2d,
    width_mult: float = 1.0,
) -> ResNet:
    """Build the deep-stem ``resnet50`` / ``resnet101`` at output stride 8 (PSPNet), 16 or 32."""
    return resnet(
        name,
        output_stride=output_stride,
        norm_layer=norm_layer,
        conv_layer=conv_layer,
        width_mult=width_mult,
        stem="deep",
        uniform_dilation=True,
    )
