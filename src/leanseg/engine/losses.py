"""Training losses as pure functions: (class-weighted) cross-entropy, OHEM cross-entropy, soft
Dice, focal loss, weighted multi-output sums, KD.

Everything is computed in float32 whatever the dtype of the logits (as the trainer's plain
cross-entropy already is), so the losses behave the same under fp16/bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F

Criterion = Callable[..., torch.Tensor]  # criterion(logits, target, *, ignore_index=...)


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A float32 zero that stays in the graph of ``logits`` (so backward still works)."""
    return logits.float().sum() * 0.0


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    thresh: float = 0.7,
    min_kept: int = 100000,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Online hard example mining cross-entropy (FasterSeg's ``ProbOhemCrossEntropy2d``).

    ``logits`` is ``B x C x ...``, ``target`` ``B x ...``; ``p`` is the softmax probability of
    the true class at each valid (non-``ignore_index``) pixel. The branches:

    1. No valid pixel: returns a zero in the graph of ``logits``. *Differs:* the original
       returns NaN (a mean over nothing), which the trainer would stop on.
    2. Fewer valid pixels than ``min_kept`` (strictly, as the original): plain cross-entropy
       averaged over all valid pixels; no mining.
    3. Otherwise the threshold is ``t = thresh``, raised to the ``min_kept``-th smallest ``p``
       when that is larger (``min_kept <= 0``: ``t = thresh`` alone). Pixels with ``p <= t``
       are kept, ties included, so more than ``min_kept`` may be kept. The loss is the mean
       cross-entropy over the kept pixels. Kept can only be empty when ``min_kept <= 0`` and
       every ``p > thresh``; that returns a zero (*differs:* the original gives NaN).

    ``p`` is a float32 softmax (the original's under fp32 training) and the k-th smallest is
    ``kthvalue`` (the same value as the original's full ``argsort``). The selection carries no
    gradient; the gradient flows through the kept pixels' CE only. FasterSeg's settings:
    ``thresh=0.7``, ``min_kept = B*H*W // 16`` at full resolution (training).

    ``weight`` (per-class, as ``F.cross_entropy``'s): the selection is unweighted, then the
    kept pixels' CE is the weighted mean (:func:`cross_entropy`; a zero total weight: zero).
    """
    logits = logits.float()
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid == 0:
        return _zero(logits)
    if num_valid < min_kept:
        return cross_entropy(logits, target, ignore_index=ignore_index, weight=weight)
    with torch.no_grad():
        safe = torch.where(valid, target, torch.zeros_like(target))
        prob = F.softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        threshold = torch.tensor(float(thresh), dtype=prob.dtype, device=prob.device)
        if min_kept > 0:
            kth = prob[valid].kthvalue(min_kept).values  # min_kept <= num_valid here
            threshold = torch.maximum(threshold, kth)
        kept = valid & (prob <= threshold)
    if not bool(kept.any()):
        return _zero(logits)
    hard = torch.where(kept, target, torch.full_like(target, ignore_index))
    return cross_entropy(logits, hard, ignore_index=ignore_index, weight=weight)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index)``:
    the mean over valid pixels of ``-w[t] log p_t``, divided by ``sum w[t]``. With ``weight``,
    a zero total weight of the valid pixels (all ignored, or only zero-weight classes) gives a
    zero in the graph instead of torch's NaN (as the fused upsampling path does)."""
    logits = logits.float()
    if weight is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    weight = weight.to(device=logits.device, dtype=torch.float32)
    valid = target != ignore_index
    if not bool(weight[target[valid]].sum() > 0):
        return _zero(logits)
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


DICE_SMOOTH = 1.0  # added to the numerator and denominator of every class's Dice


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    weight: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Soft multi-class Dice loss on softmax probabilities, over the non-ignored pixels.

    With ``p = softmax(logits)`` (float32) and ``y`` the one-hot target, summed over every
    valid pixel of the whole batch: ``dice_c = (2 sum p_c y_c + smooth) / (sum p_c + sum y_c
    + smooth)`` and the loss is ``1 - sum_c w_c dice_c / sum_c w_c``, a mean over *all* C
    classes (``w`` = 1, or the per-class ``weight``); a class absent from the batch counts
    through its predicted mass (``dice_c = smooth / (sum p_c + smooth)``). ``smooth`` = 1
    keeps empty classes finite. No valid pixel: every ``dice_c`` is 1, the loss a zero in the
    graph; a zero total weight: zero.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    prob = F.softmax(logits, dim=1) * valid.unsqueeze(1)
    p_true = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
    flat_valid = valid.reshape(-1)
    labels = safe.reshape(-1)[flat_valid]
    inter = torch.zeros(num_classes, dtype=prob.dtype, device=prob.device)
    inter = inter.index_add(0, labels, p_true.reshape(-1)[flat_valid])
    counts = torch.bincount(labels, minlength=num_classes).to(prob.dtype)
    mass = prob.transpose(0, 1).reshape(num_classes, -1).sum(dim=1)
    dice = (2 * inter + smooth) / (mass + counts + smooth)
    if weight is None:
        return 1 - dice.mean()
    weight = weight.to(device=logits.device, dtype=torch.float32)
    total = weight.sum()
    if not bool(total > 0):
        return _zero(logits)
    return 1 - (weight * dice).sum() / total


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al.) ``-a_t (1 - p_t)^gamma log p_t``, ``p_t`` the float32 softmax
    probability of the true class, averaged over the valid pixels weighted by ``a_t``:
    ``sum a_t FL / sum a_t``, with ``a_t = weight[t]`` (the class weights as alpha) or 1. So
    ``gamma = 0`` is exactly the (weighted) cross-entropy. No valid pixel or a zero total
    weight: a zero in the graph.
    """
    logits = logits.float()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    log_p = F.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    one_minus = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)  # 1 - p_t
    pixel = -one_minus.pow(gamma) * log_p if gamma != 0 else -log_p
    if weight is None:
        alpha = valid.to(pixel.dtype)
    else:
        alpha = weight.to(device=logits.device, dtype=torch.float32)[safe] * valid
    norm = alpha.sum()
    positive = norm > 0
    return torch.where(positive, (pixel * alpha).sum() / torch.where(positive, norm, 1.0), 0.0)


def segmentation_loss(
    outputs: Mapping[str, torch.Tensor],
    masks: torch.Tensor,
    *,
    ignore_index: int,
    weights: Mapping[str, float],
    criterion: Criterion,
) -> torch.Tensor:
    """``sum(weights[k] * criterion(outputs[k].float(), masks, ignore_index=...))`` over outputs.

    ``criterion`` is e.g. ``F.cross_entropy`` or ``functools.partial(ohem_cross_entropy,
    thresh=0.7, min_kept=...)``; every output must be at the resolution of ``masks`` (or at
    feature resolution for a criterion that upsamples, ``objective.PixelCriterion``). Weights of
    keys the model did not return are unused (an aux weight for a model without an aux head); an
    output without a weight is a ValueError. ``{"out": 1, "aux": aux_weight}`` with
    ``F.cross_entropy`` is exactly the trainer's current loss.
    """
    missing = [key for key in outputs if key not in weights]
    if missing:
        raise ValueError(
            f"model output {missing[0]!r} has no loss weight: add it to weights "
            f"(given: {sorted(weights)})"
        )
    if not outputs:
        raise ValueError("segmentation_loss: the model returned no outputs")
    total: torch.Tensor | None = None
    for key, logits in outputs.items():
        term = weights[key] * criterion(logits.float(), masks, ignore_index=ignore_index)
        total = term if total is None else total + term
    return total


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: Literal["mean", "pixel"] = "mean",
) -> torch.Tensor:
    """KL(teacher || student) on ``B x C x ...`` logits, in float32, times ``temperature**2``.

    With ``s = log_softmax(student / T)`` and ``q = softmax(teacher / T)`` the element-wise KL
    is ``q * (log q - s)``:

    - ``"mean"``: its mean over all ``B*C*H*W`` elements, FasterSeg's
      ``nn.KLDivLoss()(log_softmax(student), softmax(teacher))`` (1/C of a per-pixel KL;
      computed here without KLDivLoss's "mean", which torch means to turn into "batchmean");
    - ``"pixel"``: summed over classes, averaged over the ``B*H*W`` pixels (= C x "mean").

    FasterSeg uses T = 1 and has no temperature; for T != 1 the loss is scaled by T**2 (Hinton
    et al.), so its gradient keeps the same size across temperatures; at T = 1 it is the
    original formula. Every pixel counts (no ignore mask, as the original). The teacher is
    detached. Teacher logits of another spatial size are resized bilinearly
    (``align_corners=False``) to the student's; another batch or class count is a ValueError.
    """
    if reduction not in ("mean", "pixel"):
        raise ValueError(f"distillation_loss: reduction {reduction!r} must be 'mean' or 'pixel'")
    if temperature <= 0:
        raise ValueError(f"distillation_loss: temperature {temperature} must be > 0")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if teacher.shape[:2] != student.shape[:2] or teacher.ndim != student.ndim:
        raise ValueError(
            f"distillation_loss: teacher logits {tuple(teacher.shape)} and student logits "
            f"{tuple(student.shape)} differ in batch or class count: use a teacher trained on "
            "the student's classes"
        )
    if teacher.shape[2:] != student.shape[2:]:
        if student.ndim != 4:
            raise ValueError(
                f"distillation_loss: cannot resize teacher logits {tuple(teacher.shape)} to "
                f"{tuple(student.shape)}: only B x C x H x W maps are resized"
            )
        teacher = F.interpolate(
            teacher, size=student.shape[2:], mode="bilinear", align_corners=False
        )
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True)
    loss = kl.mean() if reduction == "mean" else kl.sum(dim=1).mean()
    return loss * temperature**2
