import cv2
import numpy as np
import pytest
import torch

from leanseg.data.transforms import (
    IMAGENET_MEAN,
    PadIfSmaller,
    RandomCrop,
    RandomGaussianBlur,
    RandomHorizontalFlip,
    RandomRotate,
    RandomScale,
    ResizeShortCenterCrop,
    ToTensorNormalize,
    build_eval_transform,
    build_train_transform,
)

MEAN_FILL = [round(m * 255) for m in IMAGENET_MEAN]


def blocky_pair(h: int = 60, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image of 10x10 constant blocks and the mask derived from it (red channel // 32)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 8, (h // 10, w // 10), dtype=np.uint8)
    mask = np.kron(small, np.ones((10, 10), np.uint8))
    image = np.stack([mask * 32 + 16, np.full_like(mask, 100), 255 - mask * 32], axis=-1)
    return image.astype(np.uint8), mask


def derived(image: np.ndarray) -> np.ndarray:
    return image[..., 0] // 32


def test_random_scale_shapes_and_labels():
    image, mask = blocky_pair()
    out_i, out_m = RandomScale(1.5, 1.5)(image, mask, np.random.default_rng(0))
    assert out_i.shape == (90, 120, 3) and out_m.shape == (90, 120)
    assert out_i.dtype == np.uint8 and out_m.dtype == np.uint8
    assert set(np.unique(out_m)) <= set(np.unique(mask))


def test_random_rotate_fills_borders():
    image, mask = blocky_pair()
    out_i, out_m = RandomRotate(30, p=1.0)(image, mask, np.random.default_rng(3))
    assert out_m.shape == mask.shape
    assert set(np.unique(out_m)) <= set(np.unique(mask)) | {255}
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    assert any(out_m[c] == 255 for c in corners)
    for c in corners:
        if out_m[c] == 255:
            assert out_i[c].tolist() == MEAN_FILL


def test_rotate_and_blur_skip_with_p0():
    image, mask = blocky_pair()
    rng = np.random.default_rng(0)
    for t in (RandomRotate(10, p=0.0), RandomGaussianBlur(p=0.0), RandomHorizontalFlip(p=0.0)):
        out_i, out_m = t(image, mask, rng)
        assert np.array_equal(out_i, image) and np.array_equal(out_m, mask)


def test_blur_changes_image_only():
    image, mask = blocky_pair()
    out_i, out_m = RandomGaussianBlur(p=1.0)(image, mask, np.random.default_rng(0))
    assert not np.array_equal(out_i, image)
    assert np.array_equal(out_m, mask)


def test_flip_keeps_alignment():
    image, mask = blocky_pair()
    out_i, out_m = RandomHorizontalFlip(p=1.0)(image, mask, np.random.default_rng(0))
    assert np.array_equal(out_m, mask[:, ::-1])
    assert np.array_equal(derived(out_i), out_m)
    assert out_i.flags.c_contiguous and out_m.flags.c_contiguous


def test_pad_if_smaller():
    image, mask = blocky_pair(30, 40)
    out_i, out_m = PadIfSmaller((50, 45))(image, mask)
    assert out_i.shape == (50, 45, 3) and out_m.shape == (50, 45)
    assert np.array_equal(out_m[:30, :40], mask) and np.array_equal(out_i[:30, :40], image)
    assert (out_m[30:] == 255).all() and (out_m[:, 40:] == 255).all()
    assert out_i[40, 44].tolist() == MEAN_FILL
    same_i, _ = PadIfSmaller(20)(image, mask)
    assert same_i is image


def test_random_crop_alignment_and_errors():
    image, mask = blocky_pair()
    for seed in range(5):
        out_i, out_m = RandomCrop((32, 48))(image, mask, np.random.default_rng(seed))
        assert out_i.shape == (32, 48, 3) and out_m.shape == (32, 48)
        assert np.array_equal(derived(out_i), out_m)
    with pytest.raises(ValueError, match="pad it first"):
        RandomCrop(100)(image, mask, np.random.default_rng(0))


def test_resize_short_center_crop():
    image, mask = blocky_pair(60, 80)
    out_i, out_m = ResizeShortCenterCrop(30)(image, mask)
    assert out_i.shape == (30, 30, 3) and out_m.shape == (30, 30)
    assert set(np.unique(out_m)) <= set(np.unique(mask))


def test_to_tensor_normalize():
    image = np.zeros((4, 5, 3), np.uint8)
    image[...] = MEAN_FILL
    mask = np.full((4, 5), 7, np.uint8)
    x, y = ToTensorNormalize()(image, mask)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    assert y.shape == (4, 5) and y.dtype == torch.int64 and int(y[0, 0]) == 7
    assert x.abs().max() < 0.01


def test_train_transform_shapes_labels_and_alignment():
    image, mask = blocky_pair(60, 80)
    tf = build_train_transform((48, 64), scale=(0.5, 2.0), flip=True)
    for seed in range(6):
        x, y = tf(image, mask, np.random.default_rng(seed))
        assert x.shape == (3, 48, 64) and y.shape == (48, 64) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= set(np.unique(mask).tolist()) | {255}
        # undo the normalisation and check the mask still matches the image (block interiors)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        red = ((x * std + mean) * 255).round()[0].clamp(0, 255).to(torch.uint8).numpy()
        m = y.numpy().astype(np.uint8)
        kernel = np.ones((3, 3), np.uint8)
        interior = (cv2.dilate(m, kernel) == cv2.erode(m, kernel)) & (m != 255)
        assert interior.mean() > 0.3
        assert (derived(red[..., None].repeat(3, -1))[interior] == m[interior]).mean() > 0.99


def test_full_train_transform_with_rotate_and_blur():
    image, mask = blocky_pair(60, 80)
    tf = build_train_transform(40, scale=(0.5, 1.5), rotate=10, blur=True)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == [
        "RandomScale",
        "RandomRotate",
        "RandomGaussianBlur",
        "RandomHorizontalFlip",
        "PadIfSmaller",
        "RandomCrop",
        "ToTensorNormalize",
    ]
    x, y = tf(image, mask, np.random.default_rng(0))
    assert x.shape == (3, 40, 40) and y.shape == (40, 40)


def test_same_seed_same_output_different_seed_differs():
    image, mask = blocky_pair(60, 80)
    tf = build_train_transform(40, rotate=10, blur=True)
    a = tf(image, mask, np.random.default_rng([1, 2, 3]))
    b = tf(image, mask, np.random.default_rng([1, 2, 3]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = [tf(image, mask, np.random.default_rng(s))[0] for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_transforms_leave_global_rngs_alone():
    image, mask = blocky_pair(60, 80)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    build_train_transform(40, rotate=10, blur=True)(image, mask, np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_eval_transform():
    image, mask = blocky_pair(60, 80)
    x, y = build_eval_transform()(image, mask)
    assert x.shape == (3, 60, 80) and torch.equal(y, torch.from_numpy(mask).long())
    x, y = build_eval_transform(crop_val=32)(image, mask)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
