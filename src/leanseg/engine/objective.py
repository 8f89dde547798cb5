"""The training objective a config names: the criterion, the weight of each model output, and
the check that every output the model returns in training has a weight.

The loss itself is :func:`leanseg.engine.losses.segmentation_loss` (+ the KD term of
:func:`leanseg.engine.losses.distillation_loss` when ``distill.teacher`` is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanseg.config import Config
from leanseg.engine.losses import (
    Criterion,
    cross_entropy,
    dice_loss,
    focal_loss,
    ohem_cross_entropy,
)
from leanseg.engine.runtime import rng_state, set_rng_state
from leanseg.engine.upsampled_loss import no_autocast, upsampled_cross_entropy
from leanseg.errors import ConfigError
from leanseg.models.base import model_outputs

PROBE_SIZE = 64  # the probe forward's largest side: output keys do not depend on the size


def loss_weights(cfg: Config) -> dict[str, float]:
    """``loss.weights``, or ``{"out": 1, "aux": model.aux_weight}`` when it is null."""
    if cfg.loss.weights is None:
        return {"out": 1.0, "aux": cfg.model.aux_weight}
    return dict(cfg.loss.weights)


CE_LOSSES = ("ce", "ohem", "ce+dice")  # the names with a cross-entropy term
PROB_LOSSES = ("dice", "focal", "ce+dice")  # the names with a term on full-resolution probs


@dataclass(frozen=True)
class PixelCriterion:
    """The ``loss.name`` criterion of logits at the target's size, or of feature-resolution
    logits that it upsamples itself (bilinear with ``align_corners``, the model's).

    - ``ce``: cross-entropy; ``ohem=(thresh, min_kept)`` makes it OHEM cross-entropy (also
      with ``name="ohem"``); at feature resolution it is
      :func:`~leanseg.engine.upsampled_loss.upsampled_cross_entropy` (the same loss, without
      saving full-resolution tensors for backward);
    - ``dice`` / ``focal``: :func:`~leanseg.engine.losses.dice_loss` /
      :func:`~leanseg.engine.losses.focal_loss` (``focal_gamma``); feature-resolution logits
      are upsampled with ``F.interpolate`` first (exactly the model's upsampling, so the same
      loss; autograd then saves the full-resolution probabilities, as without fusion);
    - ``ce+dice``: ``ce + dice_weight * dice``.

    ``class_weights`` (one per class, None: all 1) weight the CE / OHEM pixels, are focal's
    alpha and give Dice's weighted class mean. Everything is float32 with autocast off.
    """

    ohem: tuple[float, int] | None = None
    align_corners: bool = False
    name: str = "ce"
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 2.0
    dice_weight: float = 1.0

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int
    ) -> torch.Tensor:
        if self.name not in CE_LOSSES + PROB_LOSSES:
            raise ValueError(f"PixelCriterion: unknown loss {self.name!r}")
        weight = self._weight(logits)
        fused = logits.dim() == 4 and logits.shape[-2:] != target.shape[-2:]
        total: torch.Tensor | None = None
        if self.name in CE_LOSSES:
            total = self._cross_entropy(logits, target, ignore_index, weight, fused)
        if self.name in PROB_LOSSES:
            with no_autocast(logits.device):
                full, labels = logits.float(), target.long()
                if fused:
                    full = F.interpolate(
                        full,
                        size=target.shape[-2:],
                        mode="bilinear",
                        align_corners=self.align_corners,
                    )
                if self.name == "focal":
                    term = focal_loss(
                        full,
                        labels,
                        ignore_index=ignore_index,
                        gamma=self.focal_gamma,
                        weight=weight,
                    )
                else:
                    term = dice_loss(full, labels, ignore_index=ignore_index, weight=weight)
                    if total is not None:
                        term = self.dice_weight * term
            total = term if total is None else total + term
        return total

    def _weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The class weights as a float32 tensor on the logits' device (None: unweighted)."""
        if self.class_weights is None:
            return None
        check_class_weights(self.class_weights, logits.shape[1])
        return torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)

    def _cross_entropy(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        weight: torch.Tensor | None,
        fused: bool,
    ) -> torch.Tensor:
        ohem = self.ohem
        if fused:
            return upsampled_cross_entropy(
                logits,
                target,
                align_corners=self.align_corners,
                ignore_index=ignore_index,
                weight=weight,
                ohem=ohem,
            )
        target = target.long()
        if ohem is None:
            if weight is None:  # today's plain CE, unchanged
                return F.cross_entropy(logits, target, ignore_index=ignore_index)
            return cross_entropy(logits, target, ignore_index=ignore_index, weight=weight)
        thresh, min_kept = ohem
        return ohem_cross_entropy(
            logits,
            target,
            ignore_index=ignore_index,
            thresh=thresh,
            min_kept=min_kept,
            weight=weight,
        )


def check_class_weights(class_weights: Sequence[float] | None, num_classes: int) -> None:
    """A one-line ConfigError when ``loss.class_weights`` has not one weight per class."""
    if class_weights is not None and len(class_weights) != num_classes:
        raise ConfigError(
            f"config key 'loss.class_weights': {len(class_weights)} weights for {num_classes} "
            f"classes; give one weight per class ({num_classes} values, in class-id order) or "
            "null"
        )


def loss_criterion(
    cfg: Config, align_corners: bool = False, *, num_classes: int | None = None
) -> Criterion:
    """The criterion of ``loss.name`` with the config's settings (:class:`PixelCriterion`),
    for logits at the target's size or at feature resolution (upsampled with
    ``align_corners``, the model's). ``num_classes``, when known, checks
    ``loss.class_weights`` now (else at the first call)."""
    loss = cfg.loss
    ohem = (loss.ohem_thresh, loss.ohem_min_kept) if loss.name == "ohem" else None
    weights = None if loss.class_weights is None else tuple(map(float, loss.class_weights))
    if num_classes is not None:
        check_class_weights(weights, num_classes)
    return PixelCriterion(
        ohem,
        align_corners,
        name=loss.name,
        class_weights=weights,
        focal_gamma=float(loss.focal_gamma),
        dice_weight=float(loss.dice_weight),
    )


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
            outputs = model_outputs(model(torch.zeros(2, 3, height, width, device=device)))
        return list(outputs)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
        set_rng_state(rng)
