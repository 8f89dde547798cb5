"""norm="gn_ws": GroupNorm + weight-standardised convs everywhere but the final classifiers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseg import ConfigError, build_model, list_models
from leanseg.models import model_options
from leanseg.models.layers import WSConv2d, group_norm, make_conv_layer, make_norm_layer

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
NUM_CLASSES = 7  # no conv but a classifier has 7 output channels


def test_ws_conv_standardises_each_filter():
    torch.manual_seed(0)
    conv = WSConv2d(6, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.1, 1.0, 5.0, 20.0]).view(4, 1, 1, 1)).add_(3.0)
    weight = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(weight.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    raw = conv.weight.flatten(1)  # the formula of deeplab.md 1.5, unbiased std
    raw_std = raw.std(1)  # unit std up to eps = 1e-5
    torch.testing.assert_close(weight.std(1), raw_std / (raw_std + 1e-5))
    torch.testing.assert_close(weight.std(1)[1:], torch.ones(3), atol=1e-3, rtol=0)
    expected = (raw - raw.mean(1, keepdim=True)) / (raw.std(1, unbiased=True, keepdim=True) + 1e-5)
    torch.testing.assert_close(weight, expected)
    x = torch.randn(2, 6, 5, 7)
    reference = F.conv2d(x, expected.view_as(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), reference)
    assert list(conv.state_dict()) == list(nn.Conv2d(6, 4, 3).state_dict())


def test_norm_factories():
    assert make_norm_layer("bn") is nn.BatchNorm2d and make_conv_layer("bn") is nn.Conv2d
    assert make_conv_layer("gn_ws") is WSConv2d
    assert [(g.num_groups, g.num_channels) for g in map(group_norm, (64, 24, 16, 144))] == [
        (32, 64),
        (8, 24),
        (16, 16),
        (16, 144),
    ]
    for bad in ("gn", "BN", ""):
        with pytest.raises(ConfigError, match="norm"):
            make_conv_layer(bad)


@pytest.mark.parametrize("name", [n for n in list_models() if "norm" in model_options(n)])
def test_gn_ws_models(name):
    with torch.device("meta"):
        model = build_model(name, NUM_CLASSES, norm="gn_ws")
        reference = build_model(name, NUM_CLASSES)
    modules = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    convs = {k: type(m) for k, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plain = [k for k, kind in convs.items() if kind is not WSConv2d]
    assert all(convs[k] is nn.Conv2d for k in plain)
    assert all(model.get_submodule(k).out_channels == NUM_CLASSES for k in plain)  # classifiers
    assert len(plain) <= (2 if getattr(model, "aux_classifier", None) is not None else 1)
    assert len(convs) - len(plain) > 10
    keys = [k for k in reference.state_dict() if not k.endswith(BUFFERS)]
    assert list(model.state_dict()) == keys  # same keys as BN, minus the running statistics
