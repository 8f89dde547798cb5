"""Slimmable FasterSeg operators for the search supernet (shared/methods/fasterseg.md §2.3-2.4).

Every conv holds a super-kernel at the largest widths and runs ``weight[:c_out, :c_in]``, with
``c_in`` the input's channel count and ``c_out`` given per call. Each conv is followed by a
:class:`SwitchableBN`: one BatchNorm (weights and running statistics) per output width, so that
the statistics of one width never mix with another's. The operators mirror the derived network's
(:mod:`leanseg.models.fasterseg.ops`): same order of conv, BN, zoom and ReLU, same stride-2
sizes. The one difference is the stride-1 ``skip``: here a 1x1 conv-BN-ReLU (the widths of its
input and output may differ during the search), in a derived network the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.models.fasterseg.ops import half_size, zoom

OPS = ("skip", "conv", "zoomed_conv", "conv_x2", "zoomed_conv_x2")  # alpha column order (§11)


class SwitchableBN(nn.Module):
    """One ``BatchNorm2d`` per width in ``widths``, chosen by the input's channel count."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.bns = nn.ModuleDict({str(w): nn.BatchNorm2d(w) for w in sorted(set(widths))})

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[str(x.shape[1])](x)


class SlimConvBN(nn.Module):
    """A bias-free ``k x k`` conv sliced to the call's widths, then the BN of that width."""

    def __init__(
        self, c_in: int, out_widths: tuple[int, ...], kernel: int = 3, stride: int = 1
    ) -> None:
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(torch.empty(max(out_widths), c_in, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        self.bn = SwitchableBN(out_widths)

    def forward(self, x: Tensor, c_out: int, relu: bool = True) -> Tensor:
        weight = self.weight[:c_out, : x.shape[1]]
        out = self.bn(F.conv2d(x, weight, None, self.stride, self.padding))
        return F.relu(out) if relu else out


class SlimSkip(nn.Module):
    """``skip``: stride 1 a 1x1 conv-BN-ReLU; stride 2 FactorizedReduce (two 1x1 s2 convs, the
    second on the input shifted by one pixel, each to half the output width, concatenated, BN,
    ReLU), as :class:`~leanseg.models.fasterseg.ops.FactorizedReduce`."""

    def __init__(self, c_in: int, out_widths: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.stride = stride
        if stride == 1:
            self.conv = SlimConvBN(c_in, out_widths, kernel=1)
            return
        halves = tuple(w // 2 for w in out_widths)
        self.weight1 = nn.Parameter(torch.empty(max(halves), c_in, 1, 1))
        self.weight2 = nn.Parameter(torch.empty(max(halves), c_in, 1, 1))
        for weight in (self.weight1, self.weight2):
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
        self.bn = SwitchableBN(out_widths)

    def forward(self, x: Tensor, c_out: int) -> Tensor:
        if self.stride == 1:
            return self.conv(x, c_out)
        c_in, half = x.shape[1], c_out // 2
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        out = torch.cat(
            [
                F.conv2d(x, self.weight1[:half, :c_in], stride=2),
                F.conv2d(shifted, self.weight2[:half, :c_in], stride=2),
            ],
            dim=1,
        )
        return F.relu(self.bn(out))


class SlimConv(nn.Module):
    """``conv`` (one conv-BN-ReLU) or ``conv_x2`` (two), the first at ``stride``."""

    def __init__(self, c_in: int, out_widths: tuple[int, ...], stride: int, depth: int) -> None:
        super().__init__()
        convs = [SlimConvBN(c_in, out_widths, stride=stride)]
        convs += [SlimConvBN(max(out_widths), out_widths) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor, c_out: int) -> Tensor:
        for conv in self.convs:
            x = conv(x, c_out)
        return x


class SlimZoomedConv(nn.Module):
    """``zoomed_conv`` / ``zoomed_conv_x2``: x1/2, the conv(s), at stride 1 back to the input
    size, then ReLU (the last conv's ReLU comes after the resize)."""

    def __init__(self, c_in: int, out_widths: tuple[int, ...], stride: int, depth: int) -> None:
        super().__init__()
        self.stride = stride
        convs = [SlimConvBN(c_in, out_widths)]
        convs += [SlimConvBN(max(out_widths), out_widths) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor, c_out: int) -> Tensor:
        out = zoom(x, half_size(x))
        for conv in self.convs[:-1]:
            out = conv(out, c_out)
        out = self.convs[-1](out, c_out, relu=self.stride == 2)
        return out if self.stride == 2 else F.relu(zoom(out, x.shape[-2:]))


def make_slim_op(op: str, c_in: int, out_widths: tuple[int, ...], stride: int) -> nn.Module:
    """The slimmable module of operator ``op`` (a name in :data:`OPS`)."""
    if op == "skip":
        return SlimSkip(c_in, out_widths, stride)
    depth = 2 if op.endswith("_x2") else 1
    if op.startswith("zoomed"):
        return SlimZoomedConv(c_in, out_widths, stride, depth)
    return SlimConv(c_in, out_widths, stride, depth)


class MixedOp(nn.Module):
    """All five operators at one stride; the output is their ``weights``-weighted sum."""

    def __init__(self, c_in: int, out_widths: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList(make_slim_op(op, c_in, out_widths, stride) for op in OPS)

    def forward(self, x: Tensor, weights: Tensor, c_out: int) -> Tensor:
        return sum(w * op(x, c_out) for w, op in zip(weights, self.ops, strict=True))
