"""Pictures of predictions: colour masks, overlays and image | truth | prediction panels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from leanseg.data.palettes import colorize
from leanseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from leanseg.models.base import model_outputs


def denormalize(
    image: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """A CHW tensor normalised with ``(mean, std)`` back to an HxWx3 uint8 RGB array."""
    mean = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


def overlay(image: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * color_mask.astype(np.float32)
    return blended.round().astype(np.uint8)


@torch.no_grad()
def prediction_panels(
    model: nn.Module,
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    palette: np.ndarray,
    normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> list[np.ndarray]:
    """For each (image, mask) sample an HxW*4 strip: image | ground truth | prediction |
    the prediction over the image; ``normalization``: the images' ``(mean, std)``."""
    was_training = model.training
    model.eval()
    panels = []
    for image, mask in samples:
        logits = model_outputs(model(image.unsqueeze(0).to(device)))["out"]
        pred = logits.argmax(1)[0].cpu().numpy()
        rgb, painted = denormalize(image, *normalization), colorize(pred, palette)
        strip = [rgb, colorize(mask.numpy(), palette), painted, overlay(rgb, painted)]
        panels.append(np.concatenate(strip, axis=1))
    model.train(was_training)
    return panels
