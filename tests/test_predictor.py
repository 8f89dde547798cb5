"""leanseg.Predictor: checkpoint -> label maps for an array, a path, a list (issue 14 item 3)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from leanseg.config import Config, to_dict
from leanseg.data.image_io import read_image
from leanseg.data.transforms import ToTensorNormalize
from leanseg.engine.checkpoint import save_checkpoint
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
