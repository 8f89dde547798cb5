"""Cityscapes: layout scan, labelId -> trainId table, on-the-fly mapping and prepare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leanseg.config import DataConfig
from leanseg.data.build import build_dataset
from leanseg.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentation,
    cityscapes_palette,
    label_to_train_id,
    prepare_cityscapes,
)
from leanseg.data.image_io import read_mask, write_image, write_label_png
from leanseg.errors import DataError

H, W = 16, 32
# every labelId 0-33 once per row band, plus the license plate (-1, stored as 255 in uint8)
LABEL_IDS = np.array([*range(34), 255], np.uint8)


def make_cityscapes(root: Path) -> Path:
    """Two train cities and one val city with ``_labelIds`` (L) and ``_color`` (RGBA) files."""
    rng = np.random.default_rng(0)
    frames = {
        "train": ["aachen_000000_000019", "bochum_000000_000313"],
        "val": ["lindau_000000_000019"],
    }
    for split, names in frames.items():
        for name in names:
            city = name.split("_")[0]
            images, labels = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            images.mkdir(parents=True, exist_ok=True)
            labels.mkdir(parents=True, exist_ok=True)
            write_image(
                images / f"{name}_leftImg8bit.png", rng.integers(0, 256, (H, W, 3), np.uint8)
            )
            ids = LABEL_IDS[rng.integers(0, len(LABEL_IDS), (H, W))]
            write_label_png(labels / f"{name}_gtFine_labelIds.png", ids)
            Image.new("RGBA", (W, H)).save(labels / f"{name}_gtFine_color.png")
    return root


def test_label_table():
    lut = label_to_train_id()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    expected = {7: 0, 8: 1, 11: 2, 17: 5, 19: 6, 24: 11, 26: 13, 31: 16, 33: 18}
    for label_id, train_id in expected.items():
        assert lut[label_id] == train_id
    for label_id in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
        assert lut[label_id] == 255, label_id
    assert (lut != 255).sum() == 19 and len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_CLASSES[6] == "traffic light"
    pal = cityscapes_palette()
    assert pal.shape == (256, 3) and pal[0].tolist() == [128, 64, 128]
    assert pal[18].tolist() == [119, 11, 32]


def test_maps_label_ids_on_the_fly_then_reads_prepared_train_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    ds = CityscapesSegmentation(root, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names[0] == "road"
    image_path, mask_path = ds.paths(0)
    assert image_path.name == "aachen_000000_000019_leftImg8bit.png"
    assert mask_path.name == "aachen_000000_000019_gtFine_labelIds.png"
    raw = read_mask(mask_path)
    image, mask = ds.load(0)
    assert image.shape == (H, W, 3)
    assert np.array_equal(mask, label_to_train_id()[raw])
    assert set(np.unique(mask)) <= {*range(19), 255}
    x, y = ds[0]
    assert x.shape == (3, H, W) and y.shape == (H, W)

    summary = prepare_cityscapes(root)
    assert "wrote 3" in summary and "kept 0" in summary
    train_ids = sorted(root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(train_ids) == 3 and not list(root.glob("gtFine/**/.*tmp"))
    assert Image.open(train_ids[0]).mode == "L"
    again = CityscapesSegmentation(root, "train")
    assert again.paths(0)[1].name.endswith("_gtFine_labelTrainIds.png")
    assert np.array_equal(again.load(0)[1], mask)
    assert "wrote 0" in prepare_cityscapes(root) and "wrote 3" in prepare_cityscapes(
        root, overwrite=True
    )


def test_config_semseg_list_and_errors(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    prepare_cityscapes(root)
    cfg = DataConfig(dataset="cityscapes", root=str(root), crop_size=8)
    val = build_dataset(cfg, "val", train=False)
    assert len(val) == 1 and val.palette[13].tolist() == [0, 0, 142]
    (root / "list").mkdir()
    (root / "list" / "fine_val.txt").write_text(
        "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png "
        "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png\n"
    )
    cfg.list_file = "list/fine_{split}.txt"
    listed = build_dataset(cfg, "val", train=False)
    assert np.array_equal(listed.load(0)[1], val.load(0)[1])

    with pytest.raises(DataError, match=r"split directory .*leftImg8bit/test' not found"):
        CityscapesSegmentation(root, "test")
    with pytest.raises(DataError, match=r"no \*_gtFine_labelIds\.png files"):
        prepare_cityscapes(tmp_path)
    for gone in root.glob("gtFine/train/bochum/bochum_000000_000313_gtFine_label*.png"):
        gone.unlink()
    with pytest.raises(DataError, match=r"mask '.*bochum_000000_000313_gtFine_labelIds\.png'"):
        CityscapesSegmentation(root, "train")
