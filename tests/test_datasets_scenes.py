"""ADE20K (reduce zero label), CamVid (semseg lists, void 11) and the plain folder dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leanseg.config import CHOICES, DataConfig, load_config
from leanseg.data.ade20k import ADE20K_CLASSES, ADE20KSegmentation
from leanseg.data.build import DATASETS, build_dataset, dataset_num_classes
from leanseg.data.camvid import CAMVID_CLASSES, camvid_palette
from leanseg.data.folder import FolderSegmentation, read_palette_file
from leanseg.data.image_io import write_image, write_label_png, write_mask_png
from leanseg.errors import ConfigError, DataError

rng = np.random.default_rng(0)


def _rgb(h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_ade(root: Path) -> Path:
    """ADEChallengeData2016 with raw annotations 0-150 (L-mode PNG)."""
    for split, names in {"training": ["00000001", "00000002"], "validation": ["00000001"]}.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for name in names:
            write_image(root / "images" / split / f"ADE_{split[:5]}_{name}.jpg", _rgb(12, 18))
            raw = np.tile(np.arange(151, dtype=np.uint8), 2)[: 12 * 18].reshape(12, 18)
            write_label_png(root / "annotations" / split / f"ADE_{split[:5]}_{name}.png", raw)
    return root


def test_ade20k_reduces_zero_label(tmp_path):
    root = make_ade(tmp_path / "ADEChallengeData2016")
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall"
    ds = ADE20KSegmentation(tmp_path, "train")  # the parent dir is accepted too
    assert ds.root == root and len(ds) == 2 and ds.num_classes == 150
    mask = ds.load(0)[1]
    assert mask[0, 0] == 255 and mask[0, 1] == 0 and mask[0, 17] == 16
    assert mask.max() == 255 and mask[mask != 255].max() == 149
    cfg = DataConfig(dataset="ade20k", root=str(root), crop_size=8)
    val = build_dataset(cfg, "val", train=False)
    assert len(val) == 1 and val[0][1].shape == (12, 18)
    assert dataset_num_classes("ade20k") == 150
    with pytest.raises(DataError, match=r"split directory .*images/testing' not found"):
        ADE20KSegmentation(root, "testing")


def make_camvid(root: Path) -> Path:
    """SegNet CamVid: {train,val,test}/*.png with {split}annot/*.png (L, 0-11) and lists."""
    (root / "list").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        lines = []
        for n in range(2):
            name = f"0001TP_00{n}690.png"
            write_image(root / split / name, _rgb(360, 480))
            label = (np.arange(360 * 480) % 12).astype(np.uint8).reshape(360, 480)
            write_label_png(root / f"{split}annot" / name, label)
            lines.append(f"{split}/{name} {split}annot/{name}")
        (root / "list" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_keeps_void_11(tmp_path):
    root = make_camvid(tmp_path / "CamVid")
    cfg = load_config(None, ["data.dataset=camvid", f"data.root={root}", "data.ignore_index=11"])
    ds = build_dataset(cfg.data, "test", train=False)
    assert ds.num_classes == 11 and ds.ignore_index == 11 and len(ds) == 2
    assert ds.class_names == list(CAMVID_CLASSES) and ds.palette[0].tolist() == [128, 128, 128]
    assert camvid_palette()[11].tolist() == [0, 0, 0]
    x, y = ds[0]
    assert y.shape == (360, 480) and int(y.max()) == 11  # void stays 11
    cfg.data.class_names = [f"c{i}" for i in range(11)]
    assert build_dataset(cfg.data, "val", train=False).class_names[3] == "c3"
    cfg.data.ignore_index = 255
    with pytest.raises(ConfigError, match=r"data\.ignore_index.*set data\.ignore_index=11"):
        build_dataset(cfg.data, "train", train=True)


def test_folder_index_and_colour_masks(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
    palette_file = tmp_path / "palette.txt"
    palette_file.write_text("# R G B name\n0 0 0 background\n255,0,0,road sign\n0 255 0 tree\n")
    colours, names = read_palette_file(palette_file)
    assert colours.tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    assert names == ["background", "road sign", "tree"]
    ids = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    colour = np.concatenate([colours, [[224, 224, 192]]]).astype(np.uint8)[np.minimum(ids, 3)]
    write_image(root / "images/train/b.png", _rgb(3, 4))
    write_image(root / "images/train/a.jpg", _rgb(3, 4))
    write_mask_png(root / "masks/train/a.png", ids)  # index (P) mask
    Image.fromarray(colour).save(root / "masks/train/b.png")  # colour (RGB) mask
    write_image(root / "images/val/c.jpg", _rgb(3, 4))
    write_label_png(root / "masks/val/c.png", ids)

    cfg = DataConfig(dataset="folder", root=str(root), palette_file=str(palette_file))
    ds = build_dataset(cfg, "train", train=False)
    assert [p[0].name for p in ds.pairs] == ["a.jpg", "b.png"]
    assert ds.num_classes == 3 and ds.class_names[1] == "road sign"
    assert ds.palette[2].tolist() == [0, 255, 0] and dataset_num_classes(cfg) == 3
    assert np.array_equal(ds.load(0)[1], ids) and np.array_equal(ds.load(1)[1], ids)

    colour[0, 0] = (1, 2, 3)
    Image.fromarray(colour).save(root / "masks/train/b.png")
    with pytest.raises(DataError, match=r"b\.png: colour \(1, 2, 3\) is not in the palette"):
        ds.load(1)
    plain = FolderSegmentation(root, "train", num_classes=3)  # no palette: index masks only
    with pytest.raises(DataError, match=r"b\.png: is a colour \(palette-RGB"):
        plain.load(1)
    with pytest.raises(DataError, match=r"split directory .*images/test' not found \(available"):
        FolderSegmentation(root, "test", num_classes=3)
    with pytest.raises(ConfigError, match=r"data\.num_classes': required for dataset folder"):
        build_dataset(DataConfig(dataset="folder", root=str(root)), "val", train=False)
    (root / "masks/val/c.png").unlink()
    with pytest.raises(DataError, match=r"mask '.*c\.png' not found"):
        FolderSegmentation(root, "val", num_classes=3)
    palette_file.write_text("0 0 0 a\n300 0 0 b\n")
    with pytest.raises(DataError, match=r"palette\.txt:2: expected 'R G B \[name\]'"):
        read_palette_file(palette_file)


def test_flat_folder_needs_an_explicit_split(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    names = [f"img{i:02d}" for i in range(20)]
    for name in names:
        write_image(tmp_path / f"images/{name}.png", _rgb(5, 6))
        write_label_png(tmp_path / f"masks/{name}.png", np.ones((5, 6), np.uint8))
    # without a split rule train would be val: refused, naming the folder and both fixes
    with pytest.raises(DataError, match=r"flat folder.*data\.val_fraction.*data\.list_file"):
        FolderSegmentation(tmp_path, "val", num_classes=2)
    cfg = DataConfig(dataset="folder", root=str(tmp_path), num_classes=2, val_fraction=0.25)
    train = build_dataset(cfg, "train", train=False)
    val = build_dataset(cfg, "val", train=False)
    train_names = {p[0].stem for p in train.pairs}
    val_names = {p[0].stem for p in val.pairs}
    assert len(val_names) == 5 and not train_names & val_names
    assert train_names | val_names == set(names)
    again = build_dataset(cfg, "val", train=False)  # deterministic
    assert [p[0] for p in again.pairs] == [p[0] for p in val.pairs]
    assert val[0][1].sum() == 30
    with pytest.raises(DataError, match=r"only the splits 'train' and 'val', not 'test'"):
        build_dataset(cfg, "test", train=False)
    # split lists work on a flat folder, too
    (tmp_path / "list").mkdir()
    for split, chosen in (("train", names[:15]), ("val", names[15:])):
        lines = [f"images/{n}.png masks/{n}.png" for n in chosen]
        (tmp_path / f"list/{split}.txt").write_text("\n".join(lines) + "\n")
    listed = DataConfig(
        dataset="folder", root=str(tmp_path), num_classes=2, list_file="list/{split}.txt"
    )
    assert len(build_dataset(listed, "val", train=False)) == 5
    with pytest.raises(ConfigError, match=r"data\.val_fraction': must be in \(0, 1\)"):
        load_config(None, ["data.val_fraction=1.0"])
    with pytest.raises(DataError, match=r"split folders .* remove data\.val_fraction"):
        (tmp_path / "images/train").mkdir()
        FolderSegmentation(tmp_path, "train", num_classes=2, val_fraction=0.2)


def test_every_config_choice_has_a_builder():
    assert set(DATASETS) == set(CHOICES["data.dataset"])
    counts = {name: dataset_num_classes(name) for name in DATASETS if name != "folder"}
    assert counts == dict(
        synthetic=7, voc=21, voc_aug=21, cityscapes=19, ade20k=150, camvid=11, cifar10=10
    )
    assert dataset_num_classes(DataConfig(dataset="folder", num_classes=4)) == 4
    with pytest.raises(ConfigError, match=r"data\.num_classes': required for dataset folder"):
        dataset_num_classes("folder")
    with pytest.raises(ConfigError, match=r"data\.root': required for dataset voc"):
        build_dataset(DataConfig(dataset="voc"), "train", train=True)
    with pytest.raises(ConfigError, match=r"data\.dataset': 'nope' is not one of"):
        build_dataset(DataConfig(dataset="nope"), "train", train=True)
