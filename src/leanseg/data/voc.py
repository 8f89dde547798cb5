"""PASCAL VOC 2012 segmentation (and any dataset written in its layout, e.g. ``synthetic``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leanseg.data.image_io import read_image, read_mask
from leanseg.data.palettes import voc_palette
from leanseg.data.transforms import ToTensorNormalize
from leanseg.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_LAYOUT = "with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/"

Item = int | tuple[int, int | Sequence[int]]


def resolve_voc_root(root: str | os.PathLike) -> Path:
    """Accept a ``VOC2012`` directory or a ``VOCdevkit`` directory holding one."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset root '{root}' not found: set data.root to a VOC2012 directory ({_LAYOUT})"
        )
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    return root


def read_split_ids(list_file: Path) -> list[str]:
    """Read a VOC list file: one image id per line (blank lines ignored)."""
    if not list_file.is_file():
        splits = sorted(p.stem for p in list_file.parent.glob("*.txt"))
        have = f"available: {', '.join(splits)}" if splits else "the directory has no list files"
        raise DataError(f"split list '{list_file}' not found ({have}); set the split name")
    ids = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise DataError(
                f"{list_file}:{n}: expected one image id per line (VOC format), got {line!r}"
            )
        ids.append(line)
    if not ids:
        raise DataError(f"split list '{list_file}' is empty; list one image id per line")
    return ids


def _check_files(directory: Path, ids: list[str], suffix: str, what: str) -> None:
    if not directory.is_dir():
        raise DataError(
            f"{what} directory '{directory}' not found: expected a VOC2012 dir {_LAYOUT}"
        )
    present = set(os.listdir(directory))
    missing = [i for i in ids if i + suffix not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"{what} '{directory / (missing[0] + suffix)}'{more} not found: "
            "add the files or remove their ids from the split list"
        )


class VOCSegmentation(Dataset):
    """``root/ImageSets/Segmentation/{split}.txt`` ids -> ``JPEGImages/{id}.jpg`` +
    ``{mask_dir}/{id}.png`` (index PNG, 255 = ignore).

    ``dataset[i]`` augments with a fresh random generator; ``dataset[(i, seed)]`` with
    ``np.random.default_rng(seed)`` (an int or a list of ints), which makes it reproducible.
    Returns ``(float 3xHxW image tensor, int64 HxW mask tensor)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        num_classes: int = 21,
        ignore_index: int = 255,
        transform: Callable | None = None,
        class_names: Sequence[str] | None = None,
        mask_dir: str = "SegmentationClass",
    ) -> None:
        if num_classes < 1 or not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise DataError(
                f"dataset '{root}': num_classes={num_classes}, ignore_index={ignore_index}; "
                "need 1 <= num_classes <= ignore_index <= 255 (masks are 8-bit)"
            )
        self.root = resolve_voc_root(root)
        self.split = split
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform if transform is not None else ToTensorNormalize()
        if class_names is None:
            class_names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else None
            class_names = class_names or [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise DataError(
                f"dataset '{self.root}': {len(class_names)} class names for num_classes="
                f"{num_classes}; give one name per class"
            )
        self.class_names = list(class_names)
        self.palette = voc_palette(256)
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / mask_dir
        self.ids = read_split_ids(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        _check_files(self.image_dir, self.ids, ".jpg", "image")
        _check_files(self.mask_dir, self.ids, ".png", "mask")

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, index: int) -> tuple[Path, Path]:
        """The ``(image, mask)`` file paths of sample ``index``."""
        i = self.ids[index]
        return self.image_dir / f"{i}.jpg", self.mask_dir / f"{i}.png"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw, validated ``(uint8 HxWx3 RGB image, uint8 HxW mask)`` of sample ``index``."""
        image_path, mask_path = self.paths(index)
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]} (WxH); re-export the mask at the image size"
            )
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[: self.num_classes] = 0
        counts[self.ignore_index] = 0
        bad = np.flatnonzero(counts)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            raise DataError(
                f"{mask_path}: labels {shown} outside [0, {self.num_classes}) and not the ignore "
                f"index {self.ignore_index}; check num_classes or remap the mask"
            )
        return image, mask

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(item, tuple):
            index, seed = item
            rng = np.random.default_rng(seed)
        else:
            index, rng = item, np.random.default_rng()
        image, mask = self.load(int(index))
        return self.transform(image, mask, rng)

    def __repr__(self) -> str:
        return (
            f"VOCSegmentation(root='{self.root}', split='{self.split}', n={len(self)}, "
            f"num_classes={self.num_classes})"
        )
