"""The built-in ``synthetic`` dataset: a seeded generator that writes a VOC2012-format directory.

Seven classes whose colours all come from one distribution, on textured clutter drawn from the
same colours, so a model has to learn shape (disc / square / triangle / ring), texture (striped)
and context (a core is a small disc inside a ring's hole; plain discs come in the same sizes).
Objects overlap (later ones occlude earlier ones) and carry a thin 255 void border, as in VOC.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

import cv2
import numpy as np

from leanseg.cache import default_cache_dir
from leanseg.data.image_io import write_image, write_mask_png
from leanseg.data.palettes import voc_palette
from leanseg.errors import DataError

GENERATOR_VERSION = 1  # bump whenever the output changes: the cache dir name carries it
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background", "disc", "square", "triangle", "ring", "striped", "core",
)  # fmt: skip
BACKGROUND, DISC, SQUARE, TRIANGLE, RING, STRIPED, CORE = range(7)
SPLITS = ("train", "val")
MARKER = ".complete"
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel shapes
_ONE = 1 << _SHIFT

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- rendering
def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of generation order."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _pts(xy: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(xy) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour noise in two octaves plus thin lines, curves and specks in random colours."""
    gy, gx = rng.integers(2, 6, size=2)
    img = cv2.resize(rng.uniform(0, 255, (gy, gx, 3)).astype(np.float32), (w, h), cv2.INTER_CUBIC)
    gy, gx = rng.integers(6, 14, size=2)
    fine = rng.uniform(-45, 45, (gy, gx, 3)).astype(np.float32)
    img += cv2.resize(fine, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    size = np.array([w, h])
    for _ in range(rng.integers(2, 9)):  # straight lines
        p, q = _pts(rng.uniform(0, 1, (2, 2)) * size)
        cv2.line(img, p[0], q[0], _colour(rng), int(rng.integers(1, 3)), cv2.LINE_AA, _SHIFT)
    for _ in range(rng.integers(1, 4)):  # random-walk curves
        n = int(rng.integers(5, 10))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, n))
        steps = rng.uniform(6, 18, (n, 1)) * np.stack([np.cos(heading), np.sin(heading)], 1)
        curve = rng.uniform(0, 1, 2) * size + np.cumsum(steps, 0)
        cv2.polylines(img, [_pts(curve)], False, _colour(rng), 1, cv2.LINE_AA, _SHIFT)
    for x, y in rng.uniform(0, 1, (int(rng.integers(10, 40)), 2)) * size:  # specks
        cv2.circle(img, (int(x), int(y)), 1, _colour(rng), -1)
    return img


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> tuple:
    """A uniform random RGB colour, redrawn (a few times) when too close to ``away_from``."""
    for _ in range(8):
        c = rng.integers(0, 256, 3)
        if away_from is None or np.abs(c - away_from).sum() >= 90:
            break
    return tuple(int(v) for v in c)


def _luma(c: np.ndarray) -> float:
    return float(np.dot(c, [0.299, 0.587, 0.114]))


def _shape_mask(rng: np.random.Generator, h: int, w: int, kind: int, cx, cy, r, hole=0.0):
    """Boolean mask of one shape; ``kind`` in DISC/CORE (disc), SQUARE, TRIANGLE, RING."""
    canvas = np.zeros((h, w), np.uint8)
    c = _pts([cx, cy])[0, 0]
    if kind in (DISC, CORE, RING):
        cv2.circle(canvas, c, round(r * _ONE), 1, -1, cv2.LINE_8, _SHIFT)
        if kind == RING:
            cv2.circle(canvas, c, round(hole * _ONE), 0, -1, cv2.LINE_8, _SHIFT)
    elif kind == SQUARE:
        side = 2 * r * rng.uniform(0.75, 0.9)
        box = cv2.boxPoints(((cx, cy), (side, side), rng.uniform(0, 90)))
        cv2.fillPoly(canvas, [_pts(box)], 1, cv2.LINE_8, _SHIFT)
    else:  # TRIANGLE: jittered vertex angles and radii
        ang = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
        rad = r * rng.uniform(1.05, 1.3, 3)  # a triangle covers less than a disc: enlarge
        tri = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        cv2.fillPoly(canvas, [_pts(tri)], 1, cv2.LINE_8, _SHIFT)
    return canvas.astype(bool)


def _paint(rng, img: np.ndarray, m: np.ndarray, cx, cy, r, striped: bool) -> None:
    """Fill ``img[m]``: a plain colour with gradient shading, or two-colour stripes."""
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return
    under = img[ys, xs].reshape(-1, 3).mean(0)
    if striped:
        c1 = np.array(_colour(rng, under))
        c2 = np.array(_colour(rng, c1))
        for _ in range(8):  # stripes must survive JPEG's chroma subsampling: differ in luma
            if abs(_luma(c1) - _luma(c2)) >= 50:
                break
            c2 = np.array(_colour(rng, c1))
        period, phi = rng.uniform(4, 8), rng.uniform(0, np.pi)
        t = (xs * np.cos(phi) + ys * np.sin(phi) + rng.uniform(0, period)) % period
        vals = np.where((t < period / 2)[:, None], c1, c2).astype(np.float32)
    else:
        c = np.array(_colour(rng, under), np.float32)
        phi, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0, 40)
        shade = amp * ((xs - cx) * np.cos(phi) + (ys - cy) * np.sin(phi)) / max(r, 1.0)
        vals = c + shade[:, None].astype(np.float32)
    vals += rng.normal(0, rng.uniform(0, 6), vals.shape).astype(np.float32)
    img[ys, xs] = np.clip(vals, 0, 255).astype(np.uint8)


def _place(rng, w: int, h: int, r: float, margin: float, placed: list, hole: float):
    """A centre for a new object that keeps every ring's hole clear and hides no object."""
    for _ in range(30):
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        ok = True
        for ox, oy, orad, ohole in placed:
            d = np.hypot(cx - ox, cy - oy)
            if d < ohole + r or d < hole + orad or d + orad <= 0.9 * r:
                ok = False
                break
        if ok:
            return cx, cy
    return None


def render_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``(uint8 HxWx3 RGB image, uint8 HxW mask)`` pair; sizes vary in [112, 176]."""
    h, w = (int(v) for v in rng.integers(112, 177, size=2))
    img = _background(rng, h, w)
    inst = np.zeros((h, w), np.uint8)  # instance ids, 0 = background
    kinds, areas = [BACKGROUND], [0]
    placed: list[tuple[float, float, float, float]] = []

    def add(m: np.ndarray, kind: int) -> None:
        inst[m] = len(kinds)
        kinds.append(kind)
        areas.append(int(m.sum()))

    for _ in range(rng.integers(2, 7)):
        kind = int(rng.choice([DISC, SQUARE, TRIANGLE, RING, STRIPED]))
        small_disc = kind == DISC and rng.random() < 0.5
        r = rng.uniform(4, 14) if small_disc else rng.uniform(16 if kind == RING else 12, 32)
        hole = r * (1 - rng.uniform(0.30, 0.45)) if kind == RING else 0.0
        at = _place(rng, w, h, r, r if kind == RING else 0.6 * r, placed, hole)
        if at is None:
            continue
        cx, cy = at
        placed.append((cx, cy, r, hole))
        shape = kind if kind != STRIPED else int(rng.choice([DISC, SQUARE]))
        m = _shape_mask(rng, h, w, shape, cx, cy, r, hole)
        _paint(rng, img, m, cx, cy, r, striped=kind == STRIPED)
        add(m, kind)
        if kind == RING and rng.random() < 0.5:  # a core: a small disc inside the hole
            rc = float(np.clip(hole * rng.uniform(0.45, 0.7), 4.0, hole - 2.0))
            off = rng.uniform(0, max(hole - rc - 2.0, 0.0))
            a = rng.uniform(0, 2 * np.pi)
            kx, ky = cx + off * np.cos(a), cy + off * np.sin(a)
            m = _shape_mask(rng, h, w, CORE, kx, ky, rc)
            _paint(rng, img, m, kx, ky, rc, striped=False)
            add(m, CORE)
    visible = np.bincount(inst.ravel(), minlength=len(kinds))
    lut = np.array(kinds, np.uint8)
    lut[1:][visible[1:] < 0.25 * np.array(areas[1:])] = 255  # mostly hidden objects are void
    label = lut[inst]
    kernel = np.ones((3, 3), np.uint8)  # void band on every instance's visible boundary, as in VOC
    label[cv2.dilate(inst, kernel) != cv2.erode(inst, kernel)] = 255
    return img, label


# ---------------------------------------------------------------- cache directory
def dataset_dir_name(seed: int = 0, num_train: int = 1000, num_val: int = 100) -> str:
    """E.g. ``synthetic-v1-seed0-1000-100``: a new generator version gets a new directory."""
    return f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{num_train}-{num_val}"


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` is a finished dataset (its marker is written last)."""
    return (directory / MARKER).is_file()


def write_synthetic(directory: Path, *, seed: int, num_train: int, num_val: int) -> None:
    """Write the dataset into ``directory`` (VOC2012 layout), the completion marker last."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette(256)
    lists: dict[str, list[str]] = {}
    for split, count in zip(SPLITS, (num_train, num_val), strict=True):
        lists[split] = [f"{split}_{i:05d}" for i in range(count)]
        for i, name in enumerate(lists[split]):
            image, mask = render_sample(sample_rng(seed, split, i))
            write_image(directory / "JPEGImages" / f"{name}.jpg", image, jpeg_quality=90)
            write_mask_png(directory / "SegmentationClass" / f"{name}.png", mask, palette)
    lists["trainval"] = lists["train"] + lists["val"]
    for split, ids in lists.items():
        (directory / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "\n".join(ids) + "\n"
        )
    meta = dict(
        generator_version=GENERATOR_VERSION, seed=seed, num_train=num_train, num_val=num_val,
        classes=list(SYNTHETIC_CLASSES),
    )  # fmt: skip
    (directory / MARKER).write_text(json.dumps(meta, indent=1) + "\n")


def _discard(directory: Path) -> None:
    """Move ``directory`` aside atomically, then delete it."""
    trash = directory.with_name(f".{directory.name}.trash-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(directory, trash)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_dead_temp_dirs(base: Path, name: str) -> None:
    """Delete temp dirs of this name left by crashed processes on this host."""
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    for p in base.glob(f".{name}.tmp-*"):
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix) :].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass  # unparsable or alive: never touch it


def ensure_synthetic(
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 100,
) -> Path:
    """Return the VOC2012-format directory of the synthetic dataset, writing it on first use.

    The directory ``<cache_dir>/synthetic-v<version>-seed<seed>-<train>-<val>`` is written into a
    private temp dir beside it and renamed into place, so a crash leaves nothing that is used and
    concurrent first uses are safe (the first rename wins, the other process drops its copy).
    """
    if num_train < 1 or num_val < 1:
        raise DataError(
            f"synthetic dataset: need >= 1 train and val images, got {num_train}/{num_val}"
        )
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = dataset_dir_name(seed, num_train, num_val)
    target = base / name
    if is_complete(target):
        return target
    try:
        base.mkdir(parents=True, exist_ok=True)
        _remove_dead_temp_dirs(base, name)
        tmp = base / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise DataError(
            f"cache dir '{base}': cannot write ({e.strerror}); set LEANSEG_CACHE or data.root "
            "to a writable directory"
        ) from None
    log.info("writing the synthetic dataset to %s (first use)", target)
    try:
        write_synthetic(tmp, seed=seed, num_train=num_train, num_val=num_val)
        if target.exists() and not is_complete(target):
            _discard(target)  # an unfinished directory from elsewhere is never used
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # anything but "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
