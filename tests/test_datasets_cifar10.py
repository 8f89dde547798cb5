"""CIFAR-10: binary and python batches, the restricted unpickler, the train transform."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from leanseg.config import DataConfig
from leanseg.data.build import build_dataset, build_datasets
from leanseg.data.cifar10 import CIFAR10, CIFAR_MEAN, CIFAR_STD, read_batch
from leanseg.errors import DataError

PER_BATCH = 4


def _records(seed: int) -> tuple[np.ndarray, list[int]]:
    """``(N x 3072 uint8 rows: 1024 R, 1024 G, 1024 B, row-major), labels)``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8), [
        int(v) for v in rng.integers(0, 10, PER_BATCH)
    ]


def make_cifar_bin(root: Path) -> Path:
    directory = root / "cifar-10-batches-bin"
    directory.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for seed, name in enumerate(names):
        data, labels = _records(seed)
        records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (directory / name).write_bytes(records.tobytes())
    return root


def _py_batch(seed: int) -> dict:
    data, labels = _records(seed)
    return {
        b"batch_label": f"training batch {seed + 1} of 5".encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(PER_BATCH)],
    }


def make_cifar_py(root: Path, numpy1: bool = False) -> Path:
    """Protocol-2 pickles of bytes-keyed dicts, as the CIFAR python version ships them;
    ``numpy1`` spells the reconstruct global the way numpy 1.x (and the real files) do."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        blob = pickle.dumps(_py_batch(seed), protocol=2)
        if numpy1:
            blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (directory / name).write_bytes(blob)
    return root


@pytest.mark.parametrize("make", [make_cifar_bin, make_cifar_py])
def test_both_versions_load_the_same(tmp_path, make):
    root = make(tmp_path)
    ds = CIFAR10(root, "train")
    assert len(ds) == 5 * PER_BATCH and ds.num_classes == 10 and ds.class_names[0] == "airplane"
    data, labels = _records(1)
    assert ds.labels[PER_BATCH:8].tolist() == labels
    image = ds.images[PER_BATCH + 2]
    assert image.shape == (32, 32, 3)
    assert image[3, 5, 0] == data[2, 3 * 32 + 5] and image[3, 5, 2] == data[2, 2048 + 3 * 32 + 5]
    test = CIFAR10(root, "test")
    assert len(test) == PER_BATCH
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64 and int(y) == _records(5)[1][0]
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    expected = (torch.from_numpy(test.images[0]).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)


def test_numpy1_pickles_load(tmp_path):
    root = make_cifar_py(tmp_path, numpy1=True)
    assert b"numpy.core.multiarray" in (root / "cifar-10-batches-py/test_batch").read_bytes()
    assert CIFAR10(root, "test").labels.tolist() == _records(5)[1]


def test_train_transform_pads_crops_flips(tmp_path):
    root = make_cifar_bin(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(root))
    train, val = build_datasets(cfg)
    assert len(train) == 20 and len(val) == 4
    xs = [train[(0, s)][0] for s in range(12)]
    assert torch.equal(train[(0, 3)][0], xs[3])
    assert any(not torch.equal(xs[0], x) for x in xs[1:])
    zero = (-torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD))[:, None]  # a padded pixel
    assert any(torch.allclose(x[:, 0, :], zero.expand(3, 32)) for x in xs)  # padding shows
    assert all(x.shape == (3, 32, 32) for x in xs) and train[(0, 0)][1].shape == ()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_never_runs(tmp_path):
    root = make_cifar_py(tmp_path)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=2))
    with pytest.raises(
        DataError, match=r"data_batch_3: not a CIFAR-10 python batch .*posix\.system"
    ):
        CIFAR10(root, "train")
    assert not marker.exists()
    batch.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(DataError, match=r"data_batch_3: .*is not allowed"):
        read_batch(batch)
    batch.write_bytes(pickle.dumps({"data": [1, 2], "labels": [1]}))
    with pytest.raises(DataError, match=r"data_batch_3: expected a dict with 'data'"):
        read_batch(batch)
    assert not marker.exists()


def test_bad_files(tmp_path):
    root = make_cifar_bin(tmp_path)
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"test_batch\.bin: .* not a whole number of 3073-byte"):
        build_dataset(DataConfig(dataset="cifar10", root=str(root)), "val", train=False)
    records = np.zeros((1, 3073), np.uint8)
    records[0, 0] = 10
    path.write_bytes(records.tobytes())
    with pytest.raises(DataError, match=r"labels must be 0-9"):
        read_batch(path)
    (root / "cifar-10-batches-bin" / "data_batch_2.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_2\.bin: CIFAR-10 batch not found"):
        CIFAR10(root, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 batches under"):
        CIFAR10(tmp_path / "empty", "train")
