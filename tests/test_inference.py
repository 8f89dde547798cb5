"""Inference modes (whole, slide, multi-scale, flip) and the evaluation loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from leanseg.engine.evaluate import evaluate
from leanseg.engine.inference import (
    _scaled_size,
    _starts,
    predict_probs,
    predict_slide,
    predict_whole,
)
from leanseg.errors import ConfigError

K = 4


class ConvModel(nn.Module):
    """A one-layer fully convolutional model returning {"out": logits}."""

    def __init__(self, kernel: int = 1, symmetric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, kernel, padding=kernel // 2)
        if symmetric:  # left-right symmetric kernels make the model flip-equivariant
            with torch.no_grad():
                self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def _images(h: int = 13, w: int = 17, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_window_grid_ends_flush():
    assert _starts(10, 4, 3) == [0, 3, 6]
    assert _starts(11, 4, 3) == [0, 3, 6, 7]
    assert _starts(4, 4, 3) == [0]


def test_slide_with_crop_covering_image_equals_whole():
    model, x = ConvModel(kernel=3).eval(), _images()
    # zero padding bottom/right matches the conv's own zero padding, so this is exact
    for crop in [(13, 17), (16, 20), 32]:
        out = predict_slide(model, x, K, crop, 8)
        assert out.shape == (2, K, 13, 17)
        assert torch.allclose(out, predict_whole(model, x), atol=1e-6)


def test_slide_many_windows_on_pointwise_model_equals_whole():
    model, x = ConvModel(kernel=1).eval(), _images()
    out = predict_slide(model, x, K, (5, 6), (3, 4))
    assert torch.allclose(out, predict_whole(model, x), atol=1e-6)


def test_slide_translation_effects_only_at_inner_window_borders():
    model, x = ConvModel(kernel=3).eval(), _images(8, 12)
    # windows x in [0, 8) and [4, 12): a 3x3 conv differs from whole only where a pixel sits
    # on an inner window border (columns 7 and 4), averaged there with the other window.
    diff = (predict_slide(model, x, K, 8, 4) - predict_whole(model, x)).abs().amax(dim=(0, 1, 2))
    assert diff[[4, 7]].min() > 1e-3
    assert diff[[0, 1, 2, 3, 5, 6, 8, 9, 10, 11]].max() < 1e-6


def test_single_scale_no_flip_is_softmax_of_whole():
    model, x = ConvModel(kernel=3).eval(), _images()
    probs = predict_probs(model, x)
    assert torch.allclose(probs, predict_whole(model, x).softmax(1), atol=1e-6)
    assert not probs.requires_grad


def test_flip_on_flip_equivariant_model_changes_nothing():
    x = _images()
    model = ConvModel(kernel=3, symmetric=True).eval()
    assert torch.allclose(predict_probs(model, x, flip=True), predict_probs(model, x), atol=1e-6)
    model = ConvModel(kernel=1).eval()
    kw = {"mode": "slide", "crop_size": (5, 6), "stride": (3, 4)}
    assert torch.allclose(
        predict_probs(model, x, flip=True, **kw), predict_probs(model, x, **kw), atol=1e-6
    )
    asym = ConvModel(kernel=3).eval()
    assert not torch.allclose(predict_probs(asym, x, flip=True), predict_probs(asym, x))


@pytest.mark.parametrize(
    "kw",
    [
        {"scales": (0.5, 0.75, 1.25)},
        {"scales": (0.5, 1.0), "flip": True, "base_size": 20},
        {"mode": "slide", "crop_size": 7, "scales": (0.75, 1.5), "flip": True},
        {"mode": "slide", "crop_size": (9, 5), "stride": (3, 2), "base_size": 11},
    ],
)
def test_multiscale_shapes_on_odd_sizes(kw):
    model, x = ConvModel(kernel=3).eval(), _images(13, 17)
    probs = predict_probs(model, x, **kw)
    assert probs.shape == (2, K, 13, 17)
    assert torch.allclose(probs.sum(1), torch.ones(2, 13, 17), atol=1e-5)


def test_multiscale_on_constant_image_equals_single_scale():
    model, x = ConvModel(kernel=1).eval(), torch.ones(1, 3, 9, 11) * torch.randn(1, 3, 1, 1)
    multi = predict_probs(model, x, scales=(0.5, 0.75, 1.5), flip=True)
    assert torch.allclose(multi, predict_probs(model, x), atol=1e-5)


def test_scaled_size():
    assert _scaled_size(300, 500, 1.0, 512) == (307, 512)
    assert _scaled_size(500, 300, 0.5, 512) == (256, 154)
    assert _scaled_size(13, 17, 0.5, None) == (7, 9)
    assert _scaled_size(3, 3, 0.01, None) == (1, 1)


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "bogus"},
        {"mode": "slide"},
        {"mode": "slide", "crop_size": 0},
        {"mode": "slide", "crop_size": (0, 5)},
        {"mode": "slide", "crop_size": (1, 2, 3)},
        {"mode": "slide", "crop_size": (4.5, 4)},
        {"mode": "slide", "crop_size": 4.0},
        {"mode": "slide", "crop_size": 4, "stride": 0},
        {"mode": "slide", "crop_size": 4, "stride": 5},
        {"scales": ()},
        {"scales": (1.0, -0.5)},
    ],
)
def test_bad_options_raise_config_error(kw):
    with pytest.raises(ConfigError):
        predict_probs(ConvModel(), _images(), **kw)


def test_slide_checks_num_classes():
    with pytest.raises(ValueError):
        predict_slide(ConvModel(), _images(), K + 1, 8, 4)


class OneHotModel(nn.Module):
    """Predicts the class stored in image channel 0; records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen_training.append(self.training)
        labels = x[:, 0].round().long().clamp(0, K - 1)
        return {"out": F.one_hot(labels, K).permute(0, 3, 1, 2).to(x.dtype) * self.scale}


def _fake_data(seed: int = 0) -> tuple[TensorDataset, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(K, (5, 6, 7), generator=g)
    masks = torch.randint(K, (5, 6, 7), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.2] = 255
    images = torch.zeros(5, 3, 6, 7)
    images[:, 0] = pred.float()
    expected = torch.zeros(K, K, dtype=torch.int64)
    for t, p in zip(masks.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            expected[t, p] += 1
    return TensorDataset(images, masks), expected


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"amp_dtype": torch.bfloat16},
        {"mode": "slide", "crop_size": (4, 5), "stride": (2, 3), "flip": True},
    ],
)
def test_evaluate_gives_known_confusion_matrix(kw):
    data, expected = _fake_data()
    model = OneHotModel().train()
    cm = evaluate(
        model, DataLoader(data, batch_size=2), num_classes=K, device="cpu", progress=False, **kw
    )
    assert torch.equal(cm.matrix, expected)
    assert model.seen_training and not any(model.seen_training)
    assert model.training  # previous mode restored
    assert cm.compute().all_acc == pytest.approx(expected.diag().sum().item() / expected.sum())


def test_evaluate_rejects_bad_mode_before_running():
    data, _ = _fake_data()
    model = OneHotModel()
    with pytest.raises(ConfigError):
        evaluate(model, DataLoader(data), num_classes=K, device="cpu", mode="tiles")
    assert model.seen_training == [] and model.training
