"""A frozen teacher for knowledge distillation, rebuilt from a leanseg checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
from leanseg.data.normalization import data_normalization, recorded_normalization
from leanseg.errors import CheckpointError, ConfigError
from leanseg.models import build_model
from leanseg.models.base import model_outputs


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    a, b = [float(v) for v in a], [float(v) for v in b]
    return len(a) == len(b) and all(
        math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a, b, strict=False)
    )


def load_teacher(
    path: str | Path,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device,
) -> nn.Module:
    """The checkpoint's model on ``device``, in eval mode, every parameter frozen.

    ``num_classes``, ``mean`` and ``std`` are the student's; a teacher trained on another class
    count or another input normalisation (see :func:`recorded_normalization`) is a
    CheckpointError. Read with ``weights_only=True`` (never unpickles code).
    """
    payload = load_checkpoint(path)
    if int(payload["num_classes"]) != num_classes:
        raise CheckpointError(
            f"teacher checkpoint '{path}' predicts {payload['num_classes']} classes but the "
            f"student {num_classes}: use a teacher trained on the student's dataset and classes"
        )
    t_mean, t_std = recorded_normalization(payload)
    if not (_same(t_mean, mean) and _same(t_std, std)):
        raise CheckpointError(
            f"teacher checkpoint '{path}' was trained on inputs normalised with mean {t_mean} "
            f"std {t_std}, the student's are mean {tuple(mean)} std {tuple(std)}: use a teacher "
            "trained with the student's data normalisation (same data.dataset, data.mean, data.std)"
        )
    return freeze(model_from_checkpoint(payload, str(path)), device)


def freeze(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` on ``device``, in eval mode, every parameter without gradient."""
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def stand_in_teacher(name: str, num_classes: int, device: str | torch.device) -> nn.Module:
    """A randomly initialised, frozen model ``name`` (the dry run's teacher before one exists)."""
    return freeze(build_model(name, num_classes), device)


def configured_teacher(
    path: str | Path,
    *,
    num_classes: int,
    student_config: dict[str, Any],
    device: str | torch.device,
) -> nn.Module:
    """:func:`load_teacher` of the config key ``distill.teacher``, checked against the student.

    ``student_config`` is the student's config as plain data (its normalisation is read with
    :func:`recorded_normalization`). A missing file is a one-line ConfigError naming the key.
    """
    if not Path(path).is_file():
        raise ConfigError(
            f"config key 'distill.teacher': teacher checkpoint '{path}' not found; train the "
            "teacher first and point distill.teacher at its last.pt (or best.pt), or set "
            "distill.teacher=null to train without distillation"
        )
    mean, std = data_normalization(student_config.get("data", {}))
    return load_teacher(path, num_classes=num_classes, mean=mean, std=std, device=device)


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's ``"out"`` logits for ``images``, without gradient and in eval mode.

    ``eval()`` is set again on every call, since ``train()`` on a parent module flips it back.
    """
    teacher.eval()
    with torch.no_grad():
        return model_outputs(teacher(images))["out"]
