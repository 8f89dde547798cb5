"""A plain folder dataset: ``images/`` + ``masks/`` matched by file stem.

Masks are index PNGs, or colour PNGs converted to class ids through a palette (class ``i`` has
colour ``palette[i]``; the VOC void colour means ignore unless a class uses it).

Splits come from ``images/<split>/`` + ``masks/<split>/``, from split lists
(``data.list_file``), or, for a flat folder, from ``val_fraction`` (:func:`hash_split`). A flat
folder with none of these is refused: every split would be the whole folder (val == train).
"""

from __future__ import annotations

import hashlib
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


def _split_dirs(root: Path, split: str) -> tuple[Path, Path, bool]:
    """``(image dir, mask dir, flat)`` of ``split``; ``flat``: no split subfolders at all."""
    images, masks = root / "images", root / "masks"
    if not images.is_dir():
        raise DataError(f"image directory '{images}' not found: set data.root to {_LAYOUT}")
    if (images / split).is_dir():
        return images / split, masks / split, False
    splits = sorted(p.name for p in images.iterdir() if p.is_dir())
    if splits:
        raise DataError(
            f"split directory '{images / split}' not found (available: {', '.join(splits)}); "
            "set the split name"
        )
    return images, masks, True


def hash_split(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split file names into ``(train, val)``, the same way on every run and machine.

    The ``round(n * val_fraction)`` names (at least 1, at most n - 1) with the smallest SHA-1
    digests of the name are val, the rest train; both keep the input order. Adding files moves
    few of the others. Needs at least two names.
    """
    k = min(len(names) - 1, max(1, round(len(names) * val_fraction)))
    ranked = sorted(names, key=lambda n: (hashlib.sha1(n.encode()).hexdigest(), n))
    val = set(ranked[:k])
    return [n for n in names if n not in val], [n for n in names if n in val]


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class FolderSegmentation(SegmentationDataset):
    """``images/[split/]*.{jpg,png,...}`` with ``masks/[split/]<stem>.png``.

    With ``colours`` (``K x 3``, e.g. from :func:`read_palette_file`) colour masks are
    converted to class ids; a colour that is not in it raises a DataError naming it.
    A flat folder (no split subfolders) needs a ``list_file`` or ``val_fraction``: then split
    ``val_split`` is the :func:`hash_split` val part and ``train_split`` the rest.
    """

    LAYOUT = _LAYOUT

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        colours: np.ndarray | None = None,
        val_fraction: float | None = None,
        train_split: str = "train",
        val_split: str = "val",
        **kwargs: Any,
    ) -> None:
        self.val_fraction, self.split_names = val_fraction, (train_split, val_split)
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
        image_dir, mask_dir, flat = _split_dirs(root, split)
        if not flat and self.val_fraction is not None:
            raise DataError(
                f"dataset '{root}' has split folders under '{image_dir.parent}' and "
                "data.val_fraction is set: remove data.val_fraction (the folders are the splits)"
            )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if flat:
            images = self._flat_split(image_dir, images, split)
        return [(p, mask_dir / f"{p.stem}.png") for p in images]

    def _flat_split(self, image_dir: Path, images: list[Path], split: str) -> list[Path]:
        """The images of ``split`` in a flat folder, by ``val_fraction``."""
        train_split, val_split = self.split_names
        if self.val_fraction is None:
            raise DataError(
                f"dataset '{image_dir.parent}' is a flat folder (no images/{train_split}/, "
                f"images/{val_split}/): train and val would be the same images; set "
                "data.val_fraction (e.g. 0.2) or data.list_file (e.g. list/{split}.txt)"
            )
        if split not in self.split_names:
            raise DataError(
                f"dataset '{image_dir.parent}': a flat folder split by data.val_fraction has "
                f"only the splits {train_split!r} and {val_split!r}, not {split!r}"
            )
        if len(images) < 2:
            raise DataError(
                f"dataset '{image_dir}' has {len(images)} image(s): data.val_fraction needs at "
                "least 2 (one for train, one for val)"
            )
        train, val = hash_split([p.name for p in images], self.val_fraction)
        keep = set(val if split == val_split else train)
        return [p for p in images if p.name in keep]

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
