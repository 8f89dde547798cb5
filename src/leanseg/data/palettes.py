"""Colour palettes for index masks (PASCAL VOC bit-interleaving rule) and colourising helpers."""

from __future__ import annotations

import numpy as np
from PIL import Image

VOID_COLOR = (224, 224, 192)  # the colour VOC gives index 255 (boundary / ignore)


def voc_palette(n: int = 256) -> np.ndarray:
    """Return the PASCAL VOC palette as an ``(n, 3)`` uint8 array.

    Class ``i`` takes its colour bits from ``i``'s bits in groups of three (bit 0 -> R, bit 1 -> G,
    bit 2 -> B), placed from the most significant bit downwards.
    """
    if not 1 <= n <= 256:
        raise ValueError(f"palette size must be in [1, 256], got {n}")
    ids = np.arange(n, dtype=np.int64)
    palette = np.zeros((n, 3), dtype=np.int64)
    c = ids.copy()
    for j in range(8):
        for ch in range(3):
            palette[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return palette.astype(np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Map an ``HxW`` index mask to an ``HxWx3`` uint8 RGB image; 255 gets the VOC void colour."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW index mask, got shape {mask.shape}")
    pal = voc_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    if pal.shape[0] < 256:
        full = np.zeros((256, 3), dtype=np.uint8)
        full[: pal.shape[0]] = pal
        pal = full
    pal = pal.copy()
    pal[255] = VOID_COLOR
    return pal[mask.astype(np.uint8)]


def palette_to_pil(palette: np.ndarray) -> list[int]:
    """Flatten an ``(n, 3)`` palette to the 768-entry list that ``PIL.Image.putpalette`` expects."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    src = np.asarray(palette, dtype=np.uint8)[:256]
    pal[: src.shape[0]] = src
    return pal.reshape(-1).tolist()


def mask_to_pil(mask: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """Wrap an ``HxW`` uint8 index mask as a mode "P" PIL image with ``palette`` (VOC default)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW index mask, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("mask values must be in [0, 255] to be stored as a palette PNG")
        mask = mask.astype(np.uint8)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(palette_to_pil(voc_palette(256) if palette is None else palette))
    return img
