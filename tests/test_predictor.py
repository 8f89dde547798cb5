"""leanseg.Predictor: checkpoint -> label maps for an array, a path, a list (issue 14 item 3)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leanseg.checkpoint import save_checkpoint
from leanseg.config import Config, to_dict
from leanseg.data.image_io import read_image
from leanseg.data.transforms import ToTensorNormalize
from leanseg.errors import DataError
from leanseg.models import build_model
from leanseg.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"width_mult": 0.25, "channels": 16, "aspp_rates": [1, 2, 3]}
PALETTE = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0]], np.uint8)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_resnet18", 3, **OPTIONS)
    with torch.no_grad():  # non-trivial BN statistics, so that eval differs from train
        model.train()
        model(torch.randn(2, 3, 32, 32))
    cfg = Config()
    cfg.model.options = dict(OPTIONS)
    cfg.train.precision = "fp32"  # compared with fp32 references
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(
        path,
        {
            "model": cfg.model.name,
            "num_classes": 3,
            "model_options": dict(OPTIONS),
            "class_names": ["sky", "road", "car"],
            "config": to_dict(cfg),
            "state_dict": model.state_dict(),
            "palette": torch.from_numpy(PALETTE),
        },
    )
    return path


def _reference(checkpoint: Path, image: np.ndarray) -> torch.Tensor:
    """The model's own softmax on the normalised image, computed by hand."""
    payload = torch.load(checkpoint, weights_only=True)
    model = build_model(payload["model"], 3, **payload["model_options"]).eval()
    model.load_state_dict(payload["state_dict"])
    tensor, _ = ToTensorNormalize()(image, np.zeros(image.shape[:2], np.uint8))
    with torch.no_grad():
        return model(tensor[None])["out"].softmax(1)[0]


def test_array_gives_the_models_own_prediction(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    image = _image(29, 35, 1)
    probs = predictor.predict_proba(image)
    expected = _reference(checkpoint, image)
    assert probs.shape == (3, 29, 35) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    labels = predictor(image)
    assert labels.shape == (29, 35)
    np.testing.assert_array_equal(labels, expected.argmax(0).numpy())
    assert predictor.class_names == ["sky", "road", "car"]
    np.testing.assert_array_equal(predictor.palette, PALETTE)


def test_path_equals_array(checkpoint, tmp_path):
    image = _image(24, 30, 2)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), image[..., ::-1])  # cv2 writes BGR
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    np.testing.assert_array_equal(predictor(path), predictor(read_image(path)))
    np.testing.assert_array_equal(predictor(str(path)), predictor(image))


def test_list_is_batched_by_size_and_kept_in_order(checkpoint):
    images = [_image(24, 30, 3), _image(16, 20, 4), _image(24, 30, 5)]
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=2)
    batched = predictor.predict_proba(images)
    assert [p.shape for p in batched] == [(3, 24, 30), (3, 16, 20), (3, 24, 30)]
    for image, probs in zip(images, batched, strict=True):
        np.testing.assert_allclose(probs, predictor.predict_proba(image), atol=1e-5)
    labels = predictor(images)
    assert [lab.shape for lab in labels] == [(24, 30), (16, 20), (24, 30)]


def test_overrides_reach_inference(checkpoint):
    image = _image(24, 30, 6)
    plain = Predictor.from_checkpoint(checkpoint, device="cpu")
    flipped = Predictor.from_checkpoint(checkpoint, device="cpu", overrides=["eval.flip=true"])
    assert flipped.inference["flip"] is True and plain.inference["flip"] is False
    by_hand = (
        _reference(checkpoint, image) + _reference(checkpoint, image[:, ::-1].copy()).flip(-1)
    ) / 2
    np.testing.assert_allclose(flipped.predict_proba(image), by_hand.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), 3],
)
def test_bad_images_are_one_line_errors(checkpoint, bad):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(DataError) as info:
        predictor(bad)
    assert "\n" not in str(info.value) and "HxWx3 uint8" in str(info.value)


def test_missing_file_is_a_one_line_error(checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(DataError) as info:
        predictor(tmp_path / "nope.png")
    assert "nope.png" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the ONNX backend (item 2)


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory) -> dict[str, Path]:
    from leanseg.export import export_checkpoint

    folder = tmp_path_factory.mktemp("onnx")
    dynamic, fixed = folder / "dynamic.onnx", folder / "fixed.onnx"
    with torch.no_grad():
        export_checkpoint(checkpoint, dynamic, size=(32, 32), dynamic=True)
        export_checkpoint(checkpoint, fixed, size=(24, 30))
    return {"dynamic": dynamic, "fixed": fixed}


def test_onnx_predictor_equals_the_checkpoint(checkpoint, exports):
    torch_predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    onnx_predictor = Predictor.from_checkpoint(exports["dynamic"], device="cpu")
    assert onnx_predictor.class_names == ["sky", "road", "car"]
    np.testing.assert_array_equal(onnx_predictor.palette, PALETTE)
    images = [_image(29, 35, 7), _image(24, 30, 8), _image(29, 35, 9)]
    for ours, theirs in zip(
        onnx_predictor.predict_proba(images), torch_predictor.predict_proba(images), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_fixed_size_onnx_slides_its_windows_over_any_image(checkpoint, exports):
    onnx_predictor = Predictor.from_checkpoint(exports["fixed"], device="cpu")
    assert onnx_predictor.inference["mode"] == "slide"
    assert onnx_predictor.inference["crop_size"] == (24, 30)
    same = Predictor.from_checkpoint(
        checkpoint,
        device="cpu",
        overrides=["eval.mode=slide", "eval.crop_size=24", "eval.stride=16"],
    )
    image = _image(24, 30, 10)  # exactly one window: equal to whole-image prediction
    np.testing.assert_allclose(
        onnx_predictor.predict_proba(image),
        Predictor.from_checkpoint(checkpoint, device="cpu").predict_proba(image),
        atol=1e-4,
    )
    assert onnx_predictor(_image(40, 50, 11)).shape == (40, 50)
    assert same.inference["mode"] == "slide"


def test_fixed_size_onnx_refuses_another_size_in_whole_mode(exports):
    whole = Predictor.from_checkpoint(exports["fixed"], device="cpu", overrides=["eval.mode=whole"])
    with pytest.raises(DataError) as info:
        whole(_image(40, 50, 12))
    message = str(info.value)
    assert "24x30" in message and "40x50" in message and "\n" not in message


def test_predict_through_onnx_writes_the_checkpoints_pngs(checkpoint, exports, tmp_path):
    from leanseg.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (h, w) in enumerate([(29, 35), (24, 30)]):
        cv2.imwrite(str(inputs / f"img{i}.png"), _image(h, w, 20 + i))
    out_ckpt, out_onnx = tmp_path / "ckpt", tmp_path / "onnx"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                str(inputs),
                "-o",
                str(out_ckpt),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(exports["dynamic"]),
                str(inputs),
                "-o",
                str(out_onnx),
                "--no-progress",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out_ckpt.iterdir())
    assert names == sorted(p.name for p in out_onnx.iterdir()) and len(names) == 6
    for name in names:
        assert (out_ckpt / name).read_bytes() == (out_onnx / name).read_bytes(), name


def test_corrupt_onnx_is_a_one_line_error(tmp_path, capsys):
    from leanseg.cli import main

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), _image(16, 16, 1))
    assert main(["predict", "--checkpoint", str(bad), str(image), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.onnx" in err and "\n" not in err


def _synthetic_checkpoint(tmp: Path, calibrated: bool = False) -> Path:
    """A random 7-class checkpoint for the synthetic set (``calibrated``: BN statistics from a
    forward, so that folding them changes the weights)."""
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_resnet18", 7, **OPTIONS)
    if calibrated:
        with torch.no_grad():
            model.train()
            model(torch.randn(2, 3, 32, 32))
    cfg = Config()
    cfg.model.options = dict(OPTIONS)
    cfg.train.precision = "fp32"  # compared with fp32 references
    path = tmp / "best.pt"
    payload = {"model": cfg.model.name, "num_classes": 7, "model_options": dict(OPTIONS)}
    save_checkpoint(path, {**payload, "config": to_dict(cfg), "state_dict": model.state_dict()})
    return path


def _synthetic_data(tmp: Path) -> list[str]:
    """Overrides for a private synthetic set: 2 train, 3 val images."""
    root = f"data.root={tmp / 'cache'}"
    return [root, "data.synthetic_train=2", "data.synthetic_val=3", "data.workers=0"]


def test_eval_through_onnx_matches_the_checkpoint(tmp_path):
    """``leanseg eval --checkpoint model.onnx -c ...`` scores the export like the checkpoint."""
    import json

    from leanseg.cli import main
    from leanseg.export import export_checkpoint

    ckpt = _synthetic_checkpoint(tmp_path)
    onnx = tmp_path / "model.onnx"
    export_checkpoint(ckpt, onnx, size=(32, 32), dynamic=True)
    data = _synthetic_data(tmp_path)
    reports = {}
    for name, path in (("ckpt", ckpt), ("onnx", onnx)):
        out = tmp_path / f"{name}.json"
        code = main(["eval", "--checkpoint", str(path), "--out", str(out), "--no-progress", *data])
        assert code == 0
        reports[name] = json.loads(out.read_text())
    theirs, ours = (np.asarray(reports[k]["confusion_matrix"]) for k in ("ckpt", "onnx"))
    assert theirs.sum() == ours.sum() > 0
    assert np.abs(theirs - ours).sum() <= 2e-3 * theirs.sum()  # argmax ties at float noise
    assert abs(reports["ckpt"]["miou"] - reports["onnx"]["miou"]) < 1e-3


def test_fuse_bn_setting_folds_the_checkpoints_batchnorms(checkpoint):
    image = _image(40, 56, seed=5)
    fused = Predictor.from_checkpoint(checkpoint, overrides=["eval.fuse_bn=true"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.modules())
    plain = Predictor.from_checkpoint(checkpoint)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    expected = _reference(checkpoint, image).numpy()
    np.testing.assert_allclose(fused.predict_proba(image), expected, atol=1e-5)


def test_eval_of_a_checkpoint_runs_the_predictors_model(tmp_path, monkeypatch):
    """``leanseg eval`` scores what the Predictor runs: a fused checkpoint scores the same."""
    import json

    from leanseg import predictor as predictor_module
    from leanseg.cli import main

    seen = []
    real = predictor_module.Predictor.from_checkpoint.__func__

    def spy(cls, path, **kwargs):
        made = real(cls, path, **kwargs)
        seen.append(made)
        return made

    monkeypatch.setattr(predictor_module.Predictor, "from_checkpoint", classmethod(spy))
    ckpt = _synthetic_checkpoint(tmp_path, calibrated=True)
    data = _synthetic_data(tmp_path)
    matrices = {}
    for fuse in ("false", "true"):
        out = tmp_path / f"{fuse}.json"
        argv = ["eval", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
        assert main([*argv, *data, f"eval.fuse_bn={fuse}"]) == 0
        matrices[fuse] = np.asarray(json.loads(out.read_text())["confusion_matrix"])
    assert [p.config.eval.fuse_bn for p in seen] == [False, True]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seen[1].model.modules())
    plain, fused = matrices["false"], matrices["true"]
    assert plain.sum() == fused.sum() > 0
    assert np.abs(plain - fused).sum() <= 2e-3 * plain.sum()  # argmax ties at float noise


def test_predictor_runs_in_the_configured_precision(checkpoint):
    image = _image(40, 56, seed=6)
    bf16 = Predictor.from_checkpoint(
        checkpoint, overrides=["train.precision=bf16", "train.channels_last=auto"]
    )
    assert (bf16.compute.precision, bf16.compute.channels_last) == ("bf16", True)
    weight = next(p for p in bf16.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    probs = bf16.predict_proba(image)
    assert probs.dtype == np.float32 and probs.shape == (3, 40, 56)
    expected = _reference(checkpoint, image).numpy()
    assert np.abs(probs - expected).max() < 0.05  # bf16 rounding, not another model
    assert Predictor.from_checkpoint(checkpoint).compute.precision == "fp32"  # as configured
