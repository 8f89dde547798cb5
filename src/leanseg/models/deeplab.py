"""DeepLabV3 and DeepLabV3+ (ASPP, heads, registered builders).

DeepLabV3 keeps torchvision's state-dict layout (``classifier.0`` = ASPP, ``classifier.1-3`` =
3x3 conv/BN/ReLU, ``classifier.4`` = 1x1 to K, ``aux_classifier``); DeepLabV3+ keeps VainF's
(``classifier.project`` / ``.aspp`` / ``.classifier``). See shared/methods/deeplab.md section 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.backbones import build_backbone
from leanseg.models.base import SegmentationModel, aux_head, resize
from leanseg.models.crf import DualDecompositionCRF
from leanseg.models.layers import ConvLayer, ConvNormAct, NormLayer, init_weights_, norm_layers
from leanseg.models.registry import register_builder


class ASPPPooling(nn.Sequential):
    """Image pooling branch: global average pool -> 1x1 conv -> norm -> ReLU -> upsample."""

    def __init__(
        self, in_channels: int, channels: int, norm_layer: NormLayer, conv_layer: ConvLayer
    ) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            conv_layer(in_channels, channels, 1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return resize(super().forward(x), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, one 3x3 per rate and image pooling, then a 1x1."""

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int] = (6, 12, 18),
        channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        layers = {"norm_layer": norm_layer, "conv_layer": conv_layer}
        branches: list[nn.Module] = [ConvNormAct(in_channels, channels, 1, **layers)]
        for rate in rates:
            branches.append(ConvNormAct(in_channels, channels, 3, dilation=rate, **layers))
        branches.append(ASPPPooling(in_channels, channels, norm_layer, conv_layer))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_layer(len(branches) * channels, channels, 1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """V3+ decoder: low-level 1x1 to 48, concat with upsampled ASPP, 3x3 conv, 1x1 to K."""

    def __init__(
        self,
        in_channels: int,
        low_channels: int,
        num_classes: int,
        aspp_rates: Sequence[int],
        aspp_dropout: float,
        channels: int,
        norm_layer: NormLayer,
        conv_layer: ConvLayer = nn.Conv2d,
        low_project_channels: int = 48,
    ) -> None:
        super().__init__()
        self.project = ConvNormAct(
            low_channels, low_project_channels, 1, norm_layer=norm_layer, conv_layer=conv_layer
        )
        self.aspp = ASPP(in_channels, aspp_rates, channels, aspp_dropout, norm_layer, conv_layer)
        self.classifier = nn.Sequential(
            conv_layer(channels + low_project_channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, low: Tensor, out: Tensor, *, features: bool = False) -> Tensor:
        """Logits, or with ``features`` the 256-channel features before the final 1x1."""
        low = self.project(low)
        out = resize(self.aspp(out), low.shape[-2:])
        x = torch.cat([low, out], dim=1)
        return _all_but_last(self.classifier, x) if features else self.classifier(x)


def _all_but_last(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers[:-1](x)`` without a new Sequential (torch.fx traces registered modules only)."""
    *head, _ = layers
    for layer in head:
        x = layer(x)
    return x


def _crf_head(
    crf: str | None, channels: int, num_classes: int, iters: int, gamma: float
) -> DualDecompositionCRF | None:
    """The CRF on the head's features (None without one); options checked here."""
    if crf is None:
        return None
    if crf != "ddd":
        raise ConfigError(f"crf: got {crf!r}; choose one of [None, 'ddd']")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"crf_iters: got {iters!r}; must be an int >= 1")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ConfigError(f"crf_gamma: got {gamma!r}; must be a number > 0")
    return DualDecompositionCRF(channels, num_classes, iters, float(gamma))


class DeepLabV3(SegmentationModel):
    """DeepLabV3: ASPP on the last backbone stage [-> 3x3 conv/BN/ReLU] -> 1x1 to K.

    ``crf="ddd"``: the final 1x1's logits are the unaries of a :class:`DualDecompositionCRF` on
    the features before it (``crf`` module: the pairwise conv); the layout is otherwise unchanged.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        head_conv: bool = True,
        aux: bool = False,
        channels: int = 256,
        norm_layer: NormLayer | None = None,
        conv_layer: ConvLayer = nn.Conv2d,
        *,
        crf: str | None = None,
        crf_iters: int = 5,
        crf_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.backbone = backbone
        layers = [
            ASPP(backbone.out_channels, aspp_rates, channels, aspp_dropout, norm_layer, conv_layer)
        ]
        if head_conv:
            layers += [
                conv_layer(channels, channels, 3, padding=1, bias=False),
                norm_layer(channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.classifier = nn.Sequential(*layers)
        init_weights_(self.classifier)
        self.aux_classifier = aux_head(backbone, num_classes, norm_layer, conv_layer, aux)
        self.crf = _crf_head(crf, channels, num_classes, crf_iters, crf_gamma)

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        if self.crf is None:
            return self.classifier(features["out"])
        x = _all_but_last(self.classifier, features["out"])
        return self.crf(x, self.classifier[-1](x))


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: ASPP plus a decoder on the stride-4 low-level features.

    ``crf="ddd"``: a :class:`DualDecompositionCRF` on the decoder's stride-4 features.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        aux: bool = False,
        channels: int = 256,
        norm_layer: NormLayer | None = None,
        conv_layer: ConvLayer = nn.Conv2d,
        *,
        crf: str | None = None,
        crf_iters: int = 5,
        crf_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.backbone = backbone
        self.classifier = DeepLabV3PlusHead(
            backbone.out_channels,
            backbone.low_channels,
            num_classes,
            aspp_rates,
            aspp_dropout,
            channels,
            norm_layer,
            conv_layer,
        )
        init_weights_(self.classifier)
        self.aux_classifier = aux_head(backbone, num_classes, norm_layer, conv_layer, aux)
        self.crf = _crf_head(crf, channels, num_classes, crf_iters, crf_gamma)

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        if self.crf is None:
            return self.classifier(features["low"], features["out"])
        x = self.classifier(features["low"], features["out"], features=True)
        return self.crf(x, self.classifier.classifier[-1](x))


# ---------------------------------------------------------------------------- builders

_DEFAULT_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _build(
    arch: str,
    backbone_name: str,
    *,
    num_classes: int,
    output_stride: int,
    aspp_rates: Sequence[int] | None,
    aspp_dropout: float,
    channels: int,
    norm: str,
    aux: bool = False,
    head_conv: bool = True,
    crf: str | None = None,
    crf_iters: int = 5,
    crf_gamma: float = 2.0,
    **backbone_options,
) -> nn.Module:
    """Validate the shared options, build the backbone, then DeepLabV3 (``arch="v3"``) or V3+."""
    if output_stride not in _DEFAULT_RATES:
        raise ConfigError(f"output_stride: got {output_stride!r}; choose one of [8, 16]")
    rates = _DEFAULT_RATES[output_stride] if aspp_rates is None else tuple(aspp_rates)
    if len(rates) != 3 or not all(isinstance(r, int) and r > 0 for r in rates):
        raise ConfigError(f"aspp_rates: got {aspp_rates!r}; give 3 positive ints, or None")
    if not 0.0 <= aspp_dropout < 1.0:
        raise ConfigError(f"aspp_dropout: got {aspp_dropout!r}; must be in [0, 1)")
    layers = norm_layers(norm)
    backbone = build_backbone(
        backbone_name, output_stride=output_stride, **layers, **backbone_options
    )
    crf_options = {"crf": crf, "crf_iters": crf_iters, "crf_gamma": crf_gamma}
    if arch == "v3":
        return DeepLabV3(
            backbone,
            num_classes,
            rates,
            aspp_dropout,
            head_conv,
            aux,
            channels,
            **layers,
            **crf_options,
        )
    return DeepLabV3Plus(
        backbone, num_classes, rates, aspp_dropout, aux, channels, **layers, **crf_options
    )


# Options each builder accepts, with their defaults; ``num_classes`` is always required.
_COMMON: dict[str, Any] = {
    "output_stride": 16,  # 8 or 16
    "aspp_rates": None,  # None: (6, 12, 18) at OS16, (12, 24, 36) at OS8
    "aspp_dropout": 0.1,
    "channels": 256,  # ASPP / head width
    "norm": "bn",  # "bn" or "gn_ws" (GroupNorm 32 + weight standardisation)
    "width_mult": 1.0,  # backbone width; 1.0 keeps torchvision's shapes
    "crf": None,  # "ddd": DDD CRF layer on the head's logits (leanseg.models.crf)
    "crf_iters": 5,  # DDD fixed-point iterations
    "crf_gamma": 2.0,  # DDD smoothing temperature
}
_RESNET = {"aux": False, "multi_grid": None}  # aux: FCN head on layer3 (torchvision layout)
_V3 = {"head_conv": True}  # 3x3 conv -> BN -> ReLU between ASPP and the classifier


def _register(arch: str, backbone: str, options: dict[str, Any], doc: str) -> None:
    """Register ``deeplabv3[plus]_<backbone>``; unknown options are one-line ConfigErrors."""
    name = f"deeplabv3{'plus' if arch == 'v3+' else ''}_{backbone}"
    register_builder(name, partial(_build, arch, backbone), options, doc)


for _backbone in ("resnet18", "resnet50", "resnet101"):
    _register("v3", _backbone, {**_COMMON, **_RESNET, **_V3}, f"DeepLabV3 on {_backbone}.")
    _register("v3+", _backbone, {**_COMMON, **_RESNET}, f"DeepLabV3+ on {_backbone}.")
_register("v3", "mobilenetv2", {**_COMMON, **_V3}, "DeepLabV3 on MobileNetV2 (no aux head).")
_register("v3+", "mobilenetv2", _COMMON, "DeepLabV3+ on MobileNetV2 (decoder on 24 ch).")
