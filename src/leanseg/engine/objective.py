"""The training objective a config names: the criterion, the weight of each model output, and
the check that every output the model returns in training has a weight.

The loss itself is :func:`leanseg.engine.losses.segmentation_loss` (+ the KD term of
:func:`leanseg.engine.losses.distillation_loss` when ``distill.teacher`` is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanseg.config import Config
from leanseg.engine.losses import Criterion, ohem_cross_entropy
from leanseg.engine.runtime import rng_state, set_rng_state
from leanseg.engine.upsampled_loss import upsampled_cross_entropy
from leanseg.errors import ConfigError

PROBE_SIZE = 64  # the probe forward's largest side: output keys do not depend on the size


def loss_weights(cfg: Config) -> dict[str, float]:
    """``loss.weights``, or ``{"out": 1, "aux": model.aux_weight}`` when it is null."""
    if cfg.loss.weights is None:
        return {"out": 1.0, "aux": cfg.model.aux_weight}
    return dict(cfg.loss.weights)


@dataclass(frozen=True)
class PixelCriterion:
    """Cross-entropy (or OHEM cross-entropy with ``ohem=(thresh, min_kept)``) of logits at the
    target's size, or of feature-resolution logits that it upsamples itself
    (:func:`~leanseg.engine.upsampled_loss.upsampled_cross_entropy`, bilinear with
    ``align_corners``): the same loss, without saving full-resolution tensors for backward."""

    ohem: tuple[float, int] | None = None
    align_corners: bool = False

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int):
        if logits.dim() == 4 and logits.shape[-2:] != target.shape[-2:]:
            return upsampled_cross_entropy(
                logits,
                target,
                align_corners=self.align_corners,
                ignore_index=ignore_index,
                ohem=self.ohem,
            )
        if self.ohem is None:
            return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
        thresh, min_kept = self.ohem
        return ohem_cross_entropy(
            logits, target.long(), ignore_index=ignore_index, thresh=thresh, min_kept=min_kept
        )


def loss_criterion(cfg: Config, align_corners: bool = False) -> Criterion:
    """CE (``loss.name=ce``) or OHEM CE with the config's settings, for logits at the target's
    size or at feature resolution (upsampled with ``align_corners``, the model's)."""
    ohem = (cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) if cfg.loss.name == "ohem" else None
    return PixelCriterion(ohem, align_corners)


def loss_upsamples(cfg: Config) -> bool:
    """Whether the loss upsamples the model's training logits (``loss.fused_upsampling``; not
    with distillation, whose KD term compares input-size logits)."""
    return cfg.loss.fused_upsampling and cfg.distill.teacher is None


def check_loss_weights(
    outputs: Iterable[str], weights: Mapping[str, float], model_name: str
) -> list[str]:
    """Raise a one-line ConfigError when an output has no weight; return the unused weights."""
    outputs = list(outputs)
    missing = [key for key in outputs if key not in weights]
    if missing:
        raise ConfigError(
            f"config key 'loss.weights': model {model_name!r} returns the training outputs "
            f"{outputs}, and {missing} have no weight in {dict(weights)}; give every output a "
            "weight, e.g. loss.weights={out: 1.0, aux16: 0.2, aux32: 0.2} for FasterSeg with "
            "model.aux=true"
        )
    return [key for key in weights if key not in outputs]


def training_outputs(model: nn.Module, size: tuple[int, int], device: torch.device) -> list[str]:
    """The output keys of ``model`` in training mode, from one no-grad forward of two blank
    images of at most ``PROBE_SIZE`` px a side.

    The model's buffers (BatchNorm statistics), its train/eval mode and the global RNG are put
    back as they were, so the probe changes nothing of the run. Call it before the model is
    wrapped for DDP (no collective ops). A failing forward raises: the caller decides.
    """
    height, width = (min(side, PROBE_SIZE) for side in size)
    buffers = [b.detach().clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    rng = rng_state()
    try:
        model.train()
        with torch.no_grad():
            outputs = model(torch.zeros(2, 3, height, width, device=device))
        return list(outputs)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
        set_rng_state(rng)
