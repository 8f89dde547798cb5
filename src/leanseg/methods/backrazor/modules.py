"""Module wrappers: subclasses of the stock layers that only swap ``forward``.

:func:`leanseg.methods.backrazor.apply` turns a stock layer into its wrapper by setting
``module.__class__`` and ``module.backrazor_ratio``: parameters, buffers, state-dict keys and
``isinstance`` checks are unchanged, so checkpoints move freely between plain and BackRazor
models. The sparse Function runs only while training with grad enabled and some input or
parameter needing grad; otherwise the stock forward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from leanseg.methods.backrazor.functions import (
    PackedMaxPool2dFn,
    PackedReLUFn,
    SparseBatchNorm2dFn,
    SparseConv2dFn,
    SparseLinearFn,
    is_nonnegative,
    mark_nonnegative,
)
from leanseg.models.layers import WSConv2d


class BackRazorMixin:
    """Marks a BackRazor layer; ``backrazor_ratio`` is the fraction of saved entries pruned.

    ``backrazor_value_dtype`` stores the kept values narrower (float16 / bfloat16; None: the
    activation's dtype).
    """

    backrazor_ratio: float = 0.0
    backrazor_value_dtype: torch.dtype | None = None

    def _sparse_active(self, x: Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled()):  # type: ignore[attr-defined]
            return False
        params = self.parameters(recurse=False)  # type: ignore[attr-defined]
        return x.requires_grad or any(p.requires_grad for p in params)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backrazor_ratio={self.backrazor_ratio}"  # type: ignore[misc]


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast like autocast would for conv / linear, outside the Function so autograd sees it.

    Parameters stay as they are: the Functions cast them for the kernels and save the
    parameter itself, not a low-precision copy of it (which would be kept for backward).
    """
    first = tensors[0]
    assert first is not None
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype)
        if t is not None and t.is_floating_point() and not isinstance(t, nn.Parameter)
        else t
        for t in tensors
    )


def _int_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as two ints, or None where it cannot be (asymmetric "same")."""
    if not isinstance(conv.padding, str):
        return conv.padding  # type: ignore[return-value]
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


class _SparseConvBase(BackRazorMixin):
    def _weight(self) -> Tensor:
        return self.weight  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        conv: nn.Conv2d = self  # type: ignore[assignment]
        padding = _int_padding(conv)
        if not self._sparse_active(x) or padding is None:
            return super().forward(x)  # type: ignore[misc]
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        x, weight, bias = _autocast(x, self._weight(), conv.bias)
        return SparseConv2dFn.apply(
            x,
            weight,
            bias,
            self.backrazor_ratio,
            self.backrazor_value_dtype,
            conv.stride,
            padding,
            conv.dilation,
            conv.groups,
        )


class SparseConv2d(_SparseConvBase, nn.Conv2d):
    """``nn.Conv2d`` whose training backward uses a sparsified saved input."""


class SparseWSConv2d(_SparseConvBase, WSConv2d):
    """:class:`WSConv2d`; the weight is standardised with autograd, outside the Function."""

    def _weight(self) -> Tensor:
        return self.standardized_weight()


class SparseLinear(BackRazorMixin, nn.Linear):
    """``nn.Linear`` whose training backward uses a sparsified saved input."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._sparse_active(x):
            return super().forward(x)
        x, weight, bias = _autocast(x, self.weight, self.bias)
        return SparseLinearFn.apply(
            x, weight, bias, self.backrazor_ratio, self.backrazor_value_dtype
        )


class SparseBatchNorm2d(BackRazorMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d``; in training mode the backward uses a sparsified saved input."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._sparse_active(x):
            return super().forward(x)
        self._check_input_dim(x)
        # the momentum / num_batches_tracked logic of torch's _BatchNorm.forward (training)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if x.numel() // x.shape[1] <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        return SparseBatchNorm2dFn.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            momentum,
            self.eps,
            self.backrazor_ratio,
            self.backrazor_value_dtype,
        )


class FrozenStatsBatchNorm2d(BackRazorMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` frozen for fine-tuning (backrazor.md section 10, BN mode ``frozen``).

    Training uses the running statistics, which stay as they are, and the affine parameters are
    frozen (``apply`` turns their ``requires_grad`` off): ``y = x * scale + shift`` with constant
    ``scale`` and ``shift``, so nothing of ``x`` is saved and dX = dY * scale is exact. Eval mode
    runs the stock forward, which computes the same thing.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = shift + self.bias
        view = (1, -1, 1, 1)
        return x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view)

    def extra_repr(self) -> str:
        return nn.BatchNorm2d.extra_repr(self) + ", frozen statistics and affine"


class PackedReLU(BackRazorMixin, nn.ReLU):
    """``nn.ReLU`` saving a 1-bit mask; always out of place while training (exact gradient)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._sparse_active(x):
            return super().forward(x)
        return mark_nonnegative(PackedReLUFn.apply(x, None))

    def extra_repr(self) -> str:
        return nn.ReLU.extra_repr(self) + ", packed 1-bit mask"


class PackedReLU6(BackRazorMixin, nn.ReLU6):
    """``nn.ReLU6`` saving a 1-bit mask; always out of place while training (exact gradient)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._sparse_active(x):
            return super().forward(x)
        return mark_nonnegative(PackedReLUFn.apply(x, 6.0))

    def extra_repr(self) -> str:
        return nn.ReLU6.extra_repr(self) + ", packed 1-bit mask"


class PackedMaxPool2d(BackRazorMixin, nn.MaxPool2d):
    """``nn.MaxPool2d`` saving one byte per output (the argmax's place in its window); exact."""

    def forward(self, x: Tensor) -> Tensor:
        kernel, stride, padding, dilation = (
            _pair(v)
            for v in (
                self.kernel_size,
                self.stride or self.kernel_size,
                self.padding,
                self.dilation,
            )
        )
        if self.return_indices or kernel[0] * kernel[1] > 256 or not self._sparse_active(x):
            return super().forward(x)
        out = PackedMaxPool2dFn.apply(x, kernel, stride, padding, dilation, self.ceil_mode)
        return mark_nonnegative(out) if is_nonnegative(x) else out

    def extra_repr(self) -> str:
        return nn.MaxPool2d.extra_repr(self) + ", saves 1-byte argmax offsets"


# exact stock type -> BackRazor subclass (subclasses of the stock types are left alone)
SPARSE_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: SparseConv2d,
    WSConv2d: SparseWSConv2d,
    nn.Linear: SparseLinear,
    nn.BatchNorm2d: SparseBatchNorm2d,
    nn.ReLU: PackedReLU,
    nn.ReLU6: PackedReLU6,
    nn.MaxPool2d: PackedMaxPool2d,
}
STOCK_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    **{v: k for k, v in SPARSE_TYPES.items()},
    FrozenStatsBatchNorm2d: nn.BatchNorm2d,
}
# BatchNorm2d handling, the ``bn`` argument of ``apply`` (backrazor.md section 10)
BN_TYPES: dict[str, type[nn.Module]] = {
    "sparse": SparseBatchNorm2d,
    "dense": nn.BatchNorm2d,
    "frozen": FrozenStatsBatchNorm2d,
}
