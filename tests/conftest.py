"""Shared fixtures: a tiny synthetic VOC-format dataset and a builder for hand-made VOC dirs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from leanseg.data.image_io import write_image, write_mask_png
from leanseg.data.synthetic import ensure_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished synthetic dataset (VOC2012 layout, 7 classes): 12 train and 6 val images."""
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, num_train=12, num_val=6)


def write_voc(
    root: Path,
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    splits: dict[str, Sequence[str]],
    mask_dir: str = "SegmentationClass",
) -> Path:
    """Write ``{id: (RGB image, index mask)}`` and list files in the VOC2012 layout under root."""
    for sub in ("JPEGImages", mask_dir, "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (image, mask) in samples.items():
        write_image(root / "JPEGImages" / f"{name}.jpg", image)
        write_mask_png(root / mask_dir / f"{name}.png", mask)
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def make_voc(tmp_path: Path) -> Callable[..., Path]:
    """``make_voc(n=3, size=(40, 56), num_classes=21)`` -> a VOCdevkit/VOC2012 dir in tmp_path.

    Masks hold random labels in ``[0, num_classes)`` plus a 255 border; ids are ``img0``, ... and
    the first ``n - 1`` go to ``train``, the last to ``val``.
    """

    def make(n: int = 3, size: tuple[int, int] = (40, 56), num_classes: int = 21) -> Path:
        rng = np.random.default_rng(0)
        h, w = size
        samples = {}
        for i in range(n):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
            mask[0, :] = 255
            samples[f"img{i}"] = (image, mask)
        ids = list(samples)
        root = tmp_path / "VOCdevkit" / "VOC2012"
        return write_voc(root, samples, {"train": ids[:-1], "val": ids[-1:], "trainval": ids})

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine two can be ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 4-iteration run trained through the CLI with stdout a pipe (not a terminal): its run
    directory and that stdout. Tests copy it before changing anything."""
    from tests.test_cli import only_run, run_cli, tiny

    cache = tmp_path_factory.mktemp("finished-cache")
    ensure_synthetic(cache, num_train=16, num_val=3)
    work = tmp_path_factory.mktemp("finished-runs")
    args = tiny(cache, work, "train.iterations=4", "train.val_interval=2", "train.log_interval=2")
    proc = run_cli("train", *args)
    assert proc.returncode == 0, proc.stderr
    return only_run(work), proc.stdout
