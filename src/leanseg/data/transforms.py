"""Joint image/mask transforms on numpy arrays, driven by an explicit ``np.random.Generator``.

Images are ``HxWx3`` uint8 RGB, masks ``HxW`` uint8 class ids (255 = ignore). Every random
transform draws only from the ``rng`` it is given, so a sample seeded as ``seed(epoch, position)``
comes out the same whatever the number of workers, and a resumed run repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

Size = int | tuple[int, int]
Pair = tuple[np.ndarray, np.ndarray]


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


def _fill(mean: Sequence[float]) -> tuple[float, float, float]:
    """The uint8-space image fill colour for a mean given in [0, 1]."""
    r, g, b = (round(float(m) * 255) for m in mean)
    return (r, g, b)


def _resize(image: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)  # pixel-centre aligned
    return image, mask


class RandomScale:
    """Scale both by ``s ~ U(lo, hi)``: image bilinear, mask nearest."""

    def __init__(self, lo: float = 0.5, hi: float = 2.0) -> None:
        if not 0 < lo <= hi:
            raise ValueError(f"need 0 < lo <= hi, got ({lo}, {hi})")
        self.lo, self.hi = lo, hi

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        s = rng.uniform(self.lo, self.hi)
        h, w = mask.shape
        return _resize(image, mask, max(1, round(h * s)), max(1, round(w * s)))


class RandomRotate:
    """With probability ``p`` rotate by ``U(-max_deg, max_deg)``; borders: mean colour and 255."""

    def __init__(self, max_deg: float = 10.0, p: float = 0.5, mean=IMAGENET_MEAN) -> None:
        self.max_deg, self.p, self.image_fill = float(max_deg), p, _fill(mean)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() >= self.p:
            return image, mask
        angle = rng.uniform(-self.max_deg, self.max_deg)
        h, w = mask.shape
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
        image = cv2.warpAffine(
            image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=self.image_fill
        )
        mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=IGNORE_INDEX)
        return image, mask


class RandomGaussianBlur:
    """With probability ``p`` blur the image with a ``ksize x ksize`` Gaussian (mask untouched)."""

    def __init__(self, p: float = 0.5, ksize: int = 5) -> None:
        if ksize <= 0 or ksize % 2 == 0:
            raise ValueError(f"ksize must be a positive odd number, got {ksize}")
        self.p, self.ksize = p, ksize

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() < self.p:
            image = cv2.GaussianBlur(image, (self.ksize, self.ksize), 0)
        return image, mask


class RandomHorizontalFlip:
    """With probability ``p`` mirror image and mask left-right."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() < self.p:
            image = np.ascontiguousarray(image[:, ::-1])
            mask = np.ascontiguousarray(mask[:, ::-1])
        return image, mask


GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as torchvision


class ColorJitter:
    """Random brightness, contrast, saturation and hue of the image (mask untouched), with
    torchvision ``ColorJitter`` semantics, applied in a random order.

    Factors: brightness ``b ~ U(max(0, 1 - brightness), 1 + brightness)`` (``x * b``), contrast
    ``c`` likewise (``c * x + (1 - c) * mean(gray(x))``), saturation ``s`` likewise
    (``s * x + (1 - s) * gray(x)``), hue ``h ~ U(-hue, hue)`` (the HSV hue turned by ``h`` of a
    full turn); ``gray = 0.299 R + 0.587 G + 0.114 B``. Each step clamps to [0, 255]; the
    arithmetic is float32 and the result is rounded to uint8 once, at the end. Draws from
    ``rng``: the order (``rng.permutation(4)``), then one factor per enabled component
    (brightness, contrast, saturation, hue). All four 0: the identity, and no draw.
    """

    def __init__(
        self,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
    ) -> None:
        for name, value in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if value < 0:
                raise ValueError(f"ColorJitter: {name} must be >= 0, got {value}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    @property
    def enabled(self) -> bool:
        """Whether any component is on (off: the transform draws nothing)."""
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        if not self.enabled:
            return image, mask
        order = rng.permutation(4)
        factors: dict[int, float] = {}
        for index, amount in enumerate((self.brightness, self.contrast, self.saturation)):
            if amount > 0:
                factors[index] = float(rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount))
        if self.hue > 0:
            factors[3] = float(rng.uniform(-self.hue, self.hue))
        x = image.astype(np.float32)
        for index in order:
            if int(index) in factors:
                x = _JITTER_STEPS[int(index)](x, factors[int(index)])
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), mask


def _brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(x * np.float32(factor), 0, 255)


def _blend(x: np.ndarray, other: np.ndarray | np.float32, factor: float) -> np.ndarray:
    f = np.float32(factor)
    return np.clip(f * x + (np.float32(1) - f) * other, 0, 255)


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, np.float32((x @ GRAY).mean()), factor)


def _saturation(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, (x @ GRAY)[..., None], factor)


def _hue(x: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(x / np.float32(255)), cv2.COLOR_RGB2HSV)  # H: 0..360
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(shift * 360.0), np.float32(360.0))
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255), 0, 255)


_JITTER_STEPS = (_brightness, _contrast, _saturation, _hue)


class PadIfSmaller:
    """Pad bottom/right up to ``size`` (image with the mean colour, mask with ``mask_fill``)."""

    def __init__(self, size: Size, mean=IMAGENET_MEAN, mask_fill: int = IGNORE_INDEX) -> None:
        self.size, self.image_fill, self.mask_fill = _hw(size), _fill(mean), mask_fill

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> Pair:
        h, w = mask.shape
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            border = cv2.BORDER_CONSTANT
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, border, value=self.image_fill)
            mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, border, value=self.mask_fill)
        return image, mask


class RandomCrop:
    """Crop a random ``size`` window (the input must be at least that large: pad it first)."""

    def __init__(self, size: Size) -> None:
        self.size = _hw(size)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
        (ch, cw), (h, w) = self.size, mask.shape
        if h < ch or w < cw:
            raise ValueError(f"RandomCrop{self.size}: input {h}x{w} is smaller; pad it first")
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        return image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


class ResizeShortCenterCrop:
    """Resize the short side to ``size`` and centre-crop ``size x size`` (VainF ``crop_val``)."""

    def __init__(self, size: int) -> None:
        self.size = _hw(size)[0]

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> Pair:
        h, w = mask.shape
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        image, mask = _resize(image, mask, nh, nw)
        y, x = (nh - self.size) // 2, (nw - self.size) // 2
        return image[y : y + self.size, x : x + self.size], mask[
            y : y + self.size, x : x + self.size
        ]


class ToTensorNormalize:
    """``(uint8 HxWx3, uint8 HxW)`` -> ``(float32 3xHxW normalised, int64 HxW)`` tensors."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3) * 255.0
        self.scale = 1.0 / (np.asarray(std, dtype=np.float32).reshape(1, 1, 3) * 255.0)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.astype(np.float32) - self.mean) * self.scale
        img_t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return img_t, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))


class Compose:
    """Apply transforms in order, all drawing from the same ``rng``."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple:
        """Returns ``(image, mask)``: arrays, or tensors when the last step is a tensor step."""
        if rng is None:
            rng = np.random.default_rng()
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.transforms)
        return f"Compose([{names}])"


def build_train_transform(
    crop_size: Size,
    scale: tuple[float, float] | None = (0.5, 2.0),
    rotate: float = 0.0,
    blur: bool = False,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
) -> Compose:
    """semseg order: scale -> rotate (p=0.5) -> blur (p=0.5) -> flip -> colour jitter -> pad ->
    crop -> normalise. ``jitter``: ``(brightness, contrast, saturation, hue)`` of
    :class:`ColorJitter`; all 0 adds no step (the pipeline and its draws are as without it)."""
    ts: list = []
    if scale is not None and tuple(scale) != (1.0, 1.0):
        ts.append(RandomScale(*scale))
    if rotate > 0:
        ts.append(RandomRotate(rotate, p=0.5, mean=mean))
    if blur:
        ts.append(RandomGaussianBlur(p=0.5))
    if flip:
        ts.append(RandomHorizontalFlip(0.5))
    color = ColorJitter(*jitter)
    if color.enabled:
        ts.append(color)
    ts += [PadIfSmaller(crop_size, mean=mean), RandomCrop(crop_size), ToTensorNormalize(mean, std)]
    return Compose(ts)


def build_eval_transform(
    crop_val: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Whole image (``crop_val=None``) or resize-short-side + centre crop, then normalise."""
    ts: list = [] if crop_val is None else [ResizeShortCenterCrop(crop_val)]
    return Compose([*ts, ToTensorNormalize(mean, std)])
