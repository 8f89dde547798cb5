"""fuse_bn: folded BatchNorm gives the unfused eval outputs, leaves the input model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanseg
from leanseg import build_model, fuse_bn, list_models
from leanseg.fuse import ChannelsLast
from leanseg.methods import acosp
from leanseg.models.layers import WSConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

# A training-only aux head is not called in eval: its BNs stay (pspnet's default aux=True).
UNFUSED_IN_EVAL = {"pspnet50": 1, "pspnet101": 1}


def _input(name: str = "", batch: int = 1) -> torch.Tensor:
    size = (33, 33) if name == "resnet18_cifar" else (65, 65)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, and conv biases."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.5)
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.normal_(0, 0.1)
    return model


def _build(name: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(build_model(name, 5, **{"width_mult": 0.25, **options}))


def _num_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _assert_same_outputs(fused: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = model.eval()(x), fused(x)
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
    else:
        expected, got = {"out": expected}, {"out": got}
    for key, value in expected.items():
        scale = value.abs().max().item()
        assert scale > 1e-2  # a non-trivial output
        assert got[key].is_contiguous()
        torch.testing.assert_close(got[key], value, atol=1e-5 * scale, rtol=1e-4)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_fuse_bn_is_exported():
    assert "fuse_bn" in leanseg.__all__ and leanseg.fuse_bn is fuse_bn


@pytest.mark.parametrize("name", list_models())
def test_fused_model_equals_unfused(name):
    model = _build(name).train()  # the mode of the input does not matter, nor is it changed
    before = _state(model)
    num_bn = _num_bn(model)
    x = _input(name)
    for channels_last in (True, False):
        fused = fuse_bn(model, channels_last=channels_last)
        assert model.training  # the original is untouched
        assert isinstance(fused, ChannelsLast) is channels_last
        assert not any(m.training for m in fused.modules())
        assert _num_bn(fused) == UNFUSED_IN_EVAL.get(name, 0) < num_bn
        _assert_same_outputs(fused, model, x)
        model.train()
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[key], value) for key, value in before.items())
    assert _num_bn(model) == num_bn


def test_channels_last_layout_inside_contiguous_outside():
    model = _build("deeplabv3_mobilenetv2")
    fused = fuse_bn(model)
    seen = []
    first = fused.module.backbone.features[0][0]
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = _input()
    _assert_same_outputs(fused, model, x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert first.weight.is_contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous()


def test_channels_last_wrapper_converts_4d_float_inputs_only():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return [x, {"t": (x,)}]

    wrapper = ChannelsLast(Probe())
    x = torch.randn(2, 3, 4, 5)
    out = wrapper(x)
    assert seen == [True] and out[0].is_contiguous() and out[1]["t"][0].is_contiguous()
    assert torch.equal(out[0], x)
    for other in (x.to(torch.int64), x[0]):  # integer, 3-D: passed as they are
        assert wrapper(other)[0] is other
    assert seen[1:] == [False, False]


@pytest.mark.parametrize(
    ("name", "options"),
    [("deeplabv3plus_mobilenetv2", {}), ("deeplabv3_resnet18", {"channels": 32})],
)
def test_group_norm_model_is_returned_equal(name, options):
    model = _build(name, norm="gn_ws", **options)
    fused = fuse_bn(model, channels_last=False)
    assert _num_bn(model) == 0
    assert sum(isinstance(m, WSConv2d) for m in fused.modules()) == sum(
        isinstance(m, WSConv2d) for m in model.modules()
    )
    fused_state, state = fused.state_dict(), model.state_dict()
    assert all(torch.equal(fused_state[key], value) for key, value in state.items())
    x = _input(batch=2)  # GroupNorm on the 1x1 image-pool branch needs more than one value
    _assert_same_outputs(fused, model, x)
    fused = fuse_bn(model)  # channels_last GroupNorm is inexact on CPU: not used
    assert not isinstance(fused, ChannelsLast)
    _assert_same_outputs(fused, model, x)


def test_ddd_crf_model():
    model = _build("deeplabv3_resnet18", channels=32, crf="ddd", crf_iters=2)
    fused = fuse_bn(model, example_input=_input())
    assert _num_bn(fused) == 0
    _assert_same_outputs(fused, model, _input())


@torch.no_grad()
def _masked(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 5, width_mult=0.25, channels=16)
    acosp.apply(model, 0.5)
    _randomise_bn(model)
    acosp.harden(model)
    return model.eval()


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenetv2"])
def test_acosp_masked_and_shrunk_models(name):
    masked = _masked(name)
    x = _input()
    fused = fuse_bn(masked)  # masked convs are hooked: they keep their BNs
    assert 0 < _num_bn(fused) <= _num_bn(masked)
    _assert_same_outputs(fused, masked, x)
    small = acosp.shrink(masked)
    fused = fuse_bn(small)
    assert _num_bn(fused) < _num_bn(small)
    _assert_same_outputs(fused, small, x)


class _TwoReaders(nn.Module):
    """conv -> bn with the conv's output also read by a residual add; a BN after an add; a conv
    called twice with one BN; a conv-> bn pair that does fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.shared, self.bn3 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv4, self.bn4 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv1(x)
        x = self.bn1(y) + y  # two readers of conv1's output
        x = self.bn2(self.conv2(x) + 1.0)  # the BN reads an add, not the conv
        x = self.bn3(self.shared(x)) + self.shared(x)  # conv called twice, one call to a BN
        return {"out": self.bn4(self.conv4(x))}


def test_conv_with_a_second_reader_is_not_folded():
    torch.manual_seed(0)
    model = _randomise_bn(_TwoReaders()).eval()
    fused = fuse_bn(model, channels_last=False)
    kept = {name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kept == {"bn1", "bn2", "bn3"}
    assert isinstance(fused.bn4, nn.Identity) and fused.conv4.bias is not None
    for name in ("conv1", "conv2", "shared"):
        assert torch.equal(getattr(fused, name).weight, getattr(model, name).weight)
    _assert_same_outputs(fused, model, _input())
    _assert_same_outputs(fuse_bn(model), model, _input())


def test_weight_standardised_conv_is_left_alone():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(WSConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    fused = fuse_bn(model, channels_last=False)
    assert isinstance(fused[1], nn.BatchNorm2d)
    _assert_same_outputs(fused, model, _input())
