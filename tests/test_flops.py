"""FLOP counts: forward + backward of a convolution cost 3x its forward, for any groups."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from leanseg.flops import count_flops


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_backward_is_twice_the_forward(groups, transposed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(16, 32, 3, padding=1, groups=groups)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 2 * 8 * 8 * 32 * (16 // groups) * 9
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_torch_overcounts_depthwise_weight_gradients():
    """Documents the torch bug this module works around; if it fails, torch fixed it."""
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() > count_flops(lambda: conv(x).sum().backward())
