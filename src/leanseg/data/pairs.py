"""What every segmentation dataset shares: list files, file checks and sample validation.

A dataset is a list of ``(image path, mask path or None)`` pairs plus its classes; subclasses
only find the pairs (from their on-disk layout or a list file) and may override
:meth:`SegmentationDataset.read_target` to map raw mask values to train ids.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leanseg.data.image_io import MissingFileError, read_image, read_mask
from leanseg.data.palettes import voc_palette
from leanseg.data.transforms import ToTensorNormalize
from leanseg.errors import DataError

Item = int | tuple[int, int | Sequence[int]]
Pair = tuple[Path, Path | None]


def split_item(item: Item) -> tuple[int, np.random.Generator]:
    """``index`` or ``(index, seed)`` -> the index and the generator that augments the sample."""
    if isinstance(item, tuple):
        index, seed = item
        return int(index), np.random.default_rng(seed)
    return int(item), np.random.default_rng()


def existing_root(root: str | os.PathLike, layout: str) -> Path:
    """``root`` as a Path, or a DataError saying which layout ``data.root`` should hold."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset root '{path}' not found: set data.root to {layout}")
    return path


def _list_lines(list_file: Path, what: str) -> list[tuple[int, list[str]]]:
    """Non-blank lines of a list file as ``(line number, fields)``."""
    if not list_file.is_file():
        lists = sorted(p.stem for p in list_file.parent.glob("*.txt"))
        have = f"available: {', '.join(lists)}" if lists else "the directory has no list files"
        raise DataError(f"split list '{list_file}' not found ({have}); set the split name")
    lines = [(n, line.split()) for n, line in enumerate(list_file.read_text().splitlines(), 1)]
    lines = [(n, fields) for n, fields in lines if fields]
    if not lines:
        raise DataError(f"split list '{list_file}' is empty; list {what} per line")
    return lines


def read_split_ids(list_file: Path) -> list[str]:
    """Read a VOC / VainF list file: one image id per line (blank lines ignored)."""
    ids = []
    for n, fields in _list_lines(list_file, "one image id"):
        if len(fields) != 1:
            raise DataError(
                f"{list_file}:{n}: expected one image id per line (VOC format), "
                f"got {' '.join(fields)!r}"
            )
        ids.append(fields[0])
    return ids


def read_pair_list(list_file: Path, root: Path) -> list[Pair]:
    """Read an ``image label`` list (semseg/acosp, relative to ``root``; chenxi's leading "/"
    is accepted); a line with one path is an unlabelled (test) image."""
    pairs: list[Pair] = []
    for n, fields in _list_lines(list_file, "'image_path label_path'"):
        if len(fields) > 2:
            raise DataError(
                f"{list_file}:{n}: expected 'image_path label_path' (or one image path) per "
                f"line, got {len(fields)} fields"
            )
        paths = [root / f.lstrip("/") for f in fields]
        pairs.append((paths[0], paths[1] if len(paths) == 2 else None))
    return pairs


def check_files_exist(paths: Iterable[Path], what: str, layout: str = "") -> None:
    """Raise one DataError naming the first missing file (or directory) and how many more."""
    by_dir: dict[Path, list[Path]] = defaultdict(list)
    for p in paths:
        by_dir[p.parent].append(p)
    missing: list[Path] = []
    for directory, files in by_dir.items():
        if not directory.is_dir():
            hint = f": expected {layout}" if layout else "; check data.root and the list file"
            raise DataError(f"{what} directory '{directory}' not found{hint}")
        present = set(os.listdir(directory))
        missing += [p for p in files if p.name not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingFileError(
            f"{what} '{missing[0]}'{more} not found: "
            "add the files or remove them from the split list"
        )


def out_of_range(counts: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Label values with a non-zero count in a 256-bin histogram outside [0, K) and not ignore."""
    counts = counts.copy()
    counts[:num_classes] = 0
    counts[ignore_index] = 0
    return np.flatnonzero(counts)


def label_error(path: Path, bad: np.ndarray, num_classes: int, ignore_index: int) -> DataError:
    """The DataError for mask labels outside the class range."""
    shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    return DataError(
        f"{path}: labels {shown} outside [0, {num_classes}) and not the ignore index "
        f"{ignore_index}; check data.num_classes / data.ignore_index or remap the mask"
    )


def size_error(image_path: Path, image: np.ndarray, mask_path: Path, mask: np.ndarray) -> DataError:
    """The DataError for a mask whose size differs from its image."""
    return DataError(
        f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
        f"{image.shape[1]}x{image.shape[0]} (WxH); re-export the mask at the image size"
    )


class SegmentationDataset(Dataset):
    """``(image, mask)`` file pairs -> validated, transformed samples.

    The pairs come from ``list_file`` (relative to the root, see :func:`read_pair_list`) or
    from :meth:`find_pairs`, which a subclass implements for its on-disk layout.
    ``dataset[i]`` augments with a fresh random generator; ``dataset[(i, seed)]`` with
    ``np.random.default_rng(seed)`` (an int or a list of ints), which makes it reproducible.
    Returns ``(float 3xHxW image tensor, int64 HxW mask tensor)``. A pair without a mask (a
    test list) gives a mask of ``ignore_index``. ``check_files=False`` skips the existence
    check (``check_dataset`` reports missing files itself).
    """

    seeded_items = True  # takes the training sampler's (index, seed) items

    CLASSES: tuple[str, ...] = ()
    LAYOUT = "a dataset directory"  # the expected on-disk layout, for error messages
    IGNORE_INDEX = 255

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        list_file: str | os.PathLike | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        transform: Callable | None = None,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | None = None,
        check_files: bool = True,
    ) -> None:
        self.root, self.split = self.resolve_root(root), split
        if list_file is not None:
            self.pairs = read_pair_list(self.root / list_file, self.root)
        else:
            self.pairs = self.find_pairs(self.root, split)
        if not self.pairs:
            raise DataError(
                f"dataset '{self.root}' split '{split}' has no images; expected {self.LAYOUT}"
            )
        num_classes = num_classes or len(self.CLASSES) or len(class_names or ())
        ignore_index = self.IGNORE_INDEX if ignore_index is None else ignore_index
        if num_classes < 1 or not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise DataError(
                f"dataset '{self.root}': num_classes={num_classes}, ignore_index={ignore_index}; "
                "need 1 <= num_classes <= ignore_index <= 255 (masks are 8-bit)"
            )
        if class_names is None:
            default = self.CLASSES if len(self.CLASSES) == num_classes else ()
            class_names = default or [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise DataError(
                f"dataset '{self.root}': {len(class_names)} class names for num_classes="
                f"{num_classes}; give one name per class"
            )
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names)
        self.palette = self.default_palette() if palette is None else palette
        self.transform = transform if transform is not None else ToTensorNormalize()
        if check_files:
            check_files_exist((p[0] for p in self.pairs), "image", self.LAYOUT)
            check_files_exist((p[1] for p in self.pairs if p[1]), "mask", self.LAYOUT)

    def resolve_root(self, root: str | os.PathLike) -> Path:
        """The dataset directory that ``root`` names (subclasses accept a parent, too)."""
        return existing_root(root, self.LAYOUT)

    def find_pairs(self, root: Path, split: str) -> list[Pair]:
        """The ``(image, mask)`` pairs of ``split`` in the dataset's own layout."""
        raise DataError(f"dataset '{root}': {type(self).__name__} needs data.list_file")

    def default_palette(self) -> np.ndarray:
        """``(256, 3)`` uint8 colours of the class ids (VOC's unless a subclass has its own)."""
        return voc_palette(256)

    def __len__(self) -> int:
        return len(self.pairs)

    def paths(self, index: int) -> Pair:
        """The ``(image, mask or None)`` file paths of sample ``index``."""
        return self.pairs[index]

    def read_target(self, path: Path) -> np.ndarray:
        """The ``HxW`` uint8 train-id mask stored at ``path`` (subclasses map raw values)."""
        return read_mask(path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw, validated ``(uint8 HxWx3 RGB image, uint8 HxW mask)`` of sample ``index``."""
        image_path, mask_path = self.paths(index)
        image = read_image(image_path)
        if mask_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, np.uint8)
        mask = self.read_target(mask_path)
        if image.shape[:2] != mask.shape:
            raise size_error(image_path, image, mask_path, mask)
        k, ignore = self.num_classes, self.ignore_index
        bad = out_of_range(np.bincount(mask.ravel(), minlength=256), k, ignore)
        if bad.size:
            raise label_error(mask_path, bad, k, ignore)
        return image, mask

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, torch.Tensor]:
        index, rng = split_item(item)
        image, mask = self.load(index)
        return self.transform(image, mask, rng)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', split='{self.split}', n={len(self)}, "
            f"num_classes={self.num_classes})"
        )
