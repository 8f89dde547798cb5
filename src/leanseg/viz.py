"""Pictures of predictions: colour masks, overlays and image | truth | prediction panels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leanseg.data.palettes import colorize
from leanseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised CHW tensor back to an HxWx3 uint8 RGB array."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
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
) -> list[np.ndarray]:
    """For each (image, mask) sample an HxW*4 strip: image | ground truth | prediction |
    the prediction over the image."""
    was_training = model.training
    model.eval()
    panels = []
    for image, mask in samples:
        logits = model(image.unsqueeze(0).to(device))["out"]
        pred = logits.argmax(1)[0].cpu().numpy()
        rgb, painted = denormalize(image), colorize(pred, palette)
        strip = [rgb, colorize(mask.numpy(), palette), painted, overlay(rgb, painted)]
        panels.append(np.concatenate(strip, axis=1))
    model.train(was_training)
    return panels
