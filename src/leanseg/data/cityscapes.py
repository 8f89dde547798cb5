"""Cityscapes fine annotations: 19 train classes, labelId -> trainId built in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from leanseg.data.image_io import read_mask, write_label_png
from leanseg.data.pairs import Pair, SegmentationDataset
from leanseg.errors import DataError

# (trainId name, labelId, RGB) in trainId order; every other labelId (0-6, 9, 10, 14-16, 18,
# 29, 30 and the license plate's -1) maps to 255.
CITYSCAPES_TABLE: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in CITYSCAPES_TABLE)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
_LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_*.png"


def label_to_train_id() -> np.ndarray:
    """The 256-entry labelId -> trainId lookup table (255 for every id that is not trained)."""
    lut = np.full(256, 255, np.uint8)
    for train_id, (_, label_id, _) in enumerate(CITYSCAPES_TABLE):
        lut[label_id] = train_id
    return lut


_LUT = label_to_train_id()


def cityscapes_palette() -> np.ndarray:
    """``(256, 3)`` uint8: trainId i gets the table's RGB, the rest black."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(CITYSCAPES_TABLE)] = [rgb for _, _, rgb in CITYSCAPES_TABLE]
    return palette


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes ``leftImg8bit`` images with ``gtFine`` labels of one split.

    Reads ``*_gtFine_labelTrainIds.png`` where present, else maps ``*_gtFine_labelIds.png``
    through :func:`label_to_train_id` on the fly. With ``list_file`` (semseg's
    ``list/fine_{split}.txt`` pairs) the pairs come from that list.
    """

    CLASSES = CITYSCAPES_CLASSES
    LAYOUT = f"a directory with {_LAYOUT}"

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """Every ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with its gtFine label file."""
        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            have = sorted(p.name for p in (root / "leftImg8bit").glob("*") if p.is_dir())
            raise DataError(
                f"Cityscapes split directory '{image_dir}' not found (splits: {have or 'none'}); "
                f"set data.root to {self.LAYOUT}"
            )
        pairs: list[Pair] = []
        for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = image.name[: -len(IMAGE_SUFFIX)]
            labels = root / "gtFine" / split / image.parent.name
            train_ids = labels / (stem + TRAIN_IDS_SUFFIX)
            pairs.append(
                (image, train_ids if train_ids.is_file() else labels / (stem + LABEL_IDS_SUFFIX))
            )
        return pairs

    def default_palette(self) -> np.ndarray:
        """The table's colours."""
        return cityscapes_palette()

    def read_target(self, path: Path) -> np.ndarray:
        """Train ids: ``_labelIds`` masks are mapped, anything else is read as train ids."""
        mask = read_mask(path)
        return _LUT[mask] if path.name.endswith(LABEL_IDS_SUFFIX) else mask


def prepare_cityscapes(root: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_labelIds.png`` (atomically);
    existing ones are kept unless ``overwrite``. Returns a one-line summary."""
    root = Path(root).expanduser()
    sources = sorted((root / "gtFine").glob(f"*/*/*{LABEL_IDS_SUFFIX}"))
    if not sources:
        raise DataError(
            f"no *{LABEL_IDS_SUFFIX} files under '{root / 'gtFine'}': pass the Cityscapes root "
            "(the directory holding gtFine/ and leftImg8bit/)"
        )
    written, kept = 0, 0
    for src in sources:
        dst = src.with_name(src.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)
        if dst.exists() and not overwrite:
            kept += 1
            continue
        write_label_png(dst, _LUT[read_mask(src)])
        written += 1
    return (
        f"cityscapes: wrote {written} *{TRAIN_IDS_SUFFIX} files, kept {kept} existing "
        f"({len(sources)} label files under {root / 'gtFine'})"
    )
