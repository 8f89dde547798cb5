"""Small building blocks shared by backbones and heads: norm factory, conv-norm-act, init."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from leanseg.errors import ConfigError

NormLayer = Callable[[int], nn.Module]

_NORMS: dict[str, NormLayer] = {"bn": nn.BatchNorm2d}


def make_norm_layer(name: str) -> NormLayer:
    """Return a ``norm_layer(num_channels) -> nn.Module`` callable for ``name`` (only "bn" now)."""
    if name not in _NORMS:
        raise ConfigError(f"norm: unknown norm {name!r}; choose one of {sorted(_NORMS)}")
    return _NORMS[name]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below 90% of it (torchvision's rule)."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvNormAct(nn.Sequential):
    """Bias-free conv with "same" padding -> norm -> activation (torchvision Conv2dNormActivation).

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
    ) -> None:
        norm_layer = norm_layer or nn.BatchNorm2d
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
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
