"""PSPNet-50/101 as in hszhao/semseg (deeplab.md section 2).

Deep-stem ResNet at output stride 8 (layer3 rate 2, layer4 rate 4 in every block), a pyramid
pooling module with bins (1, 2, 3, 6), and semseg's heads; every resize uses
``align_corners=True``. Layout: ``backbone`` (semseg's ResNet keys), ``classifier.0`` = PPM
(``features.<i>`` = pool / 1x1 conv / norm / ReLU, as semseg's ``ppm``), ``classifier.1-5`` =
3x3 conv / norm / ReLU / Dropout2d / 1x1 to K (semseg's ``cls``), ``aux_classifier`` on layer3
(semseg's ``aux``, training only; its loss weight 0.4 is the config's ``model.aux_weight``).

Any input size works. semseg feeds (H - 1) % 8 == 0 crops (473, 713) so that the stride-8
grid aligns exactly with the ``align_corners=True`` upsampling; that is not enforced here.
Exporting to ONNX with the TorchScript exporter needs the feature size (about H / 8) to be a
multiple of every bin (6), which 473 and 713 are: ONNX has no adaptive pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.backbones import build_backbone
from leanseg.models.base import SegmentationModel, aux_head, fcn_head, resize
from leanseg.models.layers import ConvLayer, NormLayer, init_weights_, norm_layers
from leanseg.models.registry import register_builder


class PPM(nn.Module):
    """Pyramid pooling: per bin, adaptive average pool -> 1x1 conv -> norm -> ReLU -> upsample.

    The output concatenates the input with every branch: ``C + len(bins) * C // len(bins)``.
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        reduction = in_channels // len(bins)
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(bin_size),
                conv_layer(in_channels, reduction, 1, bias=False),
                norm_layer(reduction),
                nn.ReLU(inplace=True),
            )
            for bin_size in bins
        )
        self.out_channels = in_channels + reduction * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(f(x), size, True) for f in self.features], dim=1)


class PSPNet(SegmentationModel):
    """PSPNet: PPM on the last backbone stage -> 3x3 conv -> Dropout2d -> 1x1 to K."""

    align_corners = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        ppm = PPM(backbone.out_channels, bins, norm_layer, conv_layer)
        layers = (norm_layer, conv_layer)
        head = {"dropout": dropout, "dropout_layer": nn.Dropout2d}
        inter = ppm.out_channels // 8  # semseg: 4096 -> 512
        cls = fcn_head(ppm.out_channels, num_classes, *layers, inter_channels=inter, **head)
        self.classifier = nn.Sequential(ppm, *cls)
        init_weights_(self.classifier)
        # semseg's aux head: 1024 -> 256 -> K
        self.aux_classifier = aux_head(backbone, num_classes, *layers, aux, **head)

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])


def _build(
    backbone_name: str,
    *,
    num_classes: int,
    aux: bool,
    norm: str,
    width_mult: float,
    dropout: float,
) -> PSPNet:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout: got {dropout!r}; must be in [0, 1)")
    layers = norm_layers(norm)
    backbone = build_backbone(backbone_name, output_stride=8, width_mult=width_mult, **layers)
    return PSPNet(backbone, num_classes, dropout=dropout, aux=aux, **layers)


_OPTIONS: dict[str, Any] = {
    "aux": True,  # aux head on layer3, used in training only (semseg loss weight 0.4)
    "norm": "bn",  # "bn" or "gn_ws"
    "width_mult": 1.0,  # backbone width; heads follow (PPM C/4, cls 4096/8, aux 1024/4)
    "dropout": 0.1,  # Dropout2d in the cls and aux heads
}

for _depth in (50, 101):
    register_builder(
        f"pspnet{_depth}",
        partial(_build, f"resnet{_depth}_deep_stem"),
        _OPTIONS,
        f"PSPNet on semseg's deep-stem ResNet-{_depth} at output stride 8.",
    )
