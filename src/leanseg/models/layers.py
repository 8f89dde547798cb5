"""Small building blocks shared by backbones and heads: norm/conv factories, conv-norm-act, init.

``norm`` names a pair of layers that every backbone and head threads through:

- ``"bn"``: ``nn.BatchNorm2d`` after plain ``nn.Conv2d``;
- ``"gn_ws"`` (chenxi's ``--groups 32 --weight_std``, deeplab.md 1.5): ``GroupNorm(32, C)``
  after weight-standardised convs (:class:`WSConv2d`). The final classifier convs stay plain
  ``nn.Conv2d`` in every model. State-dict keys equal the BN model's minus the running stats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from leanseg.errors import ConfigError

NormLayer = Callable[[int], nn.Module]
ConvLayer = Callable[..., nn.Conv2d]  # the signature of nn.Conv2d

GN_GROUPS = 32


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose kernel is standardised per output filter before every convolution.

    ``W_hat = (W - mean) / (std + eps)`` with the statistics over (C_in, kh, kw) and the unbiased
    std (Qiao et al. 2019, chenxi116/DeepLabv3.pytorch). The stored ``weight`` stays raw, so the
    state-dict keys are those of ``nn.Conv2d``.
    """

    eps = 1e-5

    def standardized_weight(self) -> Tensor:
        """The kernel the convolution actually uses."""
        flat = self.weight.flatten(1)
        centred = flat - flat.mean(dim=1, keepdim=True)
        std = centred.std(dim=1, keepdim=True)  # unbiased
        return (centred / (std + self.eps)).view_as(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def group_norm(num_channels: int) -> nn.GroupNorm:
    """``GroupNorm(32, C)``; ``gcd(32, C)`` groups when C is not a multiple of 32 (MobileNetV2)."""
    return nn.GroupNorm(math.gcd(GN_GROUPS, num_channels), num_channels)


# norm name -> (norm layer, conv layer of every conv but the final classifiers)
_NORMS: dict[str, tuple[NormLayer, ConvLayer]] = {
    "bn": (nn.BatchNorm2d, nn.Conv2d),
    "gn_ws": (group_norm, WSConv2d),
}


def _check_norm(name: str) -> tuple[NormLayer, ConvLayer]:
    if name not in _NORMS:
        raise ConfigError(f"norm: unknown norm {name!r}; choose one of {sorted(_NORMS)}")
    return _NORMS[name]


def make_norm_layer(name: str) -> NormLayer:
    """Return a ``norm_layer(num_channels) -> nn.Module`` callable for ``"bn"`` or ``"gn_ws"``."""
    return _check_norm(name)[0]


def make_conv_layer(name: str) -> ConvLayer:
    """Return the conv class (``nn.Conv2d`` signature) that goes with norm ``name``."""
    return _check_norm(name)[1]


def norm_layers(name: str) -> dict[str, NormLayer | ConvLayer]:
    """``{"norm_layer": ..., "conv_layer": ...}`` for norm ``name``, as keyword arguments."""
    norm_layer, conv_layer = _check_norm(name)
    return {"norm_layer": norm_layer, "conv_layer": conv_layer}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below 90% of it (torchvision's rule)."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvNormAct(nn.Sequential):
    """Conv with "same" padding -> norm -> activation (torchvision Conv2dNormActivation).

    The conv is bias-free unless ``bias`` (SegNet's CBR keeps VGG's conv biases).

    Children are numbered ``0`` (conv), ``1`` (norm), ``2`` (activation), as in torchvision.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: NormLayer | None = None,
        activation: Callable[..., nn.Module] = nn.ReLU,
        *,
        conv_layer: ConvLayer = nn.Conv2d,
        bias: bool = False,
    ) -> None:
        norm_layer = norm_layer or nn.BatchNorm2d
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            conv_layer(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
            ),
            norm_layer(out_channels),
            activation(inplace=True),
        )
        self.out_channels = out_channels


def is_norm(module: nn.Module) -> bool:
    """True for the normalisation layers whose affine weight starts at 1 and bias at 0."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm))


def init_weights_(module: nn.Module, mode: str = "fan_in") -> None:
    """Kaiming-normal init for every conv in ``module`` (bias 0); norm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm(m) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
