"""VOC trainaug (VainF ids, semseg and chenxi pair lists) and the SBD -> trainaug converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from leanseg.config import DataConfig
from leanseg.data.build import build_dataset
from leanseg.data.image_io import read_mask, write_image, write_label_png, write_mask_png
from leanseg.data.voc import VOCSegmentation
from leanseg.data.voc_aug import prepare_voc_aug, read_sbd_mask
from leanseg.errors import ConfigError, DataError

H, W = 20, 28


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_image(path, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def _mask(value: int) -> np.ndarray:
    mask = np.full((H, W), value, np.uint8)
    mask[0] = 255
    return mask


def make_voc_aug(root: Path) -> Path:
    """VOC2012 with SegmentationClass (P) for a,b,c and SegmentationClassAug (L) for a..e."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / sub).mkdir(parents=True)
    for n, i in enumerate("abcde"):
        _image(root / "JPEGImages" / f"{i}.jpg", n)
        write_label_png(root / "SegmentationClassAug" / f"{i}.png", _mask(n + 1))
    for n, i in enumerate("abc"):
        write_mask_png(root / "SegmentationClass" / f"{i}.png", _mask(10 + n))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nb\n")
    (lists / "val.txt").write_text("c\n")
    (lists / "train_aug.txt").write_text("a\nb\nd\ne\n")
    return root


def test_voc_aug_train_reads_train_aug_and_aug_masks(tmp_path):
    root = make_voc_aug(tmp_path / "VOCdevkit" / "VOC2012")
    assert Image.open(root / "SegmentationClassAug" / "a.png").mode == "L"
    train = VOCSegmentation(root.parent, "train", aug=True)
    assert train.ids == ["a", "b", "d", "e"]
    assert train.load(0)[1][5, 5] == 1 and train.load(3)[1][5, 5] == 5  # from the Aug dir
    val = VOCSegmentation(root, "val", aug=True)
    assert val.ids == ["c"] and val.load(0)[1][5, 5] == 12  # from SegmentationClass
    x, y = val[0]
    assert x.shape == (3, H, W) and y.shape == (H, W)

    cfg = DataConfig(dataset="voc_aug", root=str(root), crop_size=16)
    ds = build_dataset(cfg, "train", train=True)
    assert len(ds) == 4 and ds.num_classes == 21 and ds.class_names[15] == "person"
    assert ds[(2, 0)][0].shape == (3, 16, 16)


def test_semseg_chenxi_and_test_lists(tmp_path):
    root = make_voc_aug(tmp_path / "VOC2012")
    lists = root / "list"
    lists.mkdir()
    (lists / "train_aug.txt").write_text(
        "JPEGImages/a.jpg SegmentationClassAug/a.png\nJPEGImages/d.jpg SegmentationClassAug/d.png\n"
    )
    (lists / "val.txt").write_text("/JPEGImages/c.jpg /SegmentationClass/c.png\n")  # chenxi
    (lists / "test.txt").write_text("JPEGImages/e.jpg\n\nJPEGImages/b.jpg\n")
    cfg = DataConfig(dataset="voc", root=str(root), list_file="list/{split}.txt", crop_size=16)
    train = build_dataset(cfg, "train_aug", train=True)
    assert train.paths(1) == (root / "JPEGImages/d.jpg", root / "SegmentationClassAug/d.png")
    assert train.load(1)[1][5, 5] == 4
    val = build_dataset(cfg, "val", train=False)
    assert val.paths(0)[1] == root / "SegmentationClass/c.png" and val.load(0)[1][5, 5] == 12
    test = build_dataset(cfg, "test", train=False)
    assert len(test) == 2 and test.paths(0)[1] is None
    assert (test[0][1] == 255).all()  # no labels: all ignore
    with pytest.raises(DataError, match="without labels"):
        build_dataset(cfg, "test", train=True)

    (lists / "bad.txt").write_text("a b c\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: expected 'image_path label_path'"):
        build_dataset(cfg, "bad", train=False)
    (lists / "gone.txt").write_text("JPEGImages/zz.jpg SegmentationClass/zz.png\n")
    with pytest.raises(DataError, match=r"image '.*zz\.jpg' not found"):
        build_dataset(cfg, "gone", train=False)
    cfg.list_file = "list/train_aug.txt"
    with pytest.raises(ConfigError, match=r"data\.list_file.*\{split\}"):
        build_dataset(cfg, "train", train=True)


def _sbd_mat(path: Path, seg: np.ndarray) -> None:
    """An SBD cls/*.mat file: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    boundaries = np.empty((20, 1), dtype=object)
    boundaries[:] = [[np.zeros((1, 1), np.uint8)]]
    gt = {"Segmentation": seg, "Boundaries": boundaries, "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gt})


def make_sbd(root: Path, ids: dict[str, int], train: str, val: str) -> Path:
    cls = root / "benchmark_RELEASE" / "dataset" / "cls"
    cls.mkdir(parents=True)
    for i, value in ids.items():
        seg = np.full((H, W), value, np.uint8)
        seg[1, 1] = 0
        _sbd_mat(cls / f"{i}.mat", seg)
    (cls.parent / "train.txt").write_text(train)
    (cls.parent / "val.txt").write_text(val)
    return root


def test_prepare_voc_aug_from_sbd_mat(tmp_path):
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for n, i in enumerate("abcdefg"):
        _image(voc / "JPEGImages" / f"{i}.jpg", n)
    for n, i in enumerate("abc"):  # VOC annotated: a, b train; c val
        write_mask_png(voc / "SegmentationClass" / f"{i}.png", _mask(10 + n))
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("c\n")
    # SBD: b (also VOC train), c (VOC val: must be dropped), d, e, f; g nowhere
    sbd = make_sbd(tmp_path / "sbd", dict(b=2, c=3, d=4, e=5, f=6), "b\nc\nd\n", "e\nf\n")
    assert read_sbd_mask(sbd / "benchmark_RELEASE/dataset/cls/d.mat")[5, 5] == 4

    summary = prepare_voc_aug(voc, sbd)
    assert "train_aug.txt lists 5 ids" in summary and "4 from SBD" not in summary
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text() == "a\nb\nd\ne\nf\n"
    aug = voc / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == list("abcdef")
    assert Image.open(aug / "d.png").mode == "L"
    d = read_mask(aug / "d.png")
    assert d[5, 5] == 4 and d[1, 1] == 0 and d.dtype == np.uint8
    assert read_mask(aug / "b.png")[5, 5] == 11  # VOC's own annotation wins
    assert read_mask(aug / "c.png")[5, 5] == 12  # val: VOC, never SBD
    ds = VOCSegmentation(voc, "train", aug=True)
    assert ds.ids == list("abdef") and ds.load(4)[1][5, 5] == 6

    again = prepare_voc_aug(voc, sbd / "benchmark_RELEASE")
    assert "0 from SBD, 0 from VOC, 6 kept" in again


def test_prepare_voc_aug_errors(tmp_path):
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("c\n")
    with pytest.raises(DataError, match="no cls/ directory"):
        prepare_voc_aug(voc, tmp_path)
    sbd = make_sbd(tmp_path / "sbd", dict(a=1), "a\n", "\n")
    with pytest.raises(DataError, match=r"val\.txt' is empty"):
        prepare_voc_aug(voc, sbd)
    (sbd / "benchmark_RELEASE/dataset/val.txt").write_text("d\n")
    with pytest.raises(DataError, match=r"label '.*d\.mat' and 1 more not found"):
        prepare_voc_aug(voc, sbd)
    bad = sbd / "benchmark_RELEASE/dataset/cls/a.mat"
    bad.write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(DataError, match=r"a\.mat: cannot read SBD \.mat"):
        read_sbd_mask(bad)
    scipy.io.savemat(bad, {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(DataError, match=r"a\.mat: no 2-D integer GTcls\.Segmentation"):
        read_sbd_mask(bad)
