"""Fold removed constant channels into the layers that read them (acosp.md section 11.2-11.3).

A removed input channel ``c`` of a conv holds a known ``value_c * P`` (``P`` all ones, or the
unpool pattern ``unpool(pool(ones))`` in SegNet's decoder). Its contribution
``conv2d(value_c * P, W[:, c])`` equals ``conv2d(P, sum_c value_c W[:, c])``: one extra
single-input-channel conv of the pattern, computed on the fly from the input size, so it is
exact at zero-padded borders too. Without padding and with ``P`` all ones it is a bias.
A transposed conv gets the same on-the-fly term as a transposed conv of ``P``
(:class:`FoldedConvTranspose2d`): its output pixels see different kernel taps, so it is never a
plain bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanseg.methods.acosp.graph import CONST, UNPOOLED, ChannelPlan, LayerUse
from leanseg.models.segnet import max_unpool2d


def unpool_pattern(ones: Tensor, pool: Sequence) -> Tensor:
    """``unpool(pool(ones))``: where a constant channel's max-pool indices put its value."""
    kernel, stride, padding, dilation, ceil_mode = pool
    pooled, indices = F.max_pool2d(
        ones, kernel, stride, padding, dilation, ceil_mode, return_indices=True
    )
    return max_unpool2d(pooled, indices, ones.shape[-2:])


class FoldedConv2d(nn.Conv2d):
    """``nn.Conv2d`` plus the folded terms of removed constant inputs (buffers ``fold_ones``,
    ``fold_unpool``, each ``[C_out, 1, kh, kw]``), added as convs of the constant pattern."""

    def __init__(
        self, *args: object, fold_ones: bool = False, unpool: Sequence | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        shape = (self.out_channels, 1, *self.kernel_size)
        self.register_buffer("fold_ones", torch.zeros(shape) if fold_ones else None)
        self.register_buffer("fold_unpool", torch.zeros(shape) if unpool else None)
        self.unpool = tuple(unpool) if unpool else None

    def _term(self, pattern: Tensor, weight: Tensor) -> Tensor:
        weight = weight.to(pattern.dtype)
        return F.conv2d(pattern, weight, None, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        ones = torch.ones_like(x[:1, :1])
        if self.fold_ones is not None:
            out = out + self._term(ones, self.fold_ones)
        if self.fold_unpool is not None:
            out = out + self._term(unpool_pattern(ones, self.unpool), self.fold_unpool)
        return out


class FoldedConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` plus the folded terms of removed constant inputs (buffers
    ``fold_ones``, ``fold_unpool``, each ``[1, C_out, kh, kw]``), added as transposed convs of
    the constant pattern with the layer's stride, padding and output padding."""

    def __init__(
        self, *args: object, fold_ones: bool = False, unpool: Sequence | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        shape = (1, self.out_channels, *self.kernel_size)
        self.register_buffer("fold_ones", torch.zeros(shape) if fold_ones else None)
        self.register_buffer("fold_unpool", torch.zeros(shape) if unpool else None)
        self.unpool = tuple(unpool) if unpool else None

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        out = super().forward(x, output_size)
        extra = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        ones = torch.ones_like(x[:1, :1])

        def term(pattern: Tensor, weight: Tensor) -> Tensor:
            weight = weight.to(pattern.dtype)
            return F.conv_transpose2d(
                pattern, weight, None, self.stride, self.padding, extra, 1, self.dilation
            )

        if self.fold_ones is not None:
            out = out + term(ones, self.fold_ones)
        if self.fold_unpool is not None:
            out = out + term(unpool_pattern(ones, self.unpool), self.fold_unpool)
        return out


def _no_padding(conv: nn.Conv2d) -> bool:
    """Every output pixel sees the whole kernel inside the input (or the padding repeats it)."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return True
    return isinstance(conv.padding, tuple) and not any(conv.padding)


def _term(weight: Tensor, use: LayerUse, removed: Tensor, kind: int) -> Tensor | None:
    """``sum_c value_c W[:, c]`` over the removed input channels of ``kind`` (None if zero)."""
    select = removed & torch.from_numpy(use.inp.kind == kind)
    if not select.any():
        return None
    value = use.inp.value.to(weight)[select]
    term = torch.einsum("ochw,c->ohw", weight[:, select], value).unsqueeze(1)
    return term if term.any() else None


def shrunk_conv(use: LayerUse, plan: ChannelPlan) -> tuple[dict, dict[str, Tensor]]:
    """The conv's new shape (plain data) and weights: kept rows and columns, folded terms, and
    zeroed rows for pruned channels that had to stay."""
    conv = use.module
    weight = conv.weight.detach().double()
    keep_out = plan.kept_index(use.out).to(weight.device)
    bias = None if conv.bias is None else conv.bias.detach().double()
    folds: dict[str, Tensor] = {}
    if conv.groups == 1:
        removed = torch.from_numpy(plan.removed(use.inp)).to(weight.device)
        ones = _term(weight, use, removed, CONST)
        unpool = _term(weight, use, removed, UNPOOLED)
        if ones is not None and _no_padding(conv):
            bias = ones.sum((1, 2, 3)) + (0 if bias is None else bias)
        elif ones is not None:
            folds["fold_ones"] = ones
        if unpool is not None:
            folds["fold_unpool"] = unpool
        weight = weight[:, ~removed]
        groups = 1
    else:  # depthwise: input and output channels go together
        groups = len(keep_out)
    state = {"weight": weight[keep_out]}
    if bias is not None:
        state["bias"] = bias[keep_out]
    state.update({key: term[keep_out] for key, term in folds.items()})
    if hasattr(conv, "acosp_mask"):  # a pruned channel that stays: its output is 0 again
        dead = (conv.acosp_mask[keep_out.to(conv.acosp_mask.device)] == 0).to(weight.device)
        for tensor in state.values():
            tensor[dead] = 0
    spec = {
        "type": "conv2d",
        "in_channels": state["weight"].shape[1] * groups,
        "out_channels": len(keep_out),
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": groups,
        "bias": "bias" in state,
        "padding_mode": conv.padding_mode,
        "fold_ones": "fold_ones" in state,
        "unpool": list(use.inp.pool) if "fold_unpool" in state else None,
    }
    dtype = conv.weight.dtype
    return spec, {key: tensor.to(dtype) for key, tensor in state.items()}


def shrunk_conv_transpose(use: LayerUse, plan: ChannelPlan) -> tuple[dict, dict[str, Tensor]]:
    """:func:`shrunk_conv` of a ``ConvTranspose2d`` (weight ``[C_in, C_out / groups, kh, kw]``):
    kept input rows and output columns, folded terms, zeroed columns for pruned channels that
    had to stay."""
    conv = use.module
    weight = conv.weight.detach().double()
    keep_out = plan.kept_index(use.out).to(weight.device)
    bias = None if conv.bias is None else conv.bias.detach().double()[keep_out]
    state: dict[str, Tensor] = {}
    if conv.groups == 1:
        removed = torch.from_numpy(plan.removed(use.inp)).to(weight.device)
        for key, kind in (("fold_ones", CONST), ("fold_unpool", UNPOOLED)):
            # _term reads W[:, c] as [C_out, C_in, kh, kw]: give it the transposed weight
            term = _term(weight.transpose(0, 1), use, removed, kind)
            if term is not None:
                state[key] = term.transpose(0, 1)[:, keep_out]  # [1, C_out, kh, kw]
        state["weight"] = weight[~removed][:, keep_out]
        groups = 1
    else:  # depthwise: input and output channels go together
        state["weight"] = weight[keep_out]
        groups = len(keep_out)
    if bias is not None:
        state["bias"] = bias
    if hasattr(conv, "acosp_mask"):  # a pruned channel that stays: its output is 0 again
        dead = (conv.acosp_mask[keep_out.to(conv.acosp_mask.device)] == 0).to(weight.device)
        for key, tensor in state.items():  # output channels: dim 1 of a dense weight
            if key == "bias" or (key == "weight" and groups > 1):
                tensor[dead] = 0
            else:
                tensor[:, dead] = 0
    spec = {
        "type": "conv_transpose2d",
        "in_channels": state["weight"].shape[0],
        "out_channels": len(keep_out),
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "output_padding": list(conv.output_padding),
        "dilation": list(conv.dilation),
        "groups": groups,
        "bias": "bias" in state,
        "fold_ones": "fold_ones" in state,
        "unpool": list(use.inp.pool) if "fold_unpool" in state else None,
    }
    dtype = conv.weight.dtype
    return spec, {key: tensor.to(dtype) for key, tensor in state.items()}


def shrunk_norm(use: LayerUse, plan: ChannelPlan) -> tuple[dict, dict[str, Tensor]]:
    """A BatchNorm restricted to the kept channels."""
    norm = use.module
    state = norm.state_dict()
    keep = plan.kept_index(use.inp)
    sliced = {k: v if v.ndim == 0 else v[keep.to(v.device)] for k, v in state.items()}
    spec = {
        "type": "batchnorm2d",
        "num_features": len(keep),
        "eps": norm.eps,
        "momentum": norm.momentum,
        "affine": norm.affine,
        "track_running_stats": norm.track_running_stats,
    }
    return spec, sliced


def shrunk_linear(use: LayerUse, plan: ChannelPlan) -> tuple[dict, dict[str, Tensor]]:
    """A linear layer without the removed (constant) inputs, their values folded into the bias."""
    linear = use.module
    weight = linear.weight.detach().double()
    removed = torch.from_numpy(plan.removed(use.inp)).to(weight.device)
    bias = torch.zeros(weight.shape[0]).to(weight) if linear.bias is None else linear.bias.double()
    bias = bias + weight[:, removed] @ use.inp.value.to(weight)[removed]
    state = {"weight": weight[:, ~removed], "bias": bias}
    spec = {
        "type": "linear",
        "in_features": state["weight"].shape[1],
        "out_features": weight.shape[0],
        "bias": True,
    }
    if linear.bias is None and not removed.any():
        spec["bias"] = False
        del state["bias"]
    return spec, {k: v.detach().to(linear.weight.dtype) for k, v in state.items()}
