"""FasterSeg operators (shared/methods/fasterseg.md section 2.3), at stride 1 or 2.

All 3x3 convs are bias-free and followed by BatchNorm. A stride-2 op maps ``H`` to
``ceil(H / 2)`` whatever the operator (the 3x3 conv's own rounding), so every path through the
network gives the same size at a scale; on even sizes this is the original's behaviour.
"Zoomed" ops run at half resolution: bilinear (``align_corners=True``) to ``ceil(H / 2)``, the
convs, then at stride 1 bilinear back to the input size. ConvX2 is two conv-BN-ReLU layers with
*no* residual (the original calls it "BasicResidual2x"; spec quirk 11).

Inference path: in eval mode every conv -> BN [-> ReLU] runs as one conv with the BN folded into
its weight and bias, the ReLU in place (:func:`conv_bn`); the same outputs to float rounding, the
same modules and state dict. Training, hooked or non-standard modules and fx tracing take the
module-by-module path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from leanseg.models.layers import ConvNormAct


def half_size(x: Tensor) -> tuple[int, int]:
    """``ceil`` of half of ``x``'s spatial size: what a stride-2 3x3 conv (padding 1) gives."""
    return (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2


def zoom(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with ``align_corners=True``, as the original's zoomed ops and heads."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """``module`` is exactly a ``kind`` and no hook (its own or global) would see its call."""
    hooked = any(getattr(module, h, None) for h in _HOOKS)
    hooked = hooked or any(getattr(_module, f"_global{h}", None) for h in _HOOKS)
    return type(module) is kind and not hooked


def foldable(x: Tensor, conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``conv`` -> ``bn`` may run as one folded conv on ``x``: eval-mode BN with running
    statistics, plain un-hooked ``nn.Conv2d`` / ``nn.BatchNorm2d``, and ``x`` not an fx proxy."""
    return (
        not isinstance(x, torch.fx.Proxy)
        and _plain(conv, nn.Conv2d)
        and _plain(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.affine
        and bn.running_mean is not None
        and conv.padding_mode == "zeros"
    )


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> Tensor:
    """``bn(conv(x))`` [then ReLU]; one conv with the BN folded in where :func:`foldable`."""
    if not foldable(x, conv, bn):
        out = bn(conv(x))
        return F.relu(out) if relu else out
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.relu_(out) if relu else out


def _relu_resized(x: Tensor, training: bool) -> Tensor:
    """ReLU of a resize's output (a fresh tensor), in place in eval mode."""
    return F.relu(x, inplace=not training and not isinstance(x, torch.fx.Proxy))


class ConvBNReLU(ConvNormAct):
    """:class:`ConvNormAct` (children ``0`` conv, ``1`` BN, ``2`` ReLU) on the folded eval path."""

    def forward(self, x: Tensor) -> Tensor:
        if not _plain(self[2], nn.ReLU):
            return super().forward(x)
        return conv_bn(x, self[0], self[1], relu=True)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class Conv(ConvBNReLU):
    """``conv``: 3x3 conv (stride 1 or 2) -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, 3, stride=stride)


class ConvX2(nn.Module):
    """``conv_x2``: conv(stride) -> BN -> ReLU -> conv -> BN -> ReLU; no residual."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = conv_bn(x, self.conv1, self.bn1, relu=True)
        return conv_bn(x, self.conv2, self.bn2, relu=True)


class ZoomedConv(nn.Module):
    """``zoomed_conv``: x1/2 -> conv -> BN [-> back to the input size at stride 1] -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn1 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            return conv_bn(zoom(x, half_size(x)), self.conv1, self.bn1, relu=True)
        out = conv_bn(zoom(x, half_size(x)), self.conv1, self.bn1, relu=False)
        return _relu_resized(zoom(out, x.shape[-2:]), self.training)


class ZoomedConvX2(nn.Module):
    """``zoomed_conv_x2``: x1/2 -> conv-BN-ReLU-conv-BN [-> back at stride 1] -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn(zoom(x, half_size(x)), self.conv1, self.bn1, relu=True)
        if self.stride == 2:
            return conv_bn(out, self.conv2, self.bn2, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=False)
        return _relu_resized(zoom(out, x.shape[-2:]), self.training)


class FactorizedReduce(nn.Module):
    """Stride-2 ``skip``: cat(1x1 s2 conv(x), 1x1 s2 conv(x shifted by one pixel)) -> BN -> ReLU.

    The shifted input is zero-padded at the bottom/right so both halves have ``ceil(H / 2)``
    rows on odd sizes too (on even sizes this is exactly ``x[:, :, 1:, 1:]``).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even output width, got {c_out}")
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return F.relu(self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1)))


def make_op(op: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    """The module for operator ``op`` (a name in ``spec.OPS``); stride-1 ``skip`` is identity."""
    if op == "skip":
        if stride == 2:
            return FactorizedReduce(c_in, c_out)
        if c_in != c_out:
            raise ValueError(f"a stride-1 skip keeps its width, got {c_in} -> {c_out}")
        return nn.Identity()
    classes: dict[str, type[nn.Module]] = {
        "conv": Conv,
        "conv_x2": ConvX2,
        "zoomed_conv": ZoomedConv,
        "zoomed_conv_x2": ZoomedConvX2,
    }
    if op not in classes:
        raise ValueError(f"unknown FasterSeg operator {op!r}; choose one of {['skip', *classes]}")
    return classes[op](c_in, c_out, stride)
