"""The VOC trainaug set: SBD ``cls/*.mat`` -> ``SegmentationClassAug/*.png``, ``train_aug.txt``.

``train_aug`` = (VOC train ∪ SBD train ∪ SBD val) − VOC val (10,582 ids for the real sets).
``SegmentationClassAug`` gets a single-channel PNG (0-20, 255 void) for every train_aug and VOC
val id: VOC's own annotation where VOC has one (always for val), else the SBD one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io

from leanseg.data.image_io import UnreadableFileError, read_mask, write_label_png
from leanseg.data.pairs import check_files_exist, existing_root, read_split_ids
from leanseg.data.voc import resolve_voc_root
from leanseg.errors import DataError

AUG_DIR = "SegmentationClassAug"
_SBD_LAYOUT = "an SBD dir (benchmark_RELEASE/dataset/ with cls/*.mat, train.txt, val.txt)"


def resolve_sbd_root(root: str | os.PathLike) -> Path:
    """The SBD ``dataset`` directory, given it, ``benchmark_RELEASE`` or the dir holding that."""
    root = existing_root(root, _SBD_LAYOUT)
    for candidate in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise DataError(f"no cls/ directory under '{root}': pass {_SBD_LAYOUT}")


def read_sbd_mask(path: Path) -> np.ndarray:
    """The ``GTcls.Segmentation`` class-id mask (``HxW`` uint8) of an SBD ``.mat`` file."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DataError(f"{path}: SBD .mat file not found; check the SBD cls/ directory") from None
    except Exception as err:  # scipy raises several types for a corrupt file
        raise UnreadableFileError(
            f"{path}: cannot read SBD .mat file ({type(err).__name__}); re-extract it"
        ) from None
    seg = getattr(mat.get("GTcls"), "Segmentation", None)
    seg = np.asarray(seg) if seg is not None else None
    if seg is None or seg.ndim != 2 or seg.dtype.kind not in "ui":
        raise UnreadableFileError(
            f"{path}: no 2-D integer GTcls.Segmentation field; expected an SBD cls/*.mat file"
        )
    bad = sorted(set(np.unique(seg).tolist()) - {*range(21), 255})
    if bad:
        raise UnreadableFileError(
            f"{path}: GTcls.Segmentation holds values {bad[:5]} outside 0-20 and 255"
        )
    return seg.astype(np.uint8)


def prepare_voc_aug(
    voc_root: str | os.PathLike,
    sbd_root: str | os.PathLike,
    out_root: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write ``SegmentationClassAug/*.png`` and ``ImageSets/Segmentation/train_aug.txt`` under
    ``out_root`` (default: the VOC2012 dir); existing PNGs are kept unless ``overwrite``.
    Returns a one-line summary."""
    voc, sbd = resolve_voc_root(voc_root), resolve_sbd_root(sbd_root)
    out = Path(out_root).expanduser() if out_root is not None else voc
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_split_ids(lists / "train.txt"), read_split_ids(lists / "val.txt")
    sbd_train, sbd_val = read_split_ids(sbd / "train.txt"), read_split_ids(sbd / "val.txt")
    val = set(voc_val)
    train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - val)

    voc_dir = voc / "SegmentationClass"
    voc_masks = set(os.listdir(voc_dir)) if voc_dir.is_dir() else set()
    sources = {}
    for i in [*train_aug, *voc_val]:
        own = f"{i}.png" in voc_masks or i in val
        sources[i] = voc_dir / f"{i}.png" if own else sbd / "cls" / f"{i}.mat"
    check_files_exist(sources.values(), "label", "VOC SegmentationClass/ or SBD cls/")
    check_files_exist((voc / "JPEGImages" / f"{i}.jpg" for i in sources), "image")

    (out / AUG_DIR).mkdir(parents=True, exist_ok=True)
    counts = {"SBD": 0, "VOC": 0, "kept": 0}
    for i, src in sources.items():
        dst = out / AUG_DIR / f"{i}.png"
        if dst.exists() and not overwrite:
            counts["kept"] += 1
            continue
        sbd_file = src.suffix == ".mat"
        write_label_png(dst, read_sbd_mask(src) if sbd_file else read_mask(src))
        counts["SBD" if sbd_file else "VOC"] += 1
    list_file = out / "ImageSets" / "Segmentation" / "train_aug.txt"
    list_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = list_file.with_name(f".{list_file.name}.tmp")
    tmp.write_text("".join(f"{i}\n" for i in train_aug))
    os.replace(tmp, list_file)
    return (
        f"voc-aug: train_aug.txt lists {len(train_aug)} ids ((VOC train {len(voc_train)} | SBD "
        f"train {len(sbd_train)} | SBD val {len(sbd_val)}) - VOC val {len(voc_val)}); {AUG_DIR}: "
        f"{counts['SBD']} from SBD, {counts['VOC']} from VOC, {counts['kept']} kept -> {out}"
    )
