"""ResNet-18/50/101 backbones with torchvision's state-dict layout and dilated last stages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.layers import ConvLayer, NormLayer, init_weights_

# output stride -> torchvision's replace_stride_with_dilation for (layer2, layer3, layer4)
_DILATE = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
STEMS = ("torchvision", "deep", "cifar")


def _conv3x3(
    in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, conv: ConvLayer = nn.Conv2d
) -> nn.Conv2d:
    return conv(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); both use ``dilation``, the first one ``stride``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation, conv_layer)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation, conv_layer)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 x4 (ResNet-50/101, torchvision "v1.5")."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation, conv_layer)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv_layer(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet without avgpool/fc, returning ``{"low": layer1, "aux": layer3, "out": layer4}``.

    ``replace_stride_with_dilation`` follows torchvision: in a dilated stage the first block uses
    the previous dilation, the others the new one, and the downsample conv has stride 1.
    ``uniform_dilation`` (semseg's PSPNet) gives every block of a dilated stage the new rate.
    ``multi_grid`` (DeepLabV3 paper) instead gives layer4's blocks ``base_rate * multi_grid[i]``.

    ``stem``: ``"torchvision"`` (7x7 s2 conv, maxpool), ``"deep"`` (semseg's ``deep_base``:
    3x3 s2 3->64, 3x3 64->64, 3x3 64->128 as ``conv1/bn1 .. conv3/bn3``, maxpool; layer1 then
    starts from 128 channels) or ``"cifar"`` (3x3 s1 conv, no maxpool).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        multi_grid: Sequence[int] | None = None,
        norm_layer: NormLayer | None = None,
        width_mult: float = 1.0,
        *,
        conv_layer: ConvLayer = nn.Conv2d,
        stem: str = "torchvision",
        uniform_dilation: bool = False,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ConfigError(f"width_mult: got {width_mult!r}; must be > 0 (1.0 = torchvision)")
        if stem not in STEMS:
            raise ConfigError(f"stem: got {stem!r}; choose one of {list(STEMS)}")
        if multi_grid is not None and (
            len(multi_grid) != layers[3] or any(int(g) < 1 for g in multi_grid)
        ):
            raise ConfigError(
                f"multi_grid: got {tuple(multi_grid)}; layer4 has {layers[3]} blocks, "
                f"give {layers[3]} positive ints, e.g. {(1, 2, 4, 8)[: layers[3]]}, or None"
            )
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self._conv_layer = conv_layer
        self._uniform_dilation = uniform_dilation
        widths = [max(8, round(c * width_mult)) for c in (64, 128, 256, 512)]
        self._inplanes = widths[0]
        self._dilation = 1
        self._make_stem(stem, widths[0])
        dilate = tuple(replace_stride_with_dilation)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, dilate[2], multi_grid)
        self.low_channels = widths[0] * block.expansion
        self.aux_channels = widths[2] * block.expansion
        self.out_channels = widths[3] * block.expansion
        self.output_stride = (1 if stem == "cifar" else 4) * 8 // 2 ** sum(dilate)
        init_weights_(self, mode="fan_out")

    def _make_stem(self, stem: str, width: int) -> None:
        norm, conv = self._norm_layer, self._conv_layer
        self._deep_stem = stem == "deep"
        if stem == "torchvision":
            self.conv1 = conv(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(3, width, 2 if self._deep_stem else 1, conv=conv)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        if self._deep_stem:
            self.conv2 = _conv3x3(width, width, conv=conv)
            self.bn2 = norm(width)
            self.conv3 = _conv3x3(width, 2 * width, conv=conv)
            self.bn3 = norm(2 * width)
            self._inplanes = 2 * width
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
        multi_grid: Sequence[int] | None = None,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_channels:
            downsample = nn.Sequential(
                self._conv_layer(self._inplanes, out_channels, 1, stride=stride, bias=False),
                self._norm_layer(out_channels),
            )
        if multi_grid is not None:
            rates = [self._dilation * int(g) for g in multi_grid]
        elif self._uniform_dilation:
            rates = [self._dilation] * blocks
        else:
            rates = [previous_dilation] + [self._dilation] * (blocks - 1)
        norm, conv = self._norm_layer, self._conv_layer
        layers = [block(self._inplanes, planes, stride, downsample, rates[0], norm, conv)]
        self._inplanes = out_channels
        for rate in rates[1:]:
            layers.append(block(out_channels, planes, 1, None, rate, norm, conv))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        if self._deep_stem:
            x = self.relu(self.bn3(self.conv3(self.relu(self.bn2(self.conv2(x))))))
        x = self.maxpool(x)
        low = self.layer1(x)
        aux = self.layer3(self.layer2(low))
        return {"low": low, "aux": aux, "out": self.layer4(aux)}


_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def resnet(
    name: str,
    *,
    output_stride: int = 32,
    multi_grid: Sequence[int] | None = None,
    norm_layer: NormLayer | None = None,
    width_mult: float = 1.0,
    conv_layer: ConvLayer = nn.Conv2d,
    **resnet_options: Any,
) -> ResNet:
    """Build ``resnet18``/``resnet50``/``resnet101`` at output stride 8, 16 or 32.

    ``width_mult`` scales every stage's width (1.0 keeps torchvision's shapes);
    ``resnet_options`` (``stem``, ``uniform_dilation``) go to :class:`ResNet`.
    """
    if output_stride not in _DILATE:
        raise ConfigError(f"output_stride: got {output_stride!r}; choose one of {sorted(_DILATE)}")
    block, layers = _SPECS[name]
    return ResNet(
        block,
        layers,
        _DILATE[output_stride],
        multi_grid,
        norm_layer,
        width_mult,
        conv_layer=conv_layer,
        **resnet_options,
    )
