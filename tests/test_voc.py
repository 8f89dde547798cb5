import numpy as np
import pytest
import torch
from PIL import Image

from leanseg.data.image_io import read_image, read_mask, write_image, write_mask_png
from leanseg.data.palettes import colorize, voc_palette
from leanseg.data.synthetic import SYNTHETIC_CLASSES
from leanseg.data.transforms import build_eval_transform, build_train_transform
from leanseg.data.voc import VOC_CLASSES, VOCSegmentation
from leanseg.errors import DataError


def test_voc_palette_follows_the_bit_rule():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[20].tolist() == [0, 64, 128]  # tvmonitor
    assert pal[255].tolist() == [224, 224, 192]
    assert colorize(np.array([[0, 255]], np.uint8))[0, 1].tolist() == [224, 224, 192]


def test_loads_from_devkit_or_voc2012_root(make_voc):
    root = make_voc(n=3)
    for r in (root, root.parent):
        ds = VOCSegmentation(r, "train")
        assert ds.root == root and len(ds) == 2 and ds.ids == ["img0", "img1"]
        assert ds.class_names == list(VOC_CLASSES) and ds.num_classes == 21
        assert ds.palette.shape == (256, 3)
    assert len(VOCSegmentation(root, "trainval")) == 3


def test_getitem_returns_tensors_and_seed_is_reproducible(make_voc):
    root = make_voc(n=3, size=(40, 56))
    ds = VOCSegmentation(root, "train")
    x, y = ds[0]
    assert x.shape == (3, 40, 56) and x.dtype == torch.float32
    assert y.shape == (40, 56) and y.dtype == torch.int64
    image, mask = ds.load(0)
    assert image.shape == (40, 56, 3) and np.array_equal(y.numpy(), mask)

    aug = VOCSegmentation(root, "train", transform=build_train_transform(32, rotate=10, blur=True))
    a, b = aug[(1, [7, 0, 3])], aug[(1, [7, 0, 3])]
    assert a[0].shape == (3, 32, 32) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = [aug[(1, s)][0] for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_eval_loader_batches(make_voc):
    ds = VOCSegmentation(make_voc(n=3), "trainval", transform=build_eval_transform(24))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert x.shape == (3, 3, 24, 24) and y.shape == (3, 24, 24)


def test_synthetic_root_loads(synthetic_root):
    ds = VOCSegmentation(synthetic_root, "val", num_classes=7, class_names=SYNTHETIC_CLASSES)
    assert len(ds) == 6 and ds.class_names[-1] == "core"
    image, mask = ds.load(0)
    assert image.shape[:2] == mask.shape


def test_missing_root_list_and_files(make_voc, tmp_path):
    with pytest.raises(DataError, match=r"dataset root .*nope.* not found.*VOC2012"):
        VOCSegmentation(tmp_path / "nope")
    root = make_voc(n=3)
    with pytest.raises(DataError, match=r"test\.txt' not found \(available: train, trainval, val"):
        VOCSegmentation(root, "test")
    (root / "JPEGImages" / "img1.jpg").unlink()
    with pytest.raises(DataError, match=r"image '.*img1\.jpg' not found"):
        VOCSegmentation(root, "train")
    with pytest.raises(DataError, match=r"mask directory '.*SegmentationClassAug' not found"):
        VOCSegmentation(root, "val", mask_dir="SegmentationClassAug")


def test_bad_list_file(make_voc):
    root = make_voc(n=3)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "pairs.txt").write_text("JPEGImages/img0.jpg SegmentationClass/img0.png\n")
    with pytest.raises(DataError, match=r"pairs\.txt:1: expected one image id per line"):
        VOCSegmentation(root, "pairs")
    (lists / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        VOCSegmentation(root, "empty")


def test_mask_size_mismatch_names_both_files(make_voc):
    root = make_voc(n=3, size=(40, 56))
    write_mask_png(root / "SegmentationClass" / "img0.png", np.zeros((40, 50), np.uint8))
    ds = VOCSegmentation(root, "train")
    with pytest.raises(DataError, match=r"img0\.png: mask is 50x40 but image .*img0\.jpg is 56x40"):
        ds[0]


def test_labels_out_of_range(make_voc):
    root = make_voc(n=3, num_classes=21)
    ds = VOCSegmentation(root, "train", num_classes=5)
    with pytest.raises(DataError, match=r"img0\.png: labels 5, 6, .* outside \[0, 5\)"):
        ds.load(0)
    mask = np.zeros((40, 56), np.uint8)
    mask[0, 0] = 255
    write_mask_png(root / "SegmentationClass" / "img0.png", mask)
    ds.load(0)  # 255 is the ignore index, not an error


def test_colour_mask_is_rejected(make_voc):
    root = make_voc(n=3)
    path = root / "SegmentationClass" / "img0.png"
    Image.fromarray(colorize(read_mask(path))).save(path)
    with pytest.raises(DataError, match=r"img0\.png: is a colour \(palette-RGB.*index mask"):
        VOCSegmentation(root, "train").load(0)


def test_corrupt_and_truncated_images(make_voc, tmp_path):
    root = make_voc(n=3)
    path = root / "JPEGImages" / "img0.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    ds = VOCSegmentation(root, "train")
    with pytest.raises(DataError, match=r"img0\.jpg: cannot decode image \(corrupt"):
        ds[0]
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot decode image"):
        ds[0]
    mask_path = root / "SegmentationClass" / "img1.png"
    mask_path.write_bytes(mask_path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"img1\.png: cannot decode mask"):
        ds.load(1)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.jpg")


def test_grey_jpeg_becomes_rgb(tmp_path):
    write_image(tmp_path / "g.png", np.full((5, 6, 3), 77, np.uint8))
    Image.open(tmp_path / "g.png").convert("L").save(tmp_path / "g.jpg")
    assert read_image(tmp_path / "g.jpg").shape == (5, 6, 3)
