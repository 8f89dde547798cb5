"""Inference modes: whole image, sliding window, multi-scale and flip (deeplab.md section 5).

All functions take a model already in eval mode whose ``forward(images)`` returns
``{"out": logits}`` at the input size, and images that are already normalised (so padding with
0 pads with the dataset mean). They run without autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from leanseg.errors import ConfigError
from leanseg.models.base import model_outputs

__all__ = ["MODES", "check_options", "predict_probs", "predict_slide", "predict_whole"]

MODES = ("whole", "slide")
Pair = int | tuple[int, int]


def _pair(value: Pair, name: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints, each >= 1; ConfigError otherwise."""
    pair = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, Integral) and v >= 1 for v in pair):
        raise ConfigError(f"{name} must be an int or (h, w) pair of ints >= 1, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_options(
    mode: str,
    scales: Sequence[float] = (1.0,),
    crop_size: Pair | None = None,
    stride: Pair | None = None,
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Validate user options; return (crop_size, stride) as pairs (stride defaults to 2/3 crop)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ConfigError(f"scales must be a non-empty list of numbers > 0, got {list(scales)}")
    if mode == "whole":
        return None, None
    if crop_size is None:
        raise ConfigError("crop_size is required for mode=slide; give an int or (h, w) >= 1")
    crop = _pair(crop_size, "crop_size")
    step = tuple(math.ceil(2 * c / 3) for c in crop) if stride is None else _pair(stride, "stride")
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ConfigError(f"stride must be <= crop_size {crop} so windows cover the image")
    return crop, step


def _starts(size: int, crop: int, step: int) -> list[int]:
    """Window offsets on a regular grid, the last one flush with the border."""
    n = math.ceil(max(size - crop, 0) / step) + 1
    return [min(i * step, size - crop) for i in range(n)]


@torch.no_grad()
def predict_whole(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits (N, K, H, W) of the whole images in one forward pass."""
    return model_outputs(model(images))["out"]


@torch.no_grad()
def predict_slide(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int | None,
    crop_size: Pair,
    stride: Pair,
    *,
    probs: bool = False,
) -> torch.Tensor:
    """Sliding-window prediction (N, K, H, W), float32.

    Images smaller than the crop are padded bottom/right with 0 (the normalised mean). Every
    window's logits (or, with ``probs=True``, softmax probabilities, as semseg does) are summed
    and divided by how many windows cover each pixel; the padding is cropped away.
    ``num_classes=None`` takes K from the first window's output.
    """
    (ch, cw), (sh, sw) = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    check_options("slide", crop_size=(ch, cw), stride=(sh, sw))
    n, _, h, w = images.shape
    x = F.pad(images, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    ph, pw = x.shape[-2:]
    acc = None
    count = x.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for y in _starts(ph, ch, sh):
        for xo in _starts(pw, cw, sw):
            out = model_outputs(model(x[:, :, y : y + ch, xo : xo + cw]))["out"].float()
            if acc is None:
                if num_classes is not None and out.shape[1] != num_classes:
                    raise ValueError(f"model gave {out.shape[1]} channels, not {num_classes}")
                acc = x.new_zeros((n, out.shape[1], ph, pw), dtype=torch.float32)
            acc[:, :, y : y + ch, xo : xo + cw] += out.softmax(1) if probs else out
            count[:, :, y : y + ch, xo : xo + cw] += 1
    return (acc / count)[:, :, :h, :w]


def _scaled_size(h: int, w: int, scale: float, base_size: int | None) -> tuple[int, int]:
    """Size of the image at one scale: h*s x w*s, or long side round(s*base_size) (semseg)."""
    if base_size is None:
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    long = max(1, int(scale * base_size + 0.5))
    if h >= w:
        return long, max(1, int(long * w / h + 0.5))
    return max(1, int(long * h / w + 0.5)), long


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: Pair | None = None,
    stride: Pair | None = None,
    base_size: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N, K, H, W) at the input size, averaged over scales and flips.

    Each scale resizes the images (bilinear) by the factor, or so their long side is
    ``round(scale * base_size)`` when ``base_size`` is given; runs ``mode`` ("whole" or "slide"
    with ``crop_size``/``stride``, stride defaulting to ceil(2/3 crop)); averages with the
    horizontally flipped pass when ``flip``; resizes back to the input size.
    """
    crop, step = check_options(mode, scales, crop_size, stride)
    h, w = images.shape[-2:]

    def run(x: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return predict_whole(model, x).float().softmax(1)
        return predict_slide(model, x, None, crop, step, probs=True)

    total = None
    for scale in scales:
        size = _scaled_size(h, w, scale, base_size)
        x = images
        if size != (h, w):
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        p = run(x)
        if flip:
            p = (p + run(x.flip(-1)).flip(-1)) / 2
        if size != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = p if total is None else total + p
    return total / len(scales)
