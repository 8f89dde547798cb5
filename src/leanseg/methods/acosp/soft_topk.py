"""The sigmoid soft top-k channel mask and its temperature schedule (acosp.md sections 4-6).

Pure functions of the scores, the kept count and the temperature: nothing here holds state, so
every DDP rank and a resumed run compute the same mask from the same checkpointed scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_channels(channels: int, sparsity: float, min_keep: int = 8) -> int:
    """``k = max(ceil((1 - s) * C), min_keep)``, clamped to ``C`` (section 5)."""
    # round first so that float noise (1 - 0.9375) * 64 = 4.0000001 does not add a channel
    return min(max(math.ceil(round((1 - sparsity) * channels, 6)), min_keep), channels)


def soft_mask(scores: Tensor, k: int, tau: float) -> Tensor:
    """``sigmoid((z - x0) / tau)`` with ``z`` the standardised scores and ``x0`` their
    interpolated ``(1 - k/C)`` quantile (detached), so exactly ``k`` entries exceed 0.5."""
    channels = scores.numel()
    if k >= channels:
        return torch.ones_like(scores)
    z = (scores - scores.mean()) / scores.std().clamp_min(1e-3)
    x0 = torch.quantile(z.detach(), 1 - k / channels)
    return torch.sigmoid((z - x0) / tau)


def hard_mask(scores: Tensor, k: int) -> Tensor:
    """1.0 for the ``k`` largest scores, 0.0 elsewhere (ties go to the lower index)."""
    mask = torch.zeros_like(scores)
    return mask.index_fill_(0, scores.detach().topk(k).indices, 1.0)


def temperature(
    t: float, start: float, end: float, tau0: float = 1.0, tau_final: float = 1e-3
) -> float:
    """``tau0 * (tau_final / tau0) ** min((t - start) / (end - start), 1)`` for ``t > start``,
    ``tau0`` before (section 6)."""
    if t <= start:
        return tau0
    progress = min((t - start) / (end - start), 1.0) if end > start else 1.0
    return tau0 * (tau_final / tau0) ** progress
