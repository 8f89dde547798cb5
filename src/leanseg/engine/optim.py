"""Optimizer with backbone/head learning-rate groups and per-iteration LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    backbone_lr_mult: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """SGD, Adam (L2 weight decay) or AdamW; ``model.backbone`` at ``lr * backbone_lr_mult``,
    the rest at ``lr``.

    Each group remembers its base LR in ``initial_lr`` so schedules can scale it.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in params if id(p) in backbone_ids],
            "initial_lr": lr * backbone_lr_mult,
        },
        {"params": [p for p in params if id(p) not in backbone_ids], "initial_lr": lr},
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = group["initial_lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(
    iteration: int,
    total: int,
    *,
    schedule: str,
    power: float = 0.9,
    warmup_iters: int = 0,
    gamma: float = 0.992,
    decay_every: int = 1000,
) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based) of ``total``, after an optional
    linear warm-up (``(iteration + 1) / warmup_iters`` for the first ``warmup_iters``).

    - ``poly``: ``(1 - iteration / total) ** power``;
    - ``cosine``: ``(1 + cos(pi * iteration / total)) / 2``;
    - ``constant``: 1;
    - ``exponential``: ``gamma ** (iteration // decay_every)``, piecewise constant: FasterSeg's
      ``ExponentialLR(0.992)`` stepped after each epoch of ``decay_every`` = 1000 iterations
      (iterations 0..999 at the base LR, 1000..1999 at 0.992 x, ...). Like the other schedules
      it counts from iteration 0, warm-up included.
    """
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    if schedule == "exponential":
        return gamma ** (iteration // decay_every)
    progress = min(iteration / max(total, 1), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float, min_lr: float) -> float:
    """Scale each group's ``initial_lr`` by ``factor`` (floor ``min_lr``); return the head LR."""
    for group in optimizer.param_groups:
        group["lr"] = max(group["initial_lr"] * factor, min_lr)
    return optimizer.param_groups[-1]["lr"]
