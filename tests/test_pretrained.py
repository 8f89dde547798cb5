"""load_pretrained: torchvision / semseg / vgg16 checkpoints built from our own backbones."""

from __future__ import annotations

import pytest
import torch

from leanseg import CheckpointError, build_model, load_pretrained
from leanseg.models.backbones import build_backbone
from leanseg.models.pretrained import vgg16_to_vgg16_bn

# conv indices in torchvision's vgg16.features and vgg16_bn.features
PLAIN_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
BN_CONVS = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)


def _randomised(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Different values of the same shapes (as a trained checkpoint would hold)."""
    torch.manual_seed(1)
    return {
        k: torch.randn(v.shape) if v.is_floating_point() else v.clone()
        for k, v in state_dict.items()
    }


def _save(path, payload) -> str:
    torch.save(payload, path)
    return str(path)


def _assert_landed(module: torch.nn.Module, checkpoint: dict[str, torch.Tensor], keys) -> None:
    own = module.state_dict()
    for key in keys:
        assert torch.equal(own[key], checkpoint[key]), key


def test_torchvision_resnet_nested_with_module_prefix(tmp_path):
    checkpoint = _randomised(build_backbone("resnet18", width_mult=0.25).state_dict())
    checkpoint |= {"fc.weight": torch.randn(1000, 128), "fc.bias": torch.randn(1000)}
    payload = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in checkpoint.items()}}
    path = _save(tmp_path / "resnet18.pth", payload)
    model = build_model("deeplabv3plus_resnet18", 4, width_mult=0.25, aux=True)
    head_before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    report = load_pretrained(model, path)
    assert report.target == "backbone" and not report.missing and not report.unexpected
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.mismatched
    assert len(report.loaded) == len(model.backbone.state_dict())
    _assert_landed(model.backbone, checkpoint, report.loaded)
    for key, value in model.classifier.state_dict().items():  # the head is left alone
        assert torch.equal(value, head_before[key])
    summary = report.summary()
    assert "\n" not in summary and "resnet18.pth" in summary and "2 classifier keys" in summary


def test_torchvision_mobilenetv2_under_model_key(tmp_path):
    checkpoint = _randomised(build_backbone("mobilenetv2", width_mult=0.5).state_dict())
    del checkpoint["features.1.conv.0.0.weight"]  # one missing tensor is reported
    checkpoint |= {"features.18.0.weight": torch.randn(1280, 160, 1, 1)}
    checkpoint |= {"classifier.1.weight": torch.randn(1000, 1280)}
    path = _save(tmp_path / "mnv2.pth", {"model": checkpoint})
    model = build_model("deeplabv3_mobilenetv2", 3, width_mult=0.5)
    report = load_pretrained(model, path)
    assert report.missing == ["features.1.conv.0.0.weight"]
    assert sorted(report.ignored) == ["classifier.1.weight", "features.18.0.weight"]
    _assert_landed(model.backbone, checkpoint, report.loaded)
    assert "1 missing (features.1.conv.0.0.weight)" in report.summary()


def test_semseg_deep_stem_into_pspnet(tmp_path):
    backbone = build_backbone("resnet50_deep_stem", width_mult=0.125)
    checkpoint = {  # semseg's resnet50_v2.pth predates num_batches_tracked
        k: v for k, v in _randomised(backbone.state_dict()).items() if "num_batches" not in k
    }
    checkpoint |= {"fc.weight": torch.randn(1000, 256), "fc.bias": torch.randn(1000)}
    path = _save(tmp_path / "resnet50_v2.pth", checkpoint)
    model = build_model("pspnet50", 21, width_mult=0.125)
    report = load_pretrained(model, path)
    assert report.target == "backbone" and not report.missing and not report.unexpected
    assert len(report.loaded) == len(checkpoint) - 2
    _assert_landed(model.backbone, checkpoint, report.loaded)


def test_torchvision_vgg16_into_segnet_encoder(tmp_path):
    model = build_model("segnet", 5, width_mult=0.125)
    encoder = _randomised(model.backbone.state_dict())
    convs = [f"features.{i}.{p}" for i in BN_CONVS for p in ("weight", "bias")]
    checkpoint = {plain: encoder[bn] for plain, bn in zip(_plain_keys(), convs, strict=True)}
    checkpoint |= {"classifier.0.weight": torch.randn(8, 16)}  # torchvision vgg16 names
    report = load_pretrained(model, _save(tmp_path / "vgg16.pth", checkpoint))
    assert report.loaded == convs and report.ignored == ["classifier.0.weight"]
    assert not report.unexpected and not report.mismatched
    norms = [k for k in encoder if k not in convs and "num_batches" not in k]
    assert report.missing == norms  # fresh BN layers, as in acosp
    _assert_landed(model.backbone, encoder, report.loaded)
    report = load_pretrained(model, _save(tmp_path / "vgg16_bn.pth", encoder))  # by name
    assert len(report.loaded) == len(encoder) and not report.missing


def _plain_keys() -> list[str]:
    return [f"features.{i}.{p}" for i in PLAIN_CONVS for p in ("weight", "bias")]


def test_vgg16_key_mapping():
    renamed = vgg16_to_vgg16_bn({k: torch.zeros(1) for k in _plain_keys() + ["classifier.6.bias"]})
    expected = [f"features.{i}.{p}" for i in BN_CONVS for p in ("weight", "bias")]
    assert list(renamed) == expected + ["classifier.6.bias"]


def test_mismatches_and_full_model_checkpoints(tmp_path):
    checkpoint = _randomised(build_backbone("resnet18", width_mult=0.25).state_dict())
    model = build_model("resnet18_cifar", 10, width_mult=0.25, norm="gn_ws")
    report = load_pretrained(model, _save(tmp_path / "r18.pth", checkpoint))
    assert report.mismatched == ["conv1.weight: file (16, 3, 7, 7) vs (16, 3, 3, 3) in the model"]
    stats = [k for k in checkpoint if k.endswith(("running_mean", "running_var", "tracked"))]
    assert report.unexpected == stats  # GN has no running statistics
    full = _randomised(model.state_dict())
    report = load_pretrained(model, _save(tmp_path / "full.pth", {"state_dict": full}))
    assert report.target == "model" and len(report.loaded) == len(full) and not report.missing
    _assert_landed(model, full, full)


def test_errors_name_the_file(tmp_path):
    model = build_model("resnet18_cifar", 10, width_mult=0.125)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    foreign = _save(tmp_path / "foreign.pth", {"encoder.weight": torch.zeros(3)})
    empty = _save(tmp_path / "empty.pth", {"state_dict": {"epoch": 1}})
    code = _save(tmp_path / "code.pth", {"state_dict": torch.nn.Linear(2, 2)})
    for path in (tmp_path / "missing.pth", garbage, foreign, empty, code):
        with pytest.raises(CheckpointError) as info:
            load_pretrained(model, path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
