"""PSPNet (deep-stem ResNet), SegNet and CIFAR ResNet-18 against their reference layouts.

Shapes are checked on the meta device; the few real forwards use tiny widths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseg import ConfigError, build_model
from leanseg.models import model_options
from leanseg.models.backbones import build_backbone
from leanseg.models.layers import ConvNormAct
from leanseg.models.segnet import max_unpool2d

META = torch.device("meta")


def _semseg_stem_keys() -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = []
    for i in (1, 2, 3):
        keys += [f"conv{i}.weight"] + [f"bn{i}.{k}" for k in bn]
    return keys


@pytest.mark.parametrize(
    ("name", "blocks", "num_keys"),
    [("resnet50_deep_stem", (3, 4, 6, 3), 330), ("resnet101_deep_stem", (3, 4, 23, 3), 636)],
)
def test_deep_stem_resnet_follows_semseg(name, blocks, num_keys):
    with META:
        net = build_backbone(name)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == list(blocks)
    assert (net.conv1.weight.shape, net.conv1.stride) == ((64, 3, 3, 3), (2, 2))
    assert net.conv2.weight.shape == (64, 64, 3, 3) and net.conv3.weight.shape == (128, 64, 3, 3)
    assert net.layer1[0].conv1.in_channels == net.layer1[0].downsample[0].in_channels == 128
    for layer, rate in ((net.layer3, 2), (net.layer4, 4)):  # every block, no first-block rule
        assert [(b.conv2.dilation[0], b.conv2.padding[0]) for b in layer] == [(rate, rate)] * len(
            layer
        )
        assert all(b.conv2.stride == (1, 1) for b in layer)
        assert layer[0].downsample[0].stride == (1, 1)
    keys = list(net.state_dict())  # semseg's resnet.py names, so resnet50_v2.pth maps
    assert keys[:18] == _semseg_stem_keys() and keys[18].startswith("layer1.0.conv1")
    assert len(keys) == num_keys and not any(k.startswith("fc.") for k in keys)
    features = net(torch.empty(1, 3, 65, 49, device=META))
    assert features["out"].shape == (1, 2048, 9, 7) and features["aux"].shape == (1, 1024, 9, 7)
    assert features["low"].shape == (1, 256, 17, 13) and net.output_stride == 8


def test_pspnet_follows_semseg():
    with META:
        model = build_model("pspnet50", 21)
    ppm, cls, aux = model.classifier[0], model.classifier[1:], model.aux_classifier
    assert [branch[0].output_size for branch in ppm.features] == [1, 2, 3, 6]
    for branch in ppm.features:
        assert branch[1].weight.shape == (512, 2048, 1, 1) and branch[1].bias is None
    assert cls[0].weight.shape == (512, 4096, 3, 3) and cls[0].bias is None
    assert aux[0].weight.shape == (256, 1024, 3, 3) and aux[0].bias is None
    for head in (cls, aux):
        assert isinstance(head[3], nn.Dropout2d) and head[3].p == 0.1
        assert head[4].weight.shape[:2] == (21, head[0].out_channels)
    assert model.backbone.output_stride == 8
    out = model.train()(torch.empty(2, 3, 473, 473, device=META))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "out": (2, 21, 473, 473),
        "aux": (2, 21, 473, 473),
    }
    with META:
        plain = build_model("pspnet101", 3, aux=False, dropout=0.3)
    assert plain.aux_classifier is None and plain.classifier[4].p == 0.3
    assert len(plain.backbone.layer3) == 23


def test_pspnet_upsamples_with_align_corners():
    torch.manual_seed(0)
    model = build_model("pspnet50", 3, width_mult=0.125, aux=False).eval()
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        logits = model.classifier(model.backbone(x)["out"])
        expected = F.interpolate(logits, size=(41, 57), mode="bilinear", align_corners=True)
        assert torch.equal(model(x)["out"], expected)


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (5, 4)])
def test_max_unpool2d_equals_torch(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    y = torch.randn_like(pooled, requires_grad=True)
    ours = max_unpool2d(y, indices, size)
    reference = F.max_unpool2d(y, indices, 2, 2, output_size=size)
    assert torch.equal(ours, reference)
    weights = torch.randn_like(reference)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), y)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), y)
    assert torch.equal(grad_ours, grad_reference)


def test_segnet_layout():
    with META:
        model = build_model("segnet", 11)
    features = model.backbone.features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # torchvision vgg16_bn
    assert all(features[i].bias is not None and features[i].kernel_size == (3, 3) for i in convs)
    assert all(isinstance(features[i + 1], nn.BatchNorm2d) for i in convs)
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    assert pools == [6, 13, 23, 33, 43] and all(features[i].return_indices for i in pools)
    stacks = [[(cbr[0].in_channels, cbr[0].out_channels) for cbr in s] for s in model.decoder]
    assert stacks == [
        [(512, 512)] * 3,
        [(512, 512), (512, 512), (512, 256)],
        [(256, 256), (256, 256), (256, 128)],
        [(128, 128), (128, 64)],
        [(64, 64)],
    ]
    assert all(cbr[0].bias is not None for stack in model.decoder for cbr in stack)
    assert type(model.classifier) is nn.Conv2d and model.classifier.weight.shape == (11, 64, 3, 3)
    out = model(torch.empty(2, 3, 360, 480, device=META))  # CamVid size, 45 -> 22 at pool 4
    assert out["out"].shape == (2, 11, 360, 480)


def test_segnet_legacy_head_keeps_bn_and_relu():
    torch.manual_seed(0)
    model = build_model("segnet", 4, legacy_head=True, width_mult=0.125).eval()
    assert isinstance(model.classifier, ConvNormAct)
    assert isinstance(model.classifier[1], nn.BatchNorm2d)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 33, 47))["out"]
    assert logits.shape == (1, 4, 33, 47) and (logits >= 0).all()


def test_cifar_resnet18():
    with META:
        model = build_model("resnet18_cifar", 10)
    backbone = model.backbone
    assert (backbone.conv1.weight.shape, backbone.conv1.stride) == ((64, 3, 3, 3), (1, 1))
    assert isinstance(backbone.maxpool, nn.Identity) and backbone.output_stride == 8
    assert [backbone.layer4[0].conv1.out_channels, model.fc.weight.shape] == [512, (10, 512)]
    assert backbone(torch.empty(2, 3, 32, 32, device=META))["out"].shape == (2, 512, 4, 4)
    assert model(torch.empty(2, 3, 32, 32, device=META))["out"].shape == (2, 10)


def test_model_options_and_bad_options():
    assert model_options("pspnet50") == {
        "aux": True,
        "norm": "bn",
        "width_mult": 1.0,
        "dropout": 0.1,
    }
    assert model_options("segnet") == {"legacy_head": False, "norm": "bn", "width_mult": 1.0}
    assert model_options("resnet18_cifar") == {"norm": "bn", "width_mult": 1.0}
    for name, options, names in [
        ("pspnet50", {"output_stride": 16}, "output_stride"),
        ("pspnet101", {"dropout": 1.5}, "dropout"),
        ("segnet", {"aux": True}, "aux"),
        ("segnet", {"norm": "gn"}, "norm"),
        ("segnet", {"width_mult": 0}, "width_mult"),
        ("resnet18_cifar", {"colour": "red"}, "colour"),
        ("resnet18_cifar", {"num_classes": 0}, "num_classes"),
    ]:
        with META, pytest.raises(ConfigError) as info:
            build_model(name, **{"num_classes": 3, **options})
        assert names in str(info.value) and "\n" not in str(info.value)
