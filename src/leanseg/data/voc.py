"""PASCAL VOC 2012 segmentation, its SBD trainaug extension, and any dataset written in its
layout (e.g. ``synthetic``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from leanseg.data.pairs import Pair, SegmentationDataset, existing_root, read_split_ids

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_LAYOUT = "a VOC2012 dir with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/"
AUG_SPLITS = ("train", "train_aug")  # voc_aug: these read train_aug.txt + SegmentationClassAug


def resolve_voc_root(root: str | os.PathLike) -> Path:
    """Accept a ``VOC2012`` directory or a ``VOCdevkit`` directory holding one."""
    root = existing_root(root, _LAYOUT)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    return root


class VOCSegmentation(SegmentationDataset):
    """``root/ImageSets/Segmentation/{split}.txt`` ids -> ``JPEGImages/{id}.jpg`` +
    ``{mask_dir}/{id}.png`` (index PNG, 255 = ignore).

    ``aug=True`` is the VainF trainaug layout: the ``train`` (or ``train_aug``) split reads
    ``train_aug.txt`` with labels from ``SegmentationClassAug``; other splits are plain VOC.
    Other keywords (``list_file``, ``num_classes``, ...): see :class:`SegmentationDataset`.
    """

    CLASSES = VOC_CLASSES
    LAYOUT = _LAYOUT

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        mask_dir: str = "SegmentationClass",
        aug: bool = False,
        **kwargs: Any,
    ) -> None:
        self.ids: list[str] | None = None  # None when the pairs come from a list_file
        self.mask_dir_name, self.aug = mask_dir, aug
        super().__init__(root, split, **kwargs)

    def resolve_root(self, root: str | os.PathLike) -> Path:
        """A ``VOC2012`` directory or a ``VOCdevkit`` directory holding one."""
        return resolve_voc_root(root)

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """Ids of the split list, joined to ``JPEGImages`` and the mask directory."""
        list_name, mask_dir = split, self.mask_dir_name
        if self.aug and split in AUG_SPLITS:
            list_name, mask_dir = "train_aug", "SegmentationClassAug"
        self.image_dir, self.mask_dir = root / "JPEGImages", root / mask_dir
        self.ids = read_split_ids(root / "ImageSets" / "Segmentation" / f"{list_name}.txt")
        return [(self.image_dir / f"{i}.jpg", self.mask_dir / f"{i}.png") for i in self.ids]
