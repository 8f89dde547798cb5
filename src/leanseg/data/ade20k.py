"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes, raw 0 = other -> ignore."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from leanseg.data.image_io import read_mask
from leanseg.data.pairs import Pair, SegmentationDataset, existing_root
from leanseg.errors import DataError

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
SPLIT_DIRS = {"train": "training", "val": "validation"}
_LAYOUT = "ADEChallengeData2016/ with images/ and annotations/ {training,validation}/"


def reduce_zero_label() -> np.ndarray:
    """The 256-entry lookup table ``0 -> 255, v -> v - 1`` (mmseg ``reduce_zero_label``)."""
    lut = np.arange(-1, 255, dtype=np.int64)
    lut[0] = 255
    lut[255] = 255
    return lut.astype(np.uint8)


_REDUCE_ZERO = reduce_zero_label()


class ADE20KSegmentation(SegmentationDataset):
    """``images/{training,validation}/*.jpg`` + ``annotations/.../*.png`` (raw values 0-150);
    the raw masks are mapped 0 -> 255 (ignore), v -> v - 1. The palette is VOC's."""

    CLASSES = ADE20K_CLASSES
    LAYOUT = _LAYOUT

    def resolve_root(self, root: str | os.PathLike) -> Path:
        """``ADEChallengeData2016`` or the directory holding it."""
        root = existing_root(root, _LAYOUT)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        return root

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """``images/<dir>/*.jpg`` with ``annotations/<dir>/<stem>.png`` (train -> training)."""
        sub = SPLIT_DIRS.get(split, split)
        image_dir, mask_dir = root / "images" / sub, root / "annotations" / sub
        if not image_dir.is_dir():
            raise DataError(
                f"ADE20K split directory '{image_dir}' not found: use split train/val (training/"
                f"validation) and set data.root to {_LAYOUT}"
            )
        return [(p, mask_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]

    def read_target(self, path: Path) -> np.ndarray:
        """Train ids ``0..149`` and 255 from a raw ``0..150`` annotation."""
        return _REDUCE_ZERO[read_mask(path)]
