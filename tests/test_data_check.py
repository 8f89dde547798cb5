"""check_dataset collects every kind of defect instead of stopping at the first."""

from __future__ import annotations

import numpy as np
from PIL import Image

from leanseg.config import DataConfig
from leanseg.data.check import check_dataset
from leanseg.data.image_io import read_mask, write_mask_png
from leanseg.data.palettes import colorize


def test_clean_split_is_ok(make_voc):
    root = make_voc(n=3, size=(10, 12), num_classes=21)
    report = check_dataset(DataConfig(dataset="voc", root=str(root)), "train")
    assert report.ok and report.samples == 2 and report.num_problems == 0
    assert report.histogram.sum() == 2 * 10 * 12 and report.histogram[255] == 2 * 12
    assert set(report.label_values()) <= {*range(21), 255}
    assert report.image_sizes == {(12, 10): 2}
    text = report.format()
    assert "dataset voc, split train: 2 samples" in text and "12x10 (2)" in text
    assert "255 ignore: 24" in text and text.endswith("OK: the split is ready for training")


def test_every_defect_is_collected(make_voc):
    root = make_voc(n=8, size=(10, 12), num_classes=21)  # img0..img6 train
    jpg, seg = root / "JPEGImages", root / "SegmentationClass"
    (jpg / "img0.jpg").unlink()  # missing image
    (seg / "img1.png").unlink()  # missing mask
    (jpg / "img2.jpg").write_bytes(b"\xff\xd8 truncated jpeg")  # corrupt image
    mask = read_mask(seg / "img3.png")
    Image.fromarray(colorize(mask)).save(seg / "img3.png")  # palette-RGB mask
    write_mask_png(seg / "img4.png", np.zeros((10, 13), np.uint8))  # wrong size
    bad = mask.copy()
    bad[2, 2], bad[3, 3] = 30, 200
    write_mask_png(seg / "img5.png", bad)  # labels outside [0, 21)
    (seg / "img6.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt mask

    report = check_dataset(DataConfig(dataset="voc", root=str(root)), "train")
    assert not report.ok and report.samples == 7 and report.num_problems == 7
    found = {
        kind: [m.split(":")[0].rsplit("/", 1)[-1] for m in ms]
        for kind, ms in report.problems.items()
    }
    assert found == {
        "fatal": [],
        "missing": ["img0.jpg", "img1.png"],
        "corrupt": ["img2.jpg", "img6.png"],
        "colour_mask": ["img3.png"],
        "size_mismatch": ["img4.png"],
        "bad_labels": ["img5.png"],
    }
    assert "labels 30, 200 outside [0, 21)" in report.problems["bad_labels"][0]
    assert report.histogram[30] == 1 and report.histogram[200] == 1
    text = report.format(max_listed=1)
    for heading in ("missing files: 2", "corrupt or unreadable files: 2", "colour (palette-RGB)",
                    "masks whose size differs", "labels outside [0, num_classes)", "... and 1 more",
                    "200 OUT OF RANGE: 1", "NOT OK: training would fail (7 problems)"):  # fmt: skip
        assert heading in text, heading


def test_fatal_and_unlabelled(make_voc, tmp_path):
    root = make_voc(n=3, size=(10, 12))
    report = check_dataset(DataConfig(dataset="voc", root=str(root)), "nosuch")
    assert not report.ok and "nosuch.txt' not found" in report.problems["fatal"][0]
    assert "cannot load the split: 1" in report.format()
    (root / "list").mkdir()
    (root / "list" / "test.txt").write_text("JPEGImages/img0.jpg\nJPEGImages/img1.jpg\n")
    cfg = DataConfig(dataset="voc", root=str(root), list_file="list/{split}.txt")
    report = check_dataset(cfg, "test")
    assert (
        report.ok
        and report.unlabelled == 2
        and "unlabelled images (test list): 2" in (report.format())
    )
    cfg.train_split = "test"
    assert not check_dataset(cfg).ok  # a training split needs labels


def test_folder_colours_and_cifar(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    (tmp_path / "palette.txt").write_text("0 0 0 bg\n255 0 0 fg\n")
    Image.new("RGB", (4, 3)).save(tmp_path / "images" / "train" / "a.png")
    Image.new("RGB", (4, 3), (9, 9, 9)).save(tmp_path / "masks" / "train" / "a.png")
    cfg = DataConfig(
        dataset="folder", root=str(tmp_path), palette_file=str(tmp_path / "palette.txt")
    )
    report = check_dataset(cfg, "train")
    assert (
        not report.ok
        and "colour (9, 9, 9) is not in the palette" in report.problems["bad_labels"][0]
    )

    cifar = tmp_path / "c" / "cifar-10-batches-bin"
    cifar.mkdir(parents=True)
    records = np.zeros((3, 3073), np.uint8)
    records[:, 0] = [1, 1, 7]
    (cifar / "test_batch.bin").write_bytes(records.tobytes())
    report = check_dataset(DataConfig(dataset="cifar10", root=str(cifar.parent)), "val")
    assert report.ok and report.samples == 3 and report.histogram[[1, 7]].tolist() == [2, 1]
    report = check_dataset(DataConfig(dataset="cifar10", root=str(cifar.parent)), "train")
    assert not report.ok and len(report.problems["missing"]) == 5
