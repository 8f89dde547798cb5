"""MobileNetV2 backbone with torchvision's state-dict layout (``features.0`` .. ``features.17``).

The final 1x1 conv to 1280 channels (``features.18``) and the classifier are dropped. Once the
output stride is reached, later stride-2 stages run at stride 1 and double the dilation (VainF);
the depthwise convs keep standard "same" padding.
"""

from __future__ import annotations

from torch import Tensor, nn

from leanseg.errors import ConfigError
from leanseg.models.layers import ConvLayer, ConvNormAct, NormLayer, init_weights_, make_divisible

# (expand ratio t, channels c, repeats n, first stride s) from the MobileNetV2 paper
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_LOW_END = 4  # features[0:4] -> 24 channels at stride 4


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 (stride, dilation) -> linear 1x1; residual when shapes match."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dilation: int,
        expand_ratio: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        act = {"norm_layer": norm_layer, "activation": nn.ReLU6, "conv_layer": conv_layer}
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, **act))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, dilation, hidden, **act),
            conv_layer(hidden, out_channels, 1, bias=False),
            norm_layer(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 features returning ``{"low": features[0:4], "out": features[4:]}``."""

    def __init__(
        self,
        output_stride: int = 32,
        width_mult: float = 1.0,
        norm_layer: NormLayer | None = None,
        conv_layer: ConvLayer = nn.Conv2d,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride: got {output_stride!r}; choose one of [8, 16, 32]")
        if not width_mult > 0:
            raise ConfigError(f"width_mult: got {width_mult!r}; must be a positive float")
        norm_layer = norm_layer or nn.BatchNorm2d
        channels = make_divisible(32 * width_mult)
        features: list[nn.Module] = [
            ConvNormAct(
                3, channels, 3, 2, norm_layer=norm_layer, activation=nn.ReLU6, conv_layer=conv_layer
            )
        ]
        current_stride, dilation = 2, 1
        for t, c, n, s in _SETTINGS:
            out_channels = make_divisible(c * width_mult)
            previous_dilation = dilation
            if current_stride == output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                features.append(
                    InvertedResidual(
                        channels,
                        out_channels,
                        stride if i == 0 else 1,
                        previous_dilation if i == 0 else dilation,
                        t,
                        norm_layer,
                        conv_layer,
                    )
                )
                channels = out_channels
        self.features = nn.Sequential(*features)
        self.low_channels = features[_LOW_END - 1].out_channels
        self.aux_channels: int | None = None
        self.out_channels = channels
        self.output_stride = output_stride
        init_weights_(self, mode="fan_out")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        for block in self.features[:_LOW_END]:
            x = block(x)
        low = x
        for block in self.features[_LOW_END:]:
            x = block(x)
        return {"low": low, "out": x}


def mobilenetv2(
    *,
    output_stride: int = 32,
    width_mult: float = 1.0,
    norm_layer: NormLayer | None = None,
    conv_layer: ConvLayer = nn.Conv2d,
) -> MobileNetV2:
    """Build a MobileNetV2 backbone at output stride 8, 16 or 32."""
    return MobileNetV2(output_stride, width_mult, norm_layer, conv_layer)
