"""A plain folder dataset: ``images/`` + ``masks/`` matched by file stem.

Masks are index PNGs, or colour PNGs converted to class ids through a palette (class ``i`` has
colour ``palette[i]``; the VOC void colour means ignore unless a class uses it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from leanseg.data.image_io import read_mask
from leanseg.data.pairs import Pair, SegmentationDataset
from leanseg.data.palettes import VOID_COLOR
from leanseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_LAYOUT = "a dir with images/ and masks/ (optionally images/<split>/ and masks/<split>/)"


def read_palette_file(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """A palette file: one class per line, ``R G B [name]`` (or comma separated), in class
    order; ``#`` starts a comment. Returns ``(K x 3 uint8 colours, names or None)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"palette file '{path}' not found: set data.palette_file to a text file")
    colours, names = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split(maxsplit=3)
        if not fields:
            continue
        try:
            rgb = [int(v) for v in fields[:3]]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise DataError(f"{path}:{n}: expected 'R G B [name]' with values 0-255, got {line!r}")
        colours.append(rgb)
        names.append(fields[3].strip() if len(fields) == 4 else "")
    if not colours:
        raise DataError(f"palette file '{path}' lists no colours; write one 'R G B name' per class")
    return np.array(colours, np.uint8), names if all(names) else None


def _split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    if not images.is_dir():
        raise DataError(f"image directory '{images}' not found: set data.root to {_LAYOUT}")
    if (images / split).is_dir():
        return images / split, masks / split
    splits = sorted(p.name for p in images.iterdir() if p.is_dir())
    if splits:
        raise DataError(
            f"split directory '{images / split}' not found (available: {', '.join(splits)}); "
            "set the split name"
        )
    return images, masks  # a flat folder: every split is the whole folder


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class FolderSegmentation(SegmentationDataset):
    """``images/[split/]*.{jpg,png,...}`` with ``masks/[split/]<stem>.png``.

    With ``colours`` (``K x 3``, e.g. from :func:`read_palette_file`) colour masks are
    converted to class ids; a colour that is not in it raises a DataError naming it.
    """

    LAYOUT = _LAYOUT

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        colours: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        self.colour_to_class: dict[int, int] | None = None
        if colours is not None:
            kwargs["num_classes"] = kwargs.get("num_classes") or len(colours)
            palette = np.zeros((256, 3), np.uint8)
            palette[: len(colours)] = colours
            kwargs.setdefault("palette", palette)
        super().__init__(root, split, **kwargs)
        if colours is not None:
            table = {int(k): i for i, k in enumerate(_colour_keys(np.asarray(colours)))}
            table.setdefault(int(_colour_keys(np.array(VOID_COLOR))), self.ignore_index)
            self.colour_to_class = table

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """Images of ``images/[split/]`` with the same-stem PNG of ``masks/[split/]``."""
        image_dir, mask_dir = _split_dirs(root, split)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, mask_dir / f"{p.stem}.png") for p in images]

    def read_target(self, path: Path) -> np.ndarray:
        """Class ids of an index mask, or of a colour mask through the palette."""
        mask = read_mask(path, allow_rgb=self.colour_to_class is not None)
        if mask.ndim == 2:
            return mask
        keys, inverse = np.unique(_colour_keys(mask), return_inverse=True)
        ids = np.empty(len(keys), np.uint8)
        for j, key in enumerate(keys.tolist()):
            if key not in self.colour_to_class:
                rgb = (key >> 16, (key >> 8) & 255, key & 255)
                raise DataError(
                    f"{path}: colour {rgb} is not in the palette; add it to data.palette_file "
                    "or fix the mask"
                )
            ids[j] = self.colour_to_class[key]
        return ids[inverse.reshape(mask.shape[:2])]
