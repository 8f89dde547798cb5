"""An exponential moving average of a model's weights (``train.ema``).

After each optimizer step every floating-point parameter of the average becomes
``decay * ema + (1 - decay) * param``; the buffers (BatchNorm running statistics and their
counters, ACoSP's temperature and hard masks) are copied from the training model, as is common
(timm's ModelEmaV2 with its default, mmseg's EMA hook): the running statistics then describe the
activations of the weights being trained, not a second average of them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen, eval-mode deep copy of ``model`` that follows it by :meth:`update`.

    ``model`` is the unwrapped module (not DDP or a compiled wrapper); the copy starts equal to
    it, so that the average begins at the initial (e.g. pretrained) weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s weights; its buffers are copied."""
        for ema, param in zip(self.module.parameters(), model.parameters(), strict=True):
            if ema.is_floating_point():
                ema.lerp_(param.detach(), 1.0 - self.decay)
            else:
                ema.copy_(param)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Copy ``model``'s buffers (e.g. masks hardened after the last update)."""
        for ema, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema.copy_(buffer)
