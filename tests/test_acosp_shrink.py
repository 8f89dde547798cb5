"""ACoSP physical channel removal: exact outputs, smaller models, checkpoints, CLI and errors."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseg import build_model
from leanseg.checkpoint import model_from_checkpoint, save_checkpoint
from leanseg.cli import main
from leanseg.data.synthetic import ensure_synthetic
from leanseg.errors import ConfigError
from leanseg.methods import acosp
from leanseg.methods.acosp.fold import FoldedConv2d
from leanseg.models.backbones import MobileNetV2, ResNet
from tests.helpers import OutLogits

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width_mult": 0.25}
CHANNELS = {"width_mult": 0.25, "channels": 16}
MODELS = {
    "deeplabv3_resnet50": CHANNELS,
    "deeplabv3_mobilenetv2": CHANNELS,
    "pspnet50": TINY,
    "segnet": TINY,
    "deeplabv3plus_resnet18": CHANNELS,
    "resnet18_cifar": TINY,
}
FORCED = [0, 1, 2]  # residual-stream channels every writer prunes


def _stream_writers(model: nn.Module) -> list[list[nn.Conv2d]]:
    """The convs that write each residual stream (ResNet stage, MobileNetV2 block run)."""
    backbone = getattr(model, "backbone", None)
    streams: list[list[nn.Conv2d]] = []
    if isinstance(backbone, MobileNetV2):
        streams.append([backbone.features[0][0]])
        for block in backbone.features[1:]:
            if block.use_res_connect:
                streams[-1].append(block.conv[-2])
            else:
                streams.append([block.conv[-2]])
    elif isinstance(backbone, ResNet):
        stem = getattr(backbone, "conv3", backbone.conv1)
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            first = layer[0].downsample
            writers = [stem] if first is None else [first[0]]
            streams.append(writers + [getattr(b, "conv3", b.conv2) for b in layer])
    return [s for s in streams if len(s) > 1 and all(c.out_channels >= 16 for c in s)]


@torch.no_grad()
def masked_model(
    name: str, sparsity: float, seed: int = 0, num_classes: int = 5, coupled: bool = False
) -> nn.Module:
    """A hard-masked eval model with random masks, BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes, **MODELS[name])
    acosp.apply(model, sparsity, coupled_residual=coupled)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.5)
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.normal_(0, 0.1)
    for stream in _stream_writers(model):
        for conv in stream:
            conv.acosp_score[FORCED] = -100.0
    acosp.harden(model)
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)["out"]


def params(model: nn.Module) -> int:
    """Parameters of the eval graph: no ACoSP scores, no (training-only) aux head."""
    skip = ("acosp_", "aux_classifier.")
    return sum(
        p.numel() for name, p in model.named_parameters() if not any(k in name for k in skip)
    )


def _input(name: str) -> torch.Tensor:
    size = (33, 35) if name == "resnet18_cifar" else (65, 67)  # odd: borders and pools matter
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ exact outputs
MIN_RATIO = {0.5: 1.5, 0.75: 3.0}  # measured at width 0.25: 1.85-3.2x and 3.8-11.3x


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_model_equals_hard_masked_model(name, sparsity):
    model = masked_model(name, sparsity)
    small, spec = acosp.shrink_with_spec(model)
    x = _input(name)
    expected = logits(model, x)
    assert (logits(small, x) - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 1e-2  # a non-trivial output
    assert params(model) / params(small) >= MIN_RATIO[sparsity]
    stats = spec["stats"]
    assert stats["removed_channels"] > 0 and stats["border_terms"] > 0  # borders are exercised
    assert not any("acosp" in key for key in small.state_dict())
    assert not any(m._forward_hooks for m in small.modules())
    assert any(isinstance(m, FoldedConv2d) for m in small.modules())
    assert getattr(small, "aux_classifier", None) is None
    if name == "segnet":  # constant channels through the encoder's pool indices
        assert stats["unpool_terms"] > 0


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenetv2", "pspnet50"])
def test_residual_channels_pruned_by_every_writer_are_removed(name):
    model = masked_model(name, 0.75)
    small = acosp.shrink(model)
    names = {m: n for n, m in model.named_modules()}
    shrunk = dict(small.named_modules())
    streams = _stream_writers(model)
    assert streams
    for stream in streams:  # FORCED is pruned by all writers: the stream narrows
        for conv in stream:
            assert shrunk[names[conv]].out_channels <= conv.out_channels - len(FORCED)
    x = _input(name)
    assert (logits(small, x) - logits(model, x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "name", ["deeplabv3_resnet50", "deeplabv3_mobilenetv2", "pspnet50", "segnet"]
)
def test_coupled_residual_masks_agree_and_the_model_shrinks_further(name):
    independent = acosp.shrink(masked_model(name, 0.75))
    model = masked_model(name, 0.75, coupled=True)
    small = acosp.shrink(model)
    x = _input(name)
    assert (logits(small, x) - logits(model, x)).abs().max().item() <= 1e-4
    assert params(small) < params(independent)
    names = {m: n for n, m in model.named_modules()}
    shrunk = dict(small.named_modules())
    for stream in _stream_writers(model):  # one mask per residual stream: it narrows to k
        for conv in stream:
            assert torch.equal(conv.acosp_mask, stream[0].acosp_mask), names[conv]
            assert shrunk[names[conv]].out_channels == conv.acosp_k, names[conv]


def test_folded_conv_is_exact_at_borders_where_a_bias_is_not():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2, stride=2)
    x = torch.randn(1, 3, 9, 11)
    x[:, 1] = 0.7  # a constant channel
    expected = conv(x)
    folded = FoldedConv2d(2, 4, 3, padding=2, dilation=2, stride=2, fold_ones=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight[:, [0, 2]])
        folded.bias.copy_(conv.bias)
        folded.fold_ones.copy_(0.7 * conv.weight[:, 1:2])
        got = folded(x[:, [0, 2]])
        bias = conv.bias + folded.fold_ones.sum((1, 2, 3))
        as_bias = F.conv2d(x[:, [0, 2]], folded.weight, bias, 2, 2, 2)
    torch.testing.assert_close(got, expected)
    assert (as_bias - expected).abs().max() > 1e-2  # the naive fold is wrong at the borders
    torch.testing.assert_close(as_bias[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])


# ------------------------------------------------------------------------ checkpoints, ONNX
def _payload(name: str, model: nn.Module, spec: dict) -> dict:
    options = MODELS[name]
    return {
        "model": name,
        "num_classes": 5,
        "model_options": options,
        "class_names": [str(i) for i in range(5)],
        "config": {"acosp": {"sparsity": 0.75}},
        "shrink": spec,
        "state_dict": model.state_dict(),
    }


@pytest.mark.parametrize("name", ["segnet", "pspnet50"])
def test_shrunk_checkpoint_round_trip(name, tmp_path):
    model = masked_model(name, 0.75)
    small, spec = acosp.shrink_with_spec(model)
    path = tmp_path / "small.pt"
    save_checkpoint(path, _payload(name, small, spec))
    payload = torch.load(path, weights_only=True)
    rebuilt = model_from_checkpoint(payload, str(path)).eval()
    x = _input(name)
    assert torch.equal(logits(rebuilt, x), logits(small, x))
    assert params(rebuilt) == params(small) < params(model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_shrunk_model_exports_to_onnx():
    pytest.importorskip("onnx", reason="the ONNX export test needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX export test needs onnxruntime")
    small = acosp.shrink(masked_model("segnet", 0.75))
    x = _input("segnet")[:1]
    buffer = io.BytesIO()

    torch.onnx.export(OutLogits(small).eval(), (x,), buffer, dynamo=False, input_names=["image"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(result), logits(small, x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ API errors
def test_shrink_needs_hard_masks():
    model = build_model("segnet", 3, width_mult=0.125)
    with pytest.raises(ConfigError, match="no ACoSP masks"):
        acosp.shrink(model)
    acosp.apply(model, 0.5)
    with pytest.raises(ConfigError, match="harden"):
        acosp.shrink(model)


def test_group_norm_models_are_refused():
    model = build_model("segnet", 3, width_mult=0.125, norm="gn_ws")
    acosp.apply(model, 0.5)
    acosp.harden(model)
    with pytest.raises(ConfigError, match="BatchNorm models only"):
        acosp.shrink(model)


# ------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    """A 2-iteration ACoSP run (DeepLabV3+ ResNet-18 at quarter width, coupled residual
    scores) on synthetic data."""
    base = tmp_path_factory.mktemp("acosp_run")
    ensure_synthetic(base / "cache", num_train=8, num_val=4)
    overrides = [
        "model.name=deeplabv3plus_resnet18",
        "model.options.channels=16",
        "model.options.width_mult=0.25",
        "acosp.sparsity=0.5",
        "acosp.coupled_residual=true",
        "data.crop_size=64",
        "data.batch_size=2",
        "data.synthetic_train=8",
        "data.synthetic_val=4",
        "data.workers=0",
        f"data.root={base / 'cache'}",
        "train.iterations=2",
        "train.val_interval=2",
        "train.loggers=[]",
        f"train.work_dir={base / 'runs'}",
    ]
    assert main(["train", *overrides]) == 0
    (run,) = (base / "runs").iterdir()
    return run


def test_cli_shrink_end_to_end(pruned_run, tmp_path, capsys):
    capsys.readouterr()
    small = tmp_path / "small.pt"
    assert main(["shrink", "--checkpoint", str(pruned_run / "last.pt"), "-o", str(small)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "GFLOPs" in out and f"wrote {small}" in out
    assert "soft" not in out  # training hardened the masks at its end
    assert not list(tmp_path.glob("*.tmp"))
    payload = torch.load(small, weights_only=True)
    assert payload["model"] == "deeplabv3plus_resnet18" and payload["shrink"]["layers"]
    assert not any("acosp" in key for key in payload["state_dict"])
    source = torch.load(pruned_run / "last.pt", weights_only=True)
    masked = model_from_checkpoint(source, "last.pt").eval()
    layer1 = masked.backbone.layer1  # coupled: the stream's writers share one trained score
    assert layer1[1].conv2.acosp_score is masked.backbone.conv1.acosp_score
    saved = source["state_dict"]
    assert torch.equal(
        saved["backbone.layer1.1.conv2.acosp_score"], saved["backbone.conv1.acosp_score"]
    )
    shrunk = model_from_checkpoint(payload, str(small)).eval()
    x = torch.randn(1, 3, 65, 67)
    assert (logits(shrunk, x) - logits(masked, x)).abs().max().item() <= 1e-4
    assert params(shrunk) < params(masked)

    assert main(["eval", "--checkpoint", str(small)]) == 0
    assert "mIoU" in capsys.readouterr().out
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = next((pruned_run.parents[1] / "cache").glob("synthetic-*/JPEGImages/*.jpg"))
    shutil.copy(image, inputs / image.name)
    out_dir = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(small), str(inputs), "-o", str(out_dir)]) == 0
    assert (out_dir / f"{image.stem}.png").is_file()


def test_cli_shrink_hardens_soft_masks(pruned_run, tmp_path, capsys):
    payload = torch.load(pruned_run / "last.pt", weights_only=True)
    for key in payload["state_dict"]:
        if key.endswith("acosp_hard"):
            payload["state_dict"][key] = torch.tensor(False)
    soft, small = tmp_path / "soft.pt", tmp_path / "small.pt"
    save_checkpoint(soft, payload)
    capsys.readouterr()
    assert main(["shrink", "--checkpoint", str(soft), "-o", str(small)]) == 0
    assert "were still soft; hardened" in capsys.readouterr().out
    masked = model_from_checkpoint(payload, str(soft)).eval()
    acosp.harden(masked)
    shrunk = model_from_checkpoint(torch.load(small, weights_only=True), str(small)).eval()
    x = torch.randn(1, 3, 64, 64)
    assert (logits(shrunk, x) - logits(masked, x)).abs().max().item() <= 1e-4


def _no_masks(run: Path, tmp: Path) -> tuple[list[str], str]:
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["config"]["acosp"]["sparsity"] = None
    payload["state_dict"] = build_model("deeplabv3plus_resnet18", 7, **CHANNELS).state_dict()
    save_checkpoint(tmp / "plain.pt", payload)
    return ["--checkpoint", str(tmp / "plain.pt"), "-o", str(tmp / "s.pt")], "has no ACoSP masks"


def _garbage(run: Path, tmp: Path) -> tuple[list[str], str]:
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    return ["--checkpoint", str(tmp / "junk.pt"), "-o", str(tmp / "s.pt")], "cannot be read"


def _missing_dir(run: Path, tmp: Path) -> tuple[list[str], str]:
    target = tmp / "no" / "such" / "s.pt"
    return ["--checkpoint", str(run / "last.pt"), "-o", str(target)], "does not exist"


def _shrunk_twice(run: Path, tmp: Path) -> tuple[list[str], str]:
    assert main(["shrink", "--checkpoint", str(run / "last.pt"), "-o", str(tmp / "s.pt")]) == 0
    return ["--checkpoint", str(tmp / "s.pt"), "-o", str(tmp / "t.pt")], "already shrunk"


@pytest.mark.parametrize("case", [_no_masks, _garbage, _missing_dir, _shrunk_twice])
def test_cli_shrink_errors_are_one_line(pruned_run, tmp_path, capsys, case):
    args, expected = case(pruned_run, tmp_path)
    capsys.readouterr()
    assert main(["shrink", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "leanseg: error:" in err
    assert len(err.strip().splitlines()) == 1, err
    assert args[1] in err or args[3] in err or str(Path(args[3]).parent) in err  # names the file
    assert not (tmp_path / "t.pt").exists() and not list(tmp_path.glob("*.tmp"))
