"""DeepLabV3/V3+ models: torchvision layout, shared forward/backward/save-load tests, options."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from leanseg import ConfigError, build_model, list_models
from leanseg.models.backbones import build_backbone
from leanseg.models.deeplab import DeepLabV3
from tests.helpers import OutLogits

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
DEEPLAB_MODELS = [
    f"{arch}_{backbone}"
    for arch in ("deeplabv3", "deeplabv3plus")
    for backbone in ("resnet18", "resnet50", "resnet101", "mobilenetv2")
]

# Fingerprints of shared/reference/torchvision_*.json (key order and shapes), so the layout tests
# run without the reference files; with the files present they are also compared key by key.
# name -> (reference file, dropped key prefixes, number of keys, sha256[:16], parameter count)
REFERENCE = {
    "resnet18": ("resnet18", ("fc.",), 120, "3e41db4eb3bc5ae8", 11176512),
    "resnet50": ("resnet50", ("fc.",), 318, "3fd989592177b1c7", 23508032),
    "resnet101": ("resnet101", ("fc.",), 624, "ae2a783082f291ca", 42500160),
    "mobilenetv2": (
        "mobilenet_v2",
        ("features.18.", "classifier."),
        306,
        "d40ad88e30d05d8e",
        1811712,
    ),
    "deeplabv3_resnet50_aux": (
        "deeplabv3_resnet50_aux_21cls",
        (),
        370,
        "92bcc20e8ff09729",
        42004074,
    ),
    "deeplabv3_resnet101": ("deeplabv3_resnet101_21cls", (), 668, "6f7b2c77b70ef852", 58630997),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_dir() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("LEANSEG_REFERENCE_DIR", ""), root / "tests/data/reference"]
    candidates += [root.parent / "shared/reference"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


def _layout(state_dict: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in state_dict.items()]


def _fingerprint(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    text = "\n".join(f"{key} {shape}" for key, shape in layout)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_layout(name: str, model: nn.Module) -> None:
    file, drop, num_keys, fingerprint, num_params = REFERENCE[name]
    layout = _layout(model.state_dict())
    ref_dir = _reference_dir()
    if ref_dir is not None:  # readable diff first, when the reference files are at hand
        keys = json.loads((ref_dir / f"torchvision_{file}.json").read_text())["keys"]
        expected = [(k, tuple(s)) for k, s in keys.items() if not (drop and k.startswith(drop))]
        assert layout == expected
        assert _fingerprint(expected) == fingerprint
    assert len(layout) == num_keys
    assert _fingerprint(layout) == fingerprint
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert num_params == sum(math.prod(s) for k, s in layout if not k.endswith(BUFFERS))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "mobilenetv2"])
def test_backbone_layout_matches_torchvision(name):
    with torch.device("meta"):
        _check_layout(name, build_backbone(name))


@pytest.mark.parametrize(
    ("ref", "name", "options"),
    [
        ("deeplabv3_resnet50_aux", "deeplabv3_resnet50", {"aux": True}),
        ("deeplabv3_resnet101", "deeplabv3_resnet101", {}),
    ],
)
def test_deeplabv3_layout_matches_torchvision(ref, name, options):
    with torch.device("meta"):
        _check_layout(ref, build_model(name, 21, output_stride=8, **options))


def test_all_deeplab_models_registered():
    assert set(DEEPLAB_MODELS) <= set(list_models())


# ------------------------------------------------------------- every registered model

# Every registered model, plus option variants whose code paths differ (norm, legacy head).
VARIANTS = [(name, {}) for name in list_models()] + [
    ("deeplabv3plus_mobilenetv2", {"norm": "gn_ws"}),  # GroupNorm with gcd(32, C) groups
    ("deeplabv3_resnet18", {"norm": "gn_ws", "width_mult": 0.5, "channels": 64}),
    ("pspnet50", {"norm": "gn_ws", "width_mult": 0.25}),
    ("segnet", {"legacy_head": True, "width_mult": 0.5}),
]
VARIANT_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in VARIANTS]
EXPORTED = [v for v in VARIANTS if not v[1] or v[0] in ("deeplabv3_resnet18", "segnet")]
EXPORTED_IDS = [i for i, v in zip(VARIANT_IDS, VARIANTS, strict=True) if v in EXPORTED]
CLASSIFIERS = {"resnet18_cifar"}  # image classification: logits (N, K), 32x32 inputs


def _input_size(name: str) -> tuple[int, int]:
    """Odd, non-square sizes for segmentation models."""
    if name.startswith("pspnet"):  # (H - 1) % 8 == 0; a 6x12 feature map fits every PPM bin,
        return 41, 89  # which ONNX export needs (no adaptive pooling in ONNX)
    if name == "segnet":  # odd sizes at the first and last pools
        return 49, 35
    return (32, 32) if name in CLASSIFIERS else (97, 75)


def _build(name: str, options: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = dict(options or {})
    if name.startswith("deeplab") and "resnet" in name:
        options.setdefault("aux", True)
    return build_model(name, 5, **options)


def _logits_shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, 5) if name in CLASSIFIERS else (batch, 5, *_input_size(name))


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_train_forward_backward(name, options):
    model = _build(name, options)
    aux = getattr(model, "aux_classifier", None) is not None
    model.train()
    x = torch.randn(2, 3, *_input_size(name))
    out = model(x)
    assert set(out) == ({"out", "aux"} if aux else {"out"})
    for logits in out.values():
        assert logits.shape == _logits_shape(name, 2)
    sum(logits.square().mean() for logits in out.values()).backward()
    for key, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    first_backbone_param = next(model.backbone.parameters())  # stem conv: gradient reaches it
    assert first_backbone_param.grad.abs().sum() > 0
    backbone = {id(p) for p in model.backbone.parameters()}
    first_head_param = next(p for p in model.parameters() if id(p) not in backbone)
    assert first_head_param.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_eval_output_and_state_dict_round_trip(name, options):
    model = _build(name, options)
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"}
    assert out["out"].shape == _logits_shape(name, 1)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    with torch.device("meta"):  # anything not restored stays on "meta" and fails the forward
        other = _build(name, options)
    other.load_state_dict(torch.load(buffer, weights_only=True), assign=True)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x)["out"], out["out"])


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # group_norm's batch check
@pytest.mark.parametrize(("name", "options"), EXPORTED, ids=EXPORTED_IDS)
def test_onnx_export_matches_pytorch(name, options):
    pytest.importorskip("onnx", reason="the ONNX export test needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export test needs onnxruntime")
    # Quarter width: the same graph with 16x fewer weights to serialise.
    model = OutLogits(_build(name, {"width_mult": 0.25, **options})).eval()
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (x,), buffer, dynamo=False, input_names=["image"], output_names=["logits"]
    )
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = session_options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        buffer.getvalue(), session_options, providers=["CPUExecutionProvider"]
    )
    (result,) = session.run(None, {"image": x.numpy()})
    # within 1e-4 of the logits' scale, which random weights make anything from 1e-6 to 1e2
    # (measured: ~1e-6, as far as PyTorch float32 is from float64)
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(torch.from_numpy(result), expected, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", list_models())
def test_backbone_and_head_parameters_partition_the_model(name):
    with torch.device("meta"):
        model = build_model(name, 3)
    backbone = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone]
    assert backbone and head
    assert len(backbone) + len(head) == len(list(model.parameters()))


# ------------------------------------------------------------------- output stride


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "mobilenetv2"])
def test_backbone_output_stride(name, output_stride):
    torch.manual_seed(0)
    backbone = build_backbone(name, output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 49))
    assert features["low"].shape[1:] == (backbone.low_channels, 17, 13)
    size = (math.ceil(65 / output_stride), math.ceil(49 / output_stride))
    assert features["out"].shape[1:] == (backbone.out_channels, *size)
    if name == "mobilenetv2":
        assert "aux" not in features and backbone.aux_channels is None
    else:
        assert features["aux"].shape[1] == backbone.aux_channels


def _dilations(layer: nn.Sequential) -> list[int]:
    return [block.conv2.dilation[0] for block in layer]


@pytest.mark.parametrize(
    ("output_stride", "multi_grid", "layer3", "layer4"),
    [
        (16, None, [1] * 6, [1, 2, 2]),
        (8, None, [1] + [2] * 5, [2, 4, 4]),
        (16, (1, 2, 4), [1] * 6, [2, 4, 8]),
        (8, (1, 2, 4), [1] + [2] * 5, [4, 8, 16]),
    ],
)
def test_resnet_dilation_convention(output_stride, multi_grid, layer3, layer4):
    with torch.device("meta"):
        net = build_backbone("resnet50", output_stride=output_stride, multi_grid=multi_grid)
    assert _dilations(net.layer3) == layer3
    assert _dilations(net.layer4) == layer4
    assert net.layer4[0].conv2.stride == (1, 1)
    assert net.layer4[0].downsample[0].stride == (1, 1)
    assert net.layer3[0].downsample[0].stride == ((1, 1) if output_stride == 8 else (2, 2))


@pytest.mark.parametrize(
    ("output_stride", "expected"),
    [
        (16, {7: (2, 1), 8: (1, 1), 14: (1, 1), 15: (1, 2), 17: (1, 2)}),
        (8, {7: (1, 1), 8: (1, 2), 11: (1, 2), 14: (1, 2), 15: (1, 4), 17: (1, 4)}),
    ],
)
def test_mobilenetv2_dilation(output_stride, expected):
    with torch.device("meta"):
        net = build_backbone("mobilenetv2", output_stride=output_stride)
    for index, (stride, dilation) in expected.items():
        depthwise = net.features[index].conv[1][0]
        assert (depthwise.stride[0], depthwise.dilation[0]) == (stride, dilation), index
        assert depthwise.padding[0] == dilation


@pytest.mark.parametrize(
    ("name", "options", "rates"),
    [
        ("deeplabv3_resnet18", {"output_stride": 16}, (6, 12, 18)),
        ("deeplabv3_resnet18", {"output_stride": 8}, (12, 24, 36)),
        ("deeplabv3plus_mobilenetv2", {"output_stride": 8}, (12, 24, 36)),
        ("deeplabv3plus_mobilenetv2", {"aspp_rates": (3, 5, 7)}, (3, 5, 7)),
    ],
)
def test_aspp_rates(name, options, rates):
    with torch.device("meta"):
        model = build_model(name, 3, **options)
    aspp = model.classifier.aspp if "plus" in name else model.classifier[0]
    assert tuple(branch[0].dilation[0] for branch in aspp.convs[1:4]) == rates
    assert model.backbone.output_stride == options.get("output_stride", 16)


# ------------------------------------------------------------------------- options


def test_head_conv_off_and_head_init():
    torch.manual_seed(0)
    model = build_model("deeplabv3_mobilenetv2", 4, head_conv=False, channels=64)
    assert len(model.classifier) == 2
    assert model.classifier[1].weight.shape == (4, 64, 1, 1)
    kaiming_std = math.sqrt(2 / (64 * 5))  # ASPP project: 1x1 conv over 5 * 64 channels
    assert model.classifier[0].project[0].weight.std().item() == pytest.approx(kaiming_std, rel=0.1)
    assert torch.equal(model.classifier[0].project[1].weight, torch.ones(64))


def test_mobilenetv2_width_mult():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_mobilenetv2", 3, width_mult=0.5).eval()
    assert (model.backbone.low_channels, model.backbone.out_channels) == (16, 160)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 31))["out"].shape == (1, 3, 33, 31)


@pytest.mark.parametrize(
    ("name", "options", "names_option"),
    [
        ("deeplabv3_resnet50", {"output_stride": 32}, "output_stride"),
        ("deeplabv3plus_resnet18", {"output_stride": 4}, "output_stride"),
        ("deeplabv3_mobilenetv2", {"aux": True}, "aux"),
        ("deeplabv3plus_mobilenetv2", {"aux": True}, "aux"),
        ("deeplabv3_resnet18", {"colour": "red"}, "colour"),
        ("deeplabv3_resnet18", {"aspp_rates": (6, 12)}, "aspp_rates"),
        ("deeplabv3_resnet18", {"norm": "gn"}, "norm"),
        ("deeplabv3_resnet18", {"multi_grid": (1, 2, 4)}, "multi_grid"),  # 2 blocks in layer4
        ("deeplabv3_resnet50", {"aspp_dropout": 1.5}, "aspp_dropout"),
    ],
)
def test_bad_options_raise_config_error(name, options, names_option):
    with torch.device("meta"), pytest.raises(ConfigError) as info:
        build_model(name, 3, **options)
    message = str(info.value)
    assert names_option in message and "\n" not in message


def test_aux_head_needs_resnet_backbone():
    with torch.device("meta"):
        backbone = build_backbone("mobilenetv2", output_stride=16)
        with pytest.raises(ConfigError, match="aux"):
            DeepLabV3(backbone, 3, aux=True)
