"""FLOP counting with ``torch.utils.flop_counter``, corrected for grouped convolutions.

torch's formula for ``convolution_backward`` counts the weight gradient of a grouped
(e.g. depthwise) convolution as if it were dense, over-counting it by the number of groups
(torch 2.13). Here each backward output (grad input, grad weight) costs exactly what the
forward convolution costs, which holds for any ``groups``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    *args: object,
    **kwargs: object,
) -> int:
    """Each requested gradient (input, weight) costs what the forward conv costs."""
    transposed, output_mask = args[4], args[7]  # after bias, stride, padding, dilation
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, bool(transposed))
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with the grouped-convolution fix."""
    return FlopCounterMode(
        display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop}
    )


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-adds x 2) that ``fn()`` runs, forward and backward."""
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()
