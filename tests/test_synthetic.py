import os
import socket
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from PIL import Image

from leanseg.data import synthetic
from leanseg.data.synthetic import (
    GENERATOR_VERSION,
    MARKER,
    SYNTHETIC_CLASSES,
    dataset_dir_name,
    ensure_synthetic,
    render_sample,
    sample_rng,
)
from leanseg.errors import DataError


@pytest.fixture(scope="module")
def samples():
    return [render_sample(sample_rng(0, "train", i)) for i in range(40)]


def test_layout_and_lists(synthetic_root):
    assert synthetic_root.name == f"synthetic-v{GENERATOR_VERSION}-seed0-12-6"
    assert (synthetic_root / MARKER).is_file()
    lists = synthetic_root / "ImageSets" / "Segmentation"
    train = (lists / "train.txt").read_text().split()
    val = (lists / "val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 6 and train[0] == "train_00000"
    assert (lists / "trainval.txt").read_text().split() == train + val
    for name in train + val:
        assert (synthetic_root / "JPEGImages" / f"{name}.jpg").is_file()
        assert (synthetic_root / "SegmentationClass" / f"{name}.png").is_file()


def test_masks_are_palette_pngs_with_known_values(synthetic_root):
    sizes = set()
    for path in sorted((synthetic_root / "SegmentationClass").glob("*.png")):
        with Image.open(path) as img:
            assert img.mode == "P"
            assert img.getpalette()[3:6] == [128, 0, 0]
            values = set(np.unique(np.array(img)).tolist())
            sizes.add(img.size)
        assert values <= set(range(len(SYNTHETIC_CLASSES))) | {255}
        assert 255 in values
    assert len(sizes) > 1  # image sizes vary


def test_every_class_appears_and_sizes_vary(samples):
    seen = set()
    for image, mask in samples:
        h, w = mask.shape
        assert 112 <= h <= 176 and 112 <= w <= 176 and image.shape == (h, w, 3)
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(len(SYNTHETIC_CLASSES))) | {255}
    assert len({m.shape for _, m in samples}) > 10


def test_void_border_separates_every_region(samples):
    for _, mask in samples:
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:, :], mask[:-1, :])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any()  # two labels never meet without a 255 band
        assert 0 < (mask == 255).mean() < 0.2


def test_cores_sit_inside_rings(samples):
    cores = 0
    for _, mask in samples:
        n, comp = cv2.connectedComponents((mask == synthetic.CORE).astype(np.uint8))
        for k in range(1, n):
            ys, xs = np.nonzero(comp == k)
            y, x = int(ys.mean()), int(xs.mean())
            row, col = mask[y], mask[:, x]
            sides = [row[:x], row[x:], col[:y], col[y:]]
            assert sum((s == synthetic.RING).any() for s in sides) >= 3
            cores += 1
    assert cores >= 3


def test_deterministic_and_order_independent(tmp_path):
    a = ensure_synthetic(tmp_path / "a", seed=3, num_train=6, num_val=3)
    b = ensure_synthetic(tmp_path / "b", seed=3, num_train=3, num_val=3)
    c = ensure_synthetic(tmp_path / "c", seed=4, num_train=3, num_val=3)
    for rel in ("JPEGImages/train_00002.jpg", "SegmentationClass/train_00002.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    assert (a / "JPEGImages/val_00001.jpg").read_bytes() == (
        b / "JPEGImages/val_00001.jpg"
    ).read_bytes()


def test_reuses_a_finished_directory(tmp_path):
    root = ensure_synthetic(tmp_path, seed=0, num_train=2, num_val=1)
    stamp = (root / MARKER).stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, seed=0, num_train=2, num_val=1) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp


def test_unfinished_and_temp_dirs_are_never_used(tmp_path):
    name = dataset_dir_name(0, 2, 1)
    broken = tmp_path / name
    (broken / "JPEGImages").mkdir(parents=True)
    (broken / "junk.txt").write_text("half written")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_tmp = tmp_path / f".{name}.tmp-{socket.gethostname()}-{int(dead.stdout)}-abcd"
    live_tmp = tmp_path / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-ef01"
    for t in (dead_tmp, live_tmp):
        (t / "JPEGImages").mkdir(parents=True)
        (t / MARKER).write_text("{}")
    root = ensure_synthetic(tmp_path, seed=0, num_train=2, num_val=1)
    assert root == broken and (root / MARKER).is_file() and not (root / "junk.txt").exists()
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 3
    assert not dead_tmp.exists()  # left by a crashed process: cleaned up
    assert live_tmp.exists()  # may belong to a running process: left alone
    leftovers = {p.name for p in tmp_path.iterdir()} - {name, live_tmp.name}
    assert not leftovers


def test_concurrent_first_use(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(ensure_synthetic(tmp_path, seed=1, num_train=3, num_val=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (results[0] / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_version_and_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSEG_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic(num_train=1, num_val=1)
    assert root == tmp_path / "cache" / f"synthetic-v{GENERATOR_VERSION}-seed0-1-1"
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    newer = ensure_synthetic(num_train=1, num_val=1)
    assert newer != root and f"-v{GENERATOR_VERSION + 1}-" in newer.name and newer.is_dir()


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="need >= 1 train and val images"):
        ensure_synthetic(tmp_path, num_train=0)
