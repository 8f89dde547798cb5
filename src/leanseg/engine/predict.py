"""Predict label maps for image files: index PNGs, colour PNGs and overlays."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from leanseg.data.image_io import read_image, write_image, write_mask_png
from leanseg.data.palettes import colorize
from leanseg.data.transforms import ToTensorNormalize
from leanseg.engine.inference import predict_probs
from leanseg.errors import DataError
from leanseg.viz import overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (their image files, sorted) into one list of paths."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"'{item}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"input '{item}' not found: pass image files or directories")
    return paths


@torch.no_grad()
def predict_files(
    model: nn.Module,
    paths: list[Path],
    out_dir: Path,
    *,
    palette: np.ndarray,
    device: torch.device,
    progress: bool = True,
    **inference: object,
) -> list[Path]:
    """Write ``<stem>.png`` (index), ``<stem>_color.png`` and ``<stem>_overlay.png`` per image.

    ``inference`` holds :func:`predict_probs` options (mode, scales, flip, crop_size, ...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    to_tensor = ToTensorNormalize()
    model.eval()
    written = []
    for path in tqdm(paths, desc="predict", disable=not progress):
        image = read_image(path)
        tensor, _ = to_tensor(image, np.zeros(image.shape[:2], np.uint8))
        probs = predict_probs(model, tensor.unsqueeze(0).to(device), **inference)
        pred = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
        color = colorize(pred, palette)
        write_mask_png(out_dir / f"{path.stem}.png", pred, palette)
        write_image(out_dir / f"{path.stem}_color.png", color)
        write_image(out_dir / f"{path.stem}_overlay.png", overlay(image, color))
        written.append(out_dir / f"{path.stem}.png")
    return written
