"""data.mean / data.std and the colour jitter keys (data.brightness, contrast, saturation, hue):
ColorJitter's semantics and RNG use, unchanged defaults, config errors, and a tiny CLI run whose
custom normalisation reaches the checkpoint, the Predictor, eval's data and export, and which
resumes exactly with jitter on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanseg.cli import main
from leanseg.config import DataConfig, load_config
from leanseg.data.build import _transform, build_dataset
from leanseg.data.normalization import data_normalization, recorded_normalization
from leanseg.data.synthetic import ensure_synthetic
from leanseg.data.transforms import (
    IMAGENET_MEAN,
    ColorJitter,
    ToTensorNormalize,
    _hue,
    build_train_transform,
)
from leanseg.errors import ConfigError
from tests.test_cli import only_run, tiny

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _sample(seed: int = 0, size: tuple[int, int] = (40, 48)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = rng.integers(0, 7, size, dtype=np.uint8)
    mask[:4] = 255
    return image, mask


# ------------------------------------------------------------------ ColorJitter


def test_jitter_changes_the_image_only_and_stays_in_range():
    image, mask = _sample()
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1)
    out, out_mask = jitter(image, mask, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out_mask is mask and np.array_equal(mask, _sample()[1])  # the mask untouched
    assert not np.array_equal(out, image)
    # deterministic given the generator's seed; another seed draws other factors
    again, _ = jitter(image, mask, np.random.default_rng(1))
    other, _ = jitter(image, mask, np.random.default_rng(2))
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_brightness_and_saturation_follow_the_colorjitter_formulas():
    image, mask = _sample(3)
    rng = np.random.default_rng(5)
    out, _ = ColorJitter(brightness=0.5)(image, mask, rng)
    ref = np.random.default_rng(5)
    ref.permutation(4)  # the order is drawn first
    factor = ref.uniform(0.5, 1.5)
    expected = np.clip(
        np.rint(np.clip(image.astype(np.float32) * np.float32(factor), 0, 255)), 0, 255
    )
    assert np.array_equal(out, expected.astype(np.uint8))
    assert rng.bit_generator.state == ref.bit_generator.state  # exactly two draws

    out, _ = ColorJitter(saturation=0.9)(image, mask, np.random.default_rng(6))
    ref = np.random.default_rng(6)
    ref.permutation(4)
    s = np.float32(ref.uniform(0.1, 1.9))
    x = image.astype(np.float32)
    gray = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    expected = np.clip(np.rint(np.clip(s * x + (1 - s) * gray, 0, 255)), 0, 255)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_hue_turns_red_to_green_and_keeps_gray():
    red = np.zeros((2, 2, 3), np.float32)
    red[..., 0] = 255
    green = _hue(red, 1 / 3)
    np.testing.assert_allclose(green[0, 0], [0, 255, 0], atol=1e-3)
    gray = np.full((2, 2, 3), 120, np.float32)
    np.testing.assert_allclose(_hue(gray, 0.25), gray, atol=1e-3)


def test_jitter_off_draws_nothing_and_defaults_are_todays_pipeline():
    image, mask = _sample(4)
    rng = np.random.default_rng(9)
    state = rng.bit_generator.state
    out, _ = ColorJitter()(image, mask, rng)
    assert out is image and rng.bit_generator.state == state
    cfg = DataConfig(crop_size=32)
    new = _transform(cfg, train=True)
    old = build_train_transform(  # the pipeline as built before the new keys existed
        (32, 32), scale=(cfg.scale_min, cfg.scale_max), rotate=cfg.rotate, blur=cfg.blur
    )
    assert repr(new) == repr(old) and "ColorJitter" not in repr(new)
    a_rng, b_rng = np.random.default_rng(11), np.random.default_rng(11)
    a, b = new(image, mask, a_rng), old(image, mask, b_rng)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a_rng.bit_generator.state == b_rng.bit_generator.state
    on = _transform(DataConfig(crop_size=32, hue=0.1), train=True)
    assert "ColorJitter" in repr(on)


# ------------------------------------------------------------------ mean / std


def test_mean_and_std_reach_the_train_and_eval_transforms():
    image, mask = _sample(5)
    cfg = DataConfig(crop_size=32, mean=MEAN, std=STD, scale_min=1.0, scale_max=1.0, flip=False)
    for train in (True, False):
        step = _transform(cfg, train=train).transforms[-1]
        assert isinstance(step, ToTensorNormalize)
        x, _ = step(image, mask)
        expected = (image[0, 0] / 255.0 - np.array(MEAN)) / np.array(STD)
        np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=1e-5)
    assert data_normalization(DataConfig()) == (tuple(IMAGENET_MEAN), (0.229, 0.224, 0.225))
    assert data_normalization(DataConfig(dataset="cifar10"))[0] == (0.4914, 0.4822, 0.4465)
    assert data_normalization({"dataset": "cifar10", "std": STD})[1] == tuple(STD)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.mean=[0.5, 0.5]"], "'data.mean': got 2 values"),
        (["data.std=[0.2, 0.2, 0.2, 0.2]"], "'data.std': got 4 values"),
        (["data.std=[0.2, 0, 0.2]"], "'data.std[1]': must be > 0"),
        (["data.mean=[0.5, 1.5, 0.5]"], "'data.mean[1]': must be in [0, 1]"),
        (["data.hue=0.6"], "'data.hue': must be in [0, 0.5]"),
        (["data.brightness=-0.1"], "'data.brightness': must be >= 0"),
        (["data.saturation=-1"], "'data.saturation': must be >= 0"),
    ],
)
def test_bad_normalisation_and_jitter_keys_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cifar10_refuses_colour_jitter():
    with pytest.raises(ConfigError, match="'data.contrast'.*set data.contrast=0"):
        build_dataset(
            DataConfig(dataset="cifar10", root="/nowhere", contrast=0.2), "train", train=True
        )


# ------------------------------------------------------------------ a tiny run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> object:
    path = tmp_path_factory.mktemp("cache")
    ensure_synthetic(path, num_train=16, num_val=3)
    return path


def test_custom_normalisation_with_jitter_resumes_exactly_and_is_used_at_inference(cache, tmp_path):
    from leanseg.engine.inference import predict_probs
    from leanseg.export import input_normalization
    from leanseg.predictor import Predictor

    steps = [
        "train.iterations=4",
        "train.val_interval=2",
        "data.crop_size=48",
        f"data.mean={MEAN}",
        f"data.std={STD}",
        "data.brightness=0.4",
        "data.contrast=0.4",
        "data.saturation=0.4",
        "data.hue=0.1",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *tiny(cache, straight, *steps, "data.workers=0")]) == 0
    assert main(["train", *tiny(cache, split, *steps, "data.workers=2"), "--stop-at", "2"]) == 0
    run = only_run(split)
    assert main(["train", "--resume", str(run)]) == 0  # and with 2 workers: seeding holds
    a = torch.load(only_run(straight) / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert b["iteration"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key

    # recorded, and read back by every inference path
    assert b["config"]["data"]["mean"] == MEAN and b["config"]["data"]["std"] == STD
    assert recorded_normalization(b) == (tuple(MEAN), tuple(STD))
    assert input_normalization(b)["mean"] == MEAN and input_normalization(b)["std"] == STD
    predictor = Predictor.from_checkpoint(run / "last.pt", device="cpu")
    image, _ = _sample(7, size=(48, 56))
    x = (image.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    batch = torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)
    compute = predictor.compute  # the same precision and layout as the Predictor's
    with torch.no_grad(), compute.autocast(predictor.device):
        probs = predict_probs(predictor.model, compute.images(batch), **predictor.inference)
    np.testing.assert_allclose(predictor.predict_proba(image), probs[0].float().numpy())
    # eval with another YAML: its data still gets the checkpoint's normalisation
    other = tmp_path / "other.yaml"
    other.write_text(f"data:\n  root: {cache}\n  synthetic_train: 16\n  synthetic_val: 3\n")
    cfg = Predictor.from_checkpoint(run / "last.pt", device="cpu", config=other).config
    assert (cfg.data.mean, cfg.data.std) == (MEAN, STD)
    step = build_dataset(cfg.data, cfg.data.val_split, train=False).transform.transforms[-1]
    np.testing.assert_allclose(step.mean.ravel(), np.float32(MEAN) * 255)
