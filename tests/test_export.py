"""``leanseg export``: ONNX equals torch for every model, metadata, dynamic sizes, errors."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from leanseg import build_model, list_models
from leanseg.checkpoint import model_from_checkpoint, save_checkpoint
from leanseg.cli import main
from leanseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from leanseg.errors import ConfigError
from leanseg.methods import acosp
from tests.test_acosp_shrink import masked_model

pytest.importorskip("onnx", reason="leanseg export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="leanseg export needs onnxruntime")

from leanseg import export  # noqa: E402  (after the skips: it is only usable with onnx)

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4


def _options(name: str) -> dict:
    if name.startswith("deeplab"):
        return {"width_mult": 0.25, "channels": 16}
    return {"width_mult": 0.25}


def _size(name: str) -> tuple[int, int]:
    if name == "resnet18_cifar":
        return 32, 32
    return 65, 65  # PSPNet: a 9x9 stride-8 map, where PPM bins 2 and 6 are uneven


def _checkpoint(
    path: Path,
    name: str,
    options: dict | None = None,
    size: tuple[int, int] = (65, 65),
    model: nn.Module | None = None,
    **extra,
) -> Path:
    """A leanseg checkpoint of a small model, with the keys Trainer._payload writes."""
    options = _options(name) if options is None else options
    if model is None:
        torch.manual_seed(0)
        model = build_model(name, 5, **options)
    config = {"data": {"dataset": "synthetic", "crop_size": size[0], "crop_width": size[1]}}
    config.update(extra.pop("config", {}))
    save_checkpoint(
        path,
        {
            "model": name,
            "num_classes": 5,
            "model_options": options,
            "class_names": ["bg", "disc", "square", "triangle", "ring"],
            "palette": torch.tensor([[0, 0, 0], [128, 0, 0], [0, 128, 0], [0, 0, 128], [9, 8, 7]]),
            "config": config,
            "state_dict": model.state_dict(),
            **extra,
        },
    )
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("leanseg: error: ")
    return lines[0]


def _assert_parity(report: export.ExportReport) -> None:
    assert len(report.checks) >= 2  # noise and a synthetic image
    for check in report.checks:
        assert check.max_abs_diff <= TOLERANCE * max(1.0, check.logit_scale), check
        assert check.argmax_agreement >= 0.999, check
        assert check.logit_scale > 0


# ------------------------------------------------------------------ every model, fixed size
@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_and_matches_torch(name, tmp_path):
    ckpt = _checkpoint(tmp_path / "best.pt", name, size=_size(name))
    report = export.export_checkpoint(ckpt, tmp_path / "model.onnx")
    _assert_parity(report)
    assert report.input_shape == (1, 3, *_size(name))
    assert (tmp_path / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    print(f"{name}: {report.format()}")


def test_shrunk_acosp_checkpoint_exports(tmp_path):
    # hard masks, random BN statistics and channels every writer prunes (test_acosp_shrink)
    small, spec = acosp.shrink_with_spec(masked_model("deeplabv3_mobilenetv2", 0.75))
    options = {"width_mult": 0.25, "channels": 16}
    ckpt = _checkpoint(
        tmp_path / "small.pt",
        "deeplabv3_mobilenetv2",
        options,
        model=small,
        config={"acosp": {"sparsity": 0.75}},
        shrink=spec,
    )
    payload = torch.load(ckpt, weights_only=True)
    rebuilt = model_from_checkpoint(payload, str(ckpt))
    dense = sum(p.numel() for p in build_model("deeplabv3_mobilenetv2", 5, **options).parameters())
    assert sum(p.numel() for p in rebuilt.parameters()) < dense  # really the smaller layers
    _assert_parity(export.export_checkpoint(ckpt, tmp_path / "small.onnx"))


def _ddd_checkpoint(tmp_path: Path) -> Path:
    options = {"width_mult": 0.25, "channels": 16, "crf": "ddd", "crf_iters": 2}
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 5, **options)
    nn.init.normal_(model.crf.pairwise.weight, 0.0, 0.3)  # a CRF that changes the logits
    return _checkpoint(
        tmp_path / "ddd.pt", "deeplabv3_resnet18", options, size=(64, 48), model=model
    )


def test_ddd_model_exports_at_a_fixed_size(tmp_path):
    report = export.export_checkpoint(_ddd_checkpoint(tmp_path), tmp_path / "ddd.onnx")
    _assert_parity(report)
    assert export.read_metadata(tmp_path / "ddd.onnx")["input_size"] == [64, 48]


# ------------------------------------------------------------------ metadata, CLI
def test_cli_export_writes_metadata_that_round_trips(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.pt", "segnet", size=(49, 35))
    out = tmp_path / "segnet.onnx"
    code, stdout, err = _run(["--checkpoint", str(ckpt), "-o", str(out), "--opset", "17"], capsys)
    assert code == 0, err
    line = stdout.strip()
    assert "\n" not in line
    assert line.startswith(f"wrote {out} (opset 17, 1x3x49x35): max |logit diff| ")
    assert line.endswith("argmax agreement 100.00%")
    meta = export.read_metadata(out)
    assert set(export.METADATA_KEYS) <= set(meta)
    assert meta["model"] == "segnet" and meta["num_classes"] == 5
    assert meta["class_names"] == ["bg", "disc", "square", "triangle", "ring"]
    assert meta["palette"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [0, 0, 128], [9, 8, 7]]
    assert meta["input_size"] == [49, 35] and meta["dynamic_axes"] == {}
    assert meta["opset"] == 17
    assert meta["source_checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    norm = meta["input_normalization"]
    assert norm["mean"] == list(IMAGENET_MEAN) and norm["std"] == list(IMAGENET_STD)
    assert norm["color_order"] == "RGB" and norm["formula"] == "x = (pixel / 255 - mean) / std"
    import leanseg

    assert meta["leanseg_version"] == leanseg.__version__
    # the formula is leanseg's own preprocessing
    from leanseg.data.transforms import ToTensorNormalize

    image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    expected, _ = ToTensorNormalize()(image, np.zeros((4, 5), np.uint8))
    x = (image / 255.0 - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    np.testing.assert_allclose(x.transpose(2, 0, 1), expected.numpy(), atol=1e-5)


def test_cli_dynamic_export_runs_at_two_sizes(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.pt", "deeplabv3_mobilenetv2")
    out = tmp_path / "dyn.onnx"
    code, stdout, err = _run(["--checkpoint", str(ckpt), "-o", str(out), "--dynamic"], capsys)
    assert code == 0, err
    assert "dynamic Nx3xHxW" in stdout
    meta = export.read_metadata(out)
    assert meta["input_size"] == "dynamic"
    assert meta["dynamic_axes"]["image"] == {"0": "batch", "2": "height", "3": "width"}
    model = model_from_checkpoint(torch.load(ckpt, weights_only=True), str(ckpt)).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 65, 65), (2, 3, 48, 80)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)["out"].numpy()
        (got,) = session.run(None, {"image": x.numpy()})
        assert got.shape == (shape[0], 5, *shape[2:])
        np.testing.assert_allclose(got, expected, atol=TOLERANCE * max(1, abs(expected).max()))


@pytest.mark.parametrize("which", ["pspnet", "ddd"])
def test_dynamic_export_of_a_fixed_size_model_is_refused(which, tmp_path, capfd):
    if which == "pspnet":  # the TorchScript exporter has no adaptive pooling of unknown size
        ckpt = _checkpoint(tmp_path / "psp.pt", "pspnet50", size=(41, 41))
        reason = "adaptive_avg_pool2d"
    else:  # exports, but the CRF's step 1 / max(H, W) is traced as a constant
        ckpt = _ddd_checkpoint(tmp_path)
        reason = "does not export with dynamic sizes"
    out = tmp_path / "dyn.onnx"
    code, stdout, err = _run(["--checkpoint", str(ckpt), "-o", str(out), "--dynamic"], capfd)
    line = _one_line_error(code, err)  # capfd: also nothing from C++ (the exporter's graph log)
    assert stdout == ""
    assert reason in line and "--size H W" in line
    assert list(tmp_path.glob("*.onnx")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_size_and_dynamic_are_mutually_exclusive(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "best.pt", "segnet")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(ckpt), "-o", "x.onnx", "--size", "8", "8", "--dynamic"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------ bad inputs
def _corrupt(tmp: Path) -> tuple[list[str], str]:
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    return ["--checkpoint", str(tmp / "junk.pt"), "-o", str(tmp / "m.onnx")], "cannot be read"


def _exists(tmp: Path) -> tuple[list[str], str]:
    ckpt = _checkpoint(tmp / "best.pt", "segnet")
    (tmp / "m.onnx").write_bytes(b"previous")
    return ["--checkpoint", str(ckpt), "-o", str(tmp / "m.onnx")], "--force"


def _same_file(tmp: Path) -> tuple[list[str], str]:
    ckpt = _checkpoint(tmp / "best.pt", "segnet")
    return ["--checkpoint", str(ckpt), "-o", str(tmp / "." / "best.pt"), "--force"], "checkpoint"


def _bad_size(tmp: Path) -> tuple[list[str], str]:
    ckpt = _checkpoint(tmp / "best.pt", "segnet")
    return ["--checkpoint", str(ckpt), "-o", str(tmp / "m.onnx"), "--size", "0", "8"], "positive"


@pytest.mark.parametrize("case", [_corrupt, _exists, _same_file, _bad_size])
def test_bad_inputs_are_one_line_errors(case, tmp_path, capsys):
    argv, needle = case(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, _, err = _run(argv, capsys)
    assert needle in _one_line_error(code, err)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing replaced


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_missing_export_extra_is_a_one_line_error(module, tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "best.pt", "segnet")
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, _, err = _run(["--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx")], capsys)
    line = _one_line_error(code, err)
    assert module in line and "pip install 'leanseg[deploy]'" in line
    assert not (tmp_path / "m.onnx").exists()


def test_parity_failure_removes_the_output(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "best.pt", "segnet")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    real = export._session

    class Perturbed:
        def __init__(self, session) -> None:
            self.session = session

        def run(self, names, feed):
            return [y + 1e-2 for y in self.session.run(names, feed)]

    monkeypatch.setattr(export, "_session", lambda ort, path: Perturbed(real(ort, path)))
    code, _, err = _run(["--checkpoint", str(ckpt), "-o", str(out), "--force"], capsys)
    line = _one_line_error(code, err)
    assert "does not match torch" in line and "tolerance 0.0001" in line
    assert out.read_bytes() == b"previous"  # the forced replacement did not happen
    assert list(tmp_path.glob(".*.tmp")) == []
    monkeypatch.setattr(export, "_session", real)
    code, _, err = _run(["--checkpoint", str(ckpt), "-o", str(out), "--force"], capsys)
    assert code == 0, err
    assert export.read_metadata(out)["model"] == "segnet"


def test_zero_tolerance_fails_when_results_differ_at_all(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "best.pt", "deeplabv3_resnet18")
    report = export.export_checkpoint(ckpt, tmp_path / "a.onnx")
    assert report.max_abs_diff > 0  # float32 kernels differ in the last bits
    with pytest.raises(export.ExportError, match="does not match torch"):
        export.export_checkpoint(ckpt, tmp_path / "b.onnx", tolerance=0.0)
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(ConfigError, match="--tolerance"):
        export.export_checkpoint(ckpt, tmp_path / "b.onnx", tolerance=-1.0)
