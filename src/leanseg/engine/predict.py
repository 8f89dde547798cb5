"""Predict label maps for image files: index PNGs, colour PNGs and overlays.

Predict never writes over an input: :func:`prepare_outputs` refuses an output directory that is
(or holds) an input's directory and any output that is an input file, and checks that the
directory can be written, before any prediction runs. Outputs of an earlier run in the output
directory are replaced. Each file is written to a temporary name first and then renamed.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from leanseg.data.image_io import read_image, write_image, write_mask_png
from leanseg.data.palettes import colorize, voc_palette
from leanseg.errors import CheckpointError, DataError
from leanseg.viz import overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = (".png", "_color.png", "_overlay.png")  # index, colour, overlay per image


def checkpoint_palette(payload: dict[str, Any], source: str) -> np.ndarray:
    """The ``K x 3`` uint8 colours a checkpoint records (its dataset's); VOC's for checkpoints
    written before palettes were recorded. A malformed palette is a one-line CheckpointError."""
    palette = payload.get("palette")
    palette = voc_palette(256) if palette is None else np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256:
        raise CheckpointError(
            f"checkpoint '{source}': palette has shape {tuple(palette.shape)}, "
            "expected (K, 3) with K <= 256; re-save the checkpoint"
        )
    return palette.astype(np.uint8)


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (their image files, sorted) into one list of paths.

    A file named twice (or also found in a named directory) is kept once, at its first place.
    """
    paths: list[Path] = []
    seen: set[Path] = set()
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            found = [p for p in found if p.is_file()]
            if not found:
                raise DataError(f"'{item}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif item.is_file():
            found = [item]
        else:
            raise DataError(f"input '{item}' not found: pass image files or directories")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def output_stems(paths: list[Path]) -> list[str]:
    """The output name stem of each input, unique and the same for the same inputs.

    An input whose stem no other input shares keeps it (``cat.jpg`` -> ``cat.png``). Inputs
    that share a stem (case-insensitively: ``cat.jpg``, ``Cat.png``) keep their extension,
    with ``_`` for the dot (``cat_jpg.png``, ``Cat_png.png``); if that is still taken (the same
    name in two directories, or another input's ``<stem>_color``), ``_2``, ``_3``, ... is added
    in input order.
    """
    shared = Counter(p.stem.casefold() for p in paths)
    taken: set[str] = set()
    stems = []
    for path in paths:
        with_ext = path.name.replace(".", "_")
        first = [path.stem] if shared[path.stem.casefold()] == 1 else []
        candidates = [*first, with_ext]
        n = 2
        while all(_names(c) & taken for c in candidates):
            candidates.append(f"{with_ext}_{n}")
            n += 1
        stem = next(c for c in candidates if not _names(c) & taken)
        taken |= _names(stem)
        stems.append(stem)
    return stems


def _names(stem: str) -> set[str]:
    return {f"{stem}{suffix}".casefold() for suffix in OUTPUT_SUFFIXES}


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` points to (links followed), None if it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def prepare_outputs(paths: list[Path], out_dir: Path) -> list[str]:
    """Check ``out_dir`` before any prediction runs, create it, and return the output stems.

    A DataError naming the path when ``out_dir`` is the directory of an input (predictions
    would mix with and could replace the user's images), when an output would be an input
    file (a link to it, say), or when ``out_dir`` cannot be created or written (a file of that
    name, no permission, no space).
    """
    out_id = _file_id(out_dir)
    for source in dict.fromkeys(p.parent for p in paths):
        if out_id is not None and out_id == _file_id(source):
            raise DataError(
                f"output directory '{out_dir}' is the input directory '{source}': predictions "
                "would mix with (and could overwrite) your images; pass another -o, e.g. "
                f"-o {source / 'predictions'}"
            )
    inputs = {_file_id(p): p for p in paths}
    stems = output_stems(paths)
    for stem in stems if out_id is not None else ():
        for suffix in OUTPUT_SUFFIXES:
            target = out_dir / f"{stem}{suffix}"
            clash = inputs.get(_file_id(target)) if target.exists() else None
            if clash is not None:
                raise DataError(
                    f"output '{target}' is the input file '{clash}': predict never overwrites "
                    "an input; pass another -o"
                )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # can we create files in it?
            pass
    except FileExistsError:
        raise DataError(
            f"output directory '{out_dir}' is a file: pass a directory with -o"
        ) from None
    except OSError as err:
        raise DataError(
            f"cannot write to output directory '{out_dir}' ({err.strerror or err}); "
            "check its permissions or pass another -o"
        ) from None
    return stems


def _write(path: Path, write: Callable[..., None], *args: object) -> None:
    """``write(tmp, *args)``, then rename to ``path``: never through a link, never half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp, *args)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(
            f"cannot write '{path}' ({err.strerror or err}); free some space, check the "
            "permissions or pass another -o"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def predict_files(
    labels_of: Callable[[np.ndarray], np.ndarray],
    paths: list[Path],
    out_dir: Path,
    *,
    palette: np.ndarray,
    progress: bool | None = True,
    stems: list[str] | None = None,
) -> list[Path]:
    """Write ``<stem>.png`` (index), ``<stem>_color.png`` and ``<stem>_overlay.png`` per image.

    ``labels_of`` maps an ``HxWx3`` uint8 image to its ``HxW`` label map (a
    :class:`leanseg.Predictor`). ``progress`` None: a progress bar only when stderr is a
    terminal. ``stems`` come from :func:`prepare_outputs` (which runs here when they are not
    given); ``palette`` colours the index PNG's palette, the colour PNG and the overlay.
    """
    if stems is None:
        stems = prepare_outputs(paths, out_dir)
    written = []
    for path, stem in zip(
        tqdm(paths, desc="predict", disable=None if progress is None else not progress),
        stems,
        strict=True,
    ):
        image = read_image(path)
        pred = labels_of(image).astype(np.uint8)
        color = colorize(pred, palette)
        index, color_path, overlay_path = (out_dir / f"{stem}{s}" for s in OUTPUT_SUFFIXES)
        _write(index, write_mask_png, pred, palette)
        _write(color_path, write_image, color)
        _write(overlay_path, write_image, overlay(image, color))
        written.append(index)
    return written
