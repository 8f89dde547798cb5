"""CIFAR-10 (binary or python version) for the classification recipes.

The python batches are pickles; they are read by an unpickler that admits plain data only
(dict, list, str, bytes, numbers) and numpy arrays rebuilt through an explicit allow-list, so a
crafted batch file raises a DataError instead of running code.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leanseg.data.image_io import MissingFileError, UnreadableFileError
from leanseg.data.pairs import Item, existing_root, split_item
from leanseg.data.palettes import voc_palette
from leanseg.data.transforms import ToTensorNormalize

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
PIXELS = 3 * 32 * 32
FORMATS = {  # directory -> (train files, test files); the binary version is preferred
    "cifar-10-batches-bin": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]),
    "cifar-10-batches-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
}
_LAYOUT = "a dir holding cifar-10-batches-bin/ or cifar-10-batches-py/"

# What a CIFAR-10 python batch pickles: a dict whose b'data' is a uint8 ndarray (rebuilt by
# numpy's _reconstruct from ndarray and dtype; numpy 1.x names the module numpy.core) and whose
# b'labels' is a list. Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def batch_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The batch files of ``split`` (``train``; ``val`` or ``test`` = the test batch)."""
    root = existing_root(root, _LAYOUT)
    for name, (train, test) in FORMATS.items():
        directory = root if root.name == name else root / name
        if directory.is_dir():
            return [directory / f for f in (train if split == "train" else test)]
    raise MissingFileError(
        f"no CIFAR-10 batches under '{root}': set data.root to {_LAYOUT} "
        "(the binary or python version from cs.toronto.edu/~kriz/cifar.html)"
    )


def _read_bin(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % (PIXELS + 1):
        raise UnreadableFileError(
            f"{path}: {len(data)} bytes is not a whole number of 3073-byte CIFAR-10 records; "
            "the file is truncated or not a CIFAR-10 binary batch"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, PIXELS + 1)
    return records[:, 1:], records[:, 0].astype(np.int64)


def _read_pickle(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _PlainDataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any failure to unpickle means a bad or hostile file
        raise UnreadableFileError(
            f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err}); only plain data "
            "and numpy arrays are loaded, so re-download the batch"
        ) from None
    if not isinstance(batch, dict):
        batch = {}
    # keys are bytes (Python 2 str pickled) or str (re-pickled by Python 3)
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get("labels")
    image_ok = isinstance(images, np.ndarray) and images.dtype == np.uint8
    if not image_ok or images.shape[1:] != (PIXELS,) or not isinstance(labels, list | np.ndarray):
        raise UnreadableFileError(
            f"{path}: expected a dict with 'data' (N x 3072 uint8 array) and 'labels' (list); "
            "re-download the batch"
        )
    return images, np.asarray(labels, dtype=np.int64)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N x 32 x 32 x 3 uint8 images, N int64 labels)`` of one batch file (either version)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: CIFAR-10 batch not found; restore the file") from None
    reader = _read_bin if path.suffix == ".bin" else _read_pickle
    images, labels = reader(path, data)
    if len(images) != len(labels) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise UnreadableFileError(
            f"{path}: {len(images)} images with {len(labels)} labels (labels must be 0-9); "
            "re-download the batch"
        )
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CifarTransform:
    """Train: zero-pad 4 px, random 32x32 crop, horizontal flip; then CIFAR normalisation.
    Returns ``(float 3x32x32 tensor, 0-d int64 tensor)``."""

    def __init__(
        self,
        augment: bool,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        self.augment = augment
        self.to_tensor = ToTensorNormalize(mean, std)

    def __call__(
        self, image: np.ndarray, label: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment:
            padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
            y, x = (int(v) for v in rng.integers(0, 9, size=2))
            image = padded[y : y + 32, x : x + 32]
            if rng.random() < 0.5:
                image = image[:, ::-1]
        x, y = self.to_tensor(np.ascontiguousarray(image), np.array([label], np.int64))
        return x, y.reshape(())


class CIFAR10(Dataset):
    """CIFAR-10 ``train`` (50,000) or ``test``/``val`` (10,000) images, held in memory."""

    seeded_items = True  # takes the training sampler's (index, seed) items

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        augment: bool = False,
        ignore_index: int = 255,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        parts = [read_batch(p) for p in batch_files(root, split)]
        self.root, self.split = Path(root), split
        self.images = np.concatenate([p[0] for p in parts])
        self.labels = np.concatenate([p[1] for p in parts])
        self.num_classes, self.ignore_index = len(CIFAR10_CLASSES), ignore_index
        self.class_names = list(CIFAR10_CLASSES)
        self.palette = voc_palette(256)
        self.transform = CifarTransform(augment, mean, std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, torch.Tensor]:
        index, rng = split_item(item)
        return self.transform(self.images[index], int(self.labels[index]), rng)

    def __repr__(self) -> str:
        return f"CIFAR10(root='{self.root}', split='{self.split}', n={len(self)})"
