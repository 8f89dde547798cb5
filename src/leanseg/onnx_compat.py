"""Eval modules the ONNX exporter refuses, rewritten as the same computation it accepts.

``nn.AdaptiveAvgPool2d`` exports (as ``AveragePool``) only where the output size divides the
input size; PSPNet's bins 3 and 6 on the 64 x 64 map of a 512 x 512 image do not.
:func:`exportable` swaps such pools for :class:`SlicedAdaptiveAvgPool2d`, which averages
PyTorch's own bins with slices and means. Shapes are baked in, so this is for fixed-size
exports only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SlicedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as Slice / ReduceMean / Concat where its bins are uneven.

    PyTorch's bin ``i`` of ``o`` over ``n`` rows spans ``floor(i * n / o)`` to
    ``ceil((i + 1) * n / o)``; averaging those slices gives the same values (up to float
    rounding). Where the output size divides the input it is the plain pool.
    """

    def __init__(self, output_size: Any) -> None:
        super().__init__()
        size = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
        self.output_size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = (int(n) for n in x.shape[-2:])  # constants in the export
        oh, ow = (n if n is not None else m for n, m in zip(self.output_size, (h, w), strict=True))
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        bins_h = [(i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh)]
        bins_w = [(j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow)]
        rows = [
            torch.cat([x[..., a:b, c:d].mean((-2, -1), True) for c, d in bins_w], dim=-1)
            for a, b in bins_h
        ]
        return torch.cat(rows, dim=-2)


def exportable(model: nn.Module) -> tuple[nn.Module, int]:
    """``model``, or an eval copy of it with every ``nn.AdaptiveAvgPool2d`` sliced, and how
    many pools were swapped (``model`` itself is never changed)."""
    if not any(type(m) is nn.AdaptiveAvgPool2d for m in model.modules()):
        return model, 0
    copied, swapped = copy.deepcopy(model).eval(), 0
    for parent in copied.modules():
        for key, child in parent._modules.items():
            if type(child) is nn.AdaptiveAvgPool2d:
                parent._modules[key] = SlicedAdaptiveAvgPool2d(child.output_size)
                swapped += 1
    return copied, swapped
