"""The training objective a config names: the criterion, the weight of each model output, and
the check that every output the model returns in training has a weight.

The loss itself is :func:`leanseg.engine.losses.segmentation_loss` (+ the KD term of
:func:`leanseg.engine.losses.distillation_loss` when ``distill.teacher`` is set).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from leanseg.config import Config
from leanseg.engine.losses import Criterion, ohem_cross_entropy
from leanseg.engine.runtime import rng_state, set_rng_state
from leanseg.errors import ConfigError

PROBE_SIZE = 64  # the probe forward's largest side: output keys do not depend on the size


def loss_weights(cfg: Config) -> dict[str, float]:
    """``loss.weights``, or ``{"out": 1, "aux": model.aux_weight}`` when it is null."""
    if cfg.loss.weights is None:
        return {"out": 1.0, "aux": cfg.model.aux_weight}
    return dict(cfg.loss.weights)


def loss_criterion(cfg: Config) -> Criterion:
    """``F.cross_entropy`` (``loss.name=ce``) or OHEM cross-entropy with the config's settings."""
    if cfg.loss.name == "ohem":
        return functools.partial(
            ohem_cross_entropy, thresh=cfg.loss.ohem_thresh, min_kept=cfg.loss.ohem_min_kept
        )
    return F.cross_entropy


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
