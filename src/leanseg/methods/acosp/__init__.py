"""ACoSP (Ditschuneit & Otterbach, GCPR 2022): learned soft top-k channel masks during training.

``apply(model, sparsity=0.75)`` gives every prunable conv a score vector and a channel mask
after it (conv -> mask -> norm); the masks anneal from soft to hard on a :class:`MaskSchedule`
and :func:`harden` fixes them to the top-k scores. Spec: shared/methods/acosp.md.
"""

from leanseg.checkpoint import register_rebuild
from leanseg.methods.acosp.masks import (
    apply,
    channel_mask,
    couple_scores,
    harden,
    is_hard,
    masked_convs,
    output_convs,
    set_temperature,
)
from leanseg.methods.acosp.rebuild import rebuild, rebuild_from_checkpoint
from leanseg.methods.acosp.schedule import MaskSchedule
from leanseg.methods.acosp.shrink import shrink, shrink_with_spec
from leanseg.methods.acosp.shrink_checkpoint import ShrinkReport, shrink_checkpoint
from leanseg.methods.acosp.soft_topk import hard_mask, kept_channels, soft_mask, temperature

register_rebuild("acosp", rebuild_from_checkpoint)

__all__ = [
    "MaskSchedule",
    "ShrinkReport",
    "apply",
    "channel_mask",
    "couple_scores",
    "hard_mask",
    "harden",
    "is_hard",
    "kept_channels",
    "masked_convs",
    "output_convs",
    "rebuild",
    "set_temperature",
    "shrink",
    "shrink_checkpoint",
    "shrink_with_spec",
    "soft_mask",
    "temperature",
]
