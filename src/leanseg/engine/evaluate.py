"""The evaluation loop: predict every batch of a loader and accumulate a confusion matrix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from leanseg.engine.inference import Pair, check_options, predict_probs, predict_whole
from leanseg.engine.metrics import ConfusionMatrix
from leanseg.errors import LeansegError

__all__ = ["NonFiniteOutputError", "evaluate"]


class NonFiniteOutputError(LeansegError):
    """The model predicted NaN or infinite scores: its weights have diverged."""


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    ignore_index: int = 255,
    device: torch.device | str,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: Pair | None = None,
    stride: Pair | None = None,
    base_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> ConfusionMatrix:
    """Evaluate ``model`` on ``(images, masks)`` batches; return the (all-reduced) matrix.

    The model is put in eval mode and its previous mode restored afterwards. ``mode``, ``scales``,
    ``flip``, ``crop_size``, ``stride`` and ``base_size`` are those of ``predict_probs``; plain
    whole-image single-scale evaluation takes the argmax of the logits directly. NaN or infinite
    scores raise :class:`NonFiniteOutputError` (an argmax would silently call them class 0).
    ``amp_dtype``: autocast dtype (None: fp32); ``channels_last``: batches in that format.
    """
    check_options(mode, scales, crop_size, stride)
    device = torch.device(device)
    fast = mode == "whole" and not flip and tuple(scales) == (1.0,) and base_size is None
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    matrix = ConfusionMatrix(num_classes, ignore_index, device=device)
    was_training = model.training
    model.eval()
    try:
        # disable=None: tqdm switches itself off when stderr is not a terminal.
        for images, masks in tqdm(loader, desc="eval", disable=None if progress else True):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = masks.to(device, non_blocking=True)
            with autocast:
                if fast:
                    scores = predict_whole(model, images)
                else:
                    scores = predict_probs(
                        model,
                        images,
                        mode=mode,
                        scales=scales,
                        flip=flip,
                        crop_size=crop_size,
                        stride=stride,
                        base_size=base_size,
                    )
            if not torch.isfinite(scores).all():
                raise NonFiniteOutputError(
                    "the model predicts NaN or infinite scores: its weights have diverged"
                )
            matrix.update(scores.argmax(1), masks)
    finally:
        model.train(was_training)
    matrix.all_reduce()
    return matrix
