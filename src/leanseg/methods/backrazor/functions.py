"""Autograd Functions: dense forward, sparse saved input (backrazor.md sections 4 and 6).

Each forward runs the stock op on the dense input, so its output is bit-identical to the stock
layer's; only ``(packed bitmap, kept values)`` of the input is saved. The backward scatters the
values into a zero tensor ``x~`` and uses it wherever the stock backward needs the input:

- Conv2d: dX exact (needs only the input's shape), dW from ``x~``, db exact;
- Linear: dX exact, dW = dY^T x~ and db summed over all leading dims;
- BatchNorm2d (training): the stock BN backward evaluated at ``x~`` with the forward's saved mean
  and invstd, so dX, dgamma and dbeta are all approximate (exact at ratio 0);
- ReLU / ReLU6: a 1-bit packed mask of the pass-through region; the gradient is exact;
- MaxPool2d: one byte per output, the argmax's place in its window; the stock backward.

Saved copies are in the input's memory order and ``x~`` gets the input's strides, so a
channels-last or autocast (bf16) model runs the stock backward kernels on the same layouts;
at ratio 0 the gradients are the stock ones bit for bit. Dense buffers built in the backward
are given back to :data:`~leanseg.methods.backrazor.packing.scratch` once used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from leanseg.methods.backrazor.packing import (
    Layout,
    dense_buffer,
    pack_buffer,
    padded_bool,
    scratch,
    sparsify_stored,
    storage_rows,
    unpack_bytes,
    unsparsify_stored,
)

aten = torch.ops.aten


def mark_nonnegative(x: Tensor) -> Tensor:
    """Note on ``x`` (a ReLU's output) that it has no negative entry, until it is modified."""
    x._backrazor_nonnegative = x._version  # type: ignore[attr-defined]
    return x


def is_nonnegative(x: Tensor) -> bool:
    """Whether ``x`` carries :func:`mark_nonnegative`'s note and is unchanged since."""
    return getattr(x, "_backrazor_nonnegative", None) == x._version


def _like(weight: Tensor | None, x: Tensor) -> Tensor | None:
    """``weight`` in ``x``'s dtype (autocast's cast of a parameter, made where it is used)."""
    return weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)


def _sparsify_once(
    x: Tensor, ratio: float, value_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Layout]:
    """:func:`sparsify_stored`, reused when the same unmodified tensor comes again.

    Several layers often read one tensor (a ResNet block's input feeds conv1 and the shortcut
    conv; the ASPP branches share the backbone output): they then share one saved copy, as
    stock autograd shares the dense input. The copy hangs on the tensor and dies with it.
    """
    key = (x._version, ratio, value_dtype)
    cached = getattr(x, "_backrazor_sparse", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = sparsify_stored(x, ratio, value_dtype, is_nonnegative(x))
    x._backrazor_sparse = (key, result)  # type: ignore[attr-defined]
    return result


class SparseConv2dFn(torch.autograd.Function):
    """``F.conv2d`` (int padding) that saves a sparsified input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ratio: float,
        value_dtype: torch.dtype | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> Tensor:
        out = F.conv2d(x, _like(weight, x), _like(bias, x), stride, padding, dilation, groups)
        packed, values, ctx.layout = _sparsify_once(x, ratio, value_dtype)
        ctx.save_for_backward(packed, values, weight)
        ctx.dtype = x.dtype
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.args = (list(stride), list(padding), list(dilation), groups)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        packed, values, weight = ctx.saved_tensors
        x_tilde = unsparsify_stored(packed, values, ctx.layout, ctx.dtype)
        stride, padding, dilation, groups = ctx.args
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = aten.convolution_backward(
            grad_out,
            x_tilde,
            _like(weight, x_tilde),
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b and ctx.bias_sizes is not None],
        )
        scratch.give(x_tilde)
        return dx, dw, db, None, None, None, None, None, None


class SparseLinearFn(torch.autograd.Function):
    """``F.linear`` that saves a sparsified input; dW and db are summed over all leading dims."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ratio: float,
        value_dtype: torch.dtype | None,
    ) -> Tensor:
        out = F.linear(x, _like(weight, x), _like(bias, x))
        packed, values, ctx.layout = _sparsify_once(x, ratio, value_dtype)
        ctx.save_for_backward(packed, values, weight)
        ctx.dtype = x.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        packed, values, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = grad_out.matmul(_like(weight, grad_out))
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w:
            x_tilde = unsparsify_stored(packed, values, ctx.layout, ctx.dtype)
            dw = g2d.t().matmul(x_tilde.reshape(-1, x_tilde.shape[-1]))
            scratch.give(x_tilde)
        if need_b and ctx.has_bias:
            db = g2d.sum(dim=0)
        return dx, dw, db, None, None


class SparseBatchNorm2dFn(torch.autograd.Function):
    """Training-mode batch norm (running stats updated in place) that saves a sparsified input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        ratio: float,
        value_dtype: torch.dtype | None,
    ) -> Tensor:
        out, save_mean, save_invstd = aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        packed, values, ctx.layout = _sparsify_once(x, ratio, value_dtype)
        ctx.save_for_backward(packed, values, weight, save_mean, save_invstd)
        ctx.dtype = x.dtype
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        packed, values, weight, save_mean, save_invstd = ctx.saved_tensors
        x_tilde = unsparsify_stored(packed, values, ctx.layout, ctx.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = aten.native_batch_norm_backward(
            grad_out,
            x_tilde,
            weight,
            None,
            None,
            save_mean,
            save_invstd,
            True,
            ctx.eps,
            [need_x, need_w and weight is not None, need_b and weight is not None],
        )
        scratch.give(x_tilde)
        return dx, dw, db, None, None, None, None, None, None


class PackedReLUFn(torch.autograd.Function):
    """Out-of-place ReLU (``upper=None``) or ReLU6 (``upper=6``) that saves a 1-bit mask.

    The mask is packed in the input's memory order; the backward is the stock
    ``threshold_backward`` with the unpacked 0 / 1 mask standing in for the output.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None) -> Tensor:  # type: ignore[override]
        if upper is None:
            out = F.relu(x)
        else:
            out = F.relu6(x) if upper == 6.0 else F.hardtanh(x, 0.0, upper)
        with torch.no_grad():
            rows, layout = storage_rows(x.detach())
            buffer = padded_bool(rows.numel(), x.device)
            mask = buffer[: rows.numel()].view(rows.shape)
            torch.gt(rows, 0, out=mask)
            if upper is not None:
                mask.logical_and_(rows < upper)
            packed = pack_buffer(buffer)
        ctx.save_for_backward(packed)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        (packed,) = ctx.saved_tensors
        layout: Layout = ctx.layout
        numel = math.prod(layout.shape)
        ones = dense_buffer(numel, grad_out.dtype, grad_out.device, zeroed=False)
        ones.copy_(unpack_bytes(packed, numel))
        ones = ones.as_strided(layout.shape, layout.stride)
        grad_in = aten.threshold_backward(grad_out, ones, 0.5)
        scratch.give(ones)
        return grad_in, None


def _window_origins(
    out_shape: torch.Size, stride: tuple[int, int], padding: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Input row / column of each output position's window origin (top-left, may be < 0)."""
    rows = torch.arange(out_shape[-2], device=device) * stride[0] - padding[0]
    cols = torch.arange(out_shape[-1], device=device) * stride[1] - padding[1]
    return rows[:, None], cols[None, :]


class PackedMaxPool2dFn(torch.autograd.Function):
    """``F.max_pool2d`` that saves only where each window's maximum sits: one byte per output.

    The stock op saves its dense input and int64 argmax indices; the backward needs only the
    indices, and an index is fixed by its offset inside the window (at most 16x16 = 256 places).
    The gradient is exact.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> Tensor:
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, True)
        width = x.shape[-1]
        top, left = _window_origins(out.shape, stride, padding, x.device)
        row = (index.div(width, rounding_mode="floor") - top).div(
            dilation[0], rounding_mode="floor"
        )
        col = (index.remainder(width) - left).div(dilation[1], rounding_mode="floor")
        ctx.save_for_backward((row * kernel[1] + col).to(torch.uint8))
        ctx.shape, ctx.stride = x.shape, x.stride()
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (offset,) = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.args
        top, left = _window_origins(offset.shape, stride, padding, offset.device)
        offset = offset.long()
        row = top + offset.div(kernel[1], rounding_mode="floor") * dilation[0]
        col = left + offset.remainder(kernel[1]) * dilation[1]
        index = row * ctx.shape[-1] + col
        # the stock backward with the rebuilt argmax: it reads only the input's shape and
        # strides, so an uninitialised stand-in does; the result is the stock one
        like = grad_out.new_empty_strided(ctx.shape, ctx.stride)
        grad_in = aten.max_pool2d_with_indices_backward(
            grad_out, like, kernel, stride, padding, dilation, ceil_mode, index
        )
        return grad_in, None, None, None, None, None
