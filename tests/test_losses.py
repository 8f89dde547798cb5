"""OHEM cross-entropy against a per-pixel reference, and the weighted multi-output loss."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanseg.engine.losses import ohem_cross_entropy, segmentation_loss

IGNORE = 255


def _inputs(seed: int, shape=(2, 5, 6, 7), ignore_frac: float = 0.2, scale: float = 3.0):
    """Random logits and labels with about ``ignore_frac`` ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    logits = torch.randn(shape, generator=gen) * scale
    target = torch.randint(0, c, (b, h, w), generator=gen)
    target[torch.rand((b, h, w), generator=gen) < ignore_frac] = IGNORE
    return logits, target


def _pixels(logits: torch.Tensor, target: torch.Tensor) -> list[tuple[float, float]]:
    """``(p_true, ce)`` of every valid pixel, one pixel at a time in float64."""
    x, t = logits.double().numpy(), target.numpy()
    out = []
    for b, i, j in np.ndindex(t.shape):
        if t[b, i, j] == IGNORE:
            continue
        z = x[b, :, i, j] - x[b, :, i, j].max()
        log_p = z - math.log(np.exp(z).sum())
        out.append((math.exp(log_p[t[b, i, j]]), -log_p[t[b, i, j]]))
    return out


def ohem_reference(logits, target, thresh: float, min_kept: int) -> tuple[float, str, int]:
    """(loss, branch, kept count) by the rules of FasterSeg's ProbOhemCrossEntropy2d."""
    pixels = _pixels(logits, target)
    if not pixels:
        return 0.0, "empty", 0
    if len(pixels) < min_kept:
        return sum(ce for _, ce in pixels) / len(pixels), "few", len(pixels)
    threshold, branch = thresh, "thresh"
    if min_kept > 0:
        kth = sorted(p for p, _ in pixels)[min_kept - 1]
        if kth > thresh:
            threshold, branch = kth, "raised"
    kept = [ce for p, ce in pixels if p <= threshold]
    return sum(kept) / len(kept), branch, len(kept)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ohem_threshold_branch(seed: int) -> None:
    logits, target = _inputs(seed)
    num_valid = int((target != IGNORE).sum())
    expected, branch, kept = ohem_reference(logits, target, 0.7, 10)
    assert branch == "thresh" and 10 < kept < num_valid  # mining drops the easy pixels
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, thresh=0.7, min_kept=10)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    plain = F.cross_entropy(logits, target, ignore_index=IGNORE).item()
    assert got.item() > plain


@pytest.mark.parametrize("seed", [0, 3])
def test_ohem_min_kept_raises_threshold(seed: int) -> None:
    logits, target = _inputs(seed)
    num_valid = int((target != IGNORE).sum())
    min_kept = 3 * num_valid // 4
    expected, branch, kept = ohem_reference(logits, target, 0.05, min_kept)
    assert branch == "raised" and kept == min_kept < num_valid
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, thresh=0.05, min_kept=min_kept)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_min_kept_zero_uses_thresh_only() -> None:
    logits, target = _inputs(4)
    expected, branch, _ = ohem_reference(logits, target, 0.3, 0)
    assert branch == "thresh"
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, thresh=0.3, min_kept=0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_too_few_valid_pixels_is_plain_ce() -> None:
    logits, target = _inputs(5, ignore_frac=0.6)
    num_valid = int((target != IGNORE).sum())
    expected, branch, _ = ohem_reference(logits, target, 0.7, num_valid + 1)
    assert branch == "few"
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, min_kept=num_valid + 1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(got, F.cross_entropy(logits, target, ignore_index=IGNORE))
    # exactly min_kept valid pixels: mining runs, but the k-th smallest p keeps them all
    at_limit = ohem_cross_entropy(logits, target, ignore_index=IGNORE, min_kept=num_valid)
    assert at_limit.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("min_kept", [0, 5, 100000])
def test_ohem_all_ignored_is_zero_not_nan(min_kept: int) -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    loss = ohem_cross_entropy(logits, target, ignore_index=IGNORE, min_kept=min_kept)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ohem_nothing_kept_is_zero() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 10.0
    target = torch.ones(1, 2, 2, dtype=torch.long)  # every p is ~1 > thresh
    assert ohem_cross_entropy(logits, target, ignore_index=IGNORE, min_kept=0).item() == 0.0


def test_ohem_gradient_only_on_kept_pixels() -> None:
    logits, target = _inputs(6)
    logits.requires_grad_(True)
    ohem_cross_entropy(logits, target, ignore_index=IGNORE, thresh=0.7, min_kept=10).backward()
    p = F.softmax(logits.detach(), 1).gather(1, target.clamp(max=4).unsqueeze(1)).squeeze(1)
    kept = (target != IGNORE) & (p <= 0.7)
    touched = logits.grad.abs().sum(1) > 0
    assert torch.equal(touched, kept)


def test_ohem_half_precision_logits_give_float32() -> None:
    logits, target = _inputs(7)
    full = ohem_cross_entropy(logits, target, ignore_index=IGNORE, min_kept=10)
    half = ohem_cross_entropy(logits.bfloat16(), target, ignore_index=IGNORE, min_kept=10)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


def test_segmentation_loss_matches_trainer_exactly() -> None:
    out, masks = _inputs(8)
    aux, _ = _inputs(9)
    outputs = {"out": out, "aux": aux}
    got = segmentation_loss(
        outputs,
        masks,
        ignore_index=IGNORE,
        weights={"out": 1.0, "aux": 0.5},
        criterion=F.cross_entropy,
    )
    plain = F.cross_entropy(out, masks, ignore_index=IGNORE) + 0.5 * F.cross_entropy(
        aux, masks, ignore_index=IGNORE
    )
    assert torch.equal(got, plain)  # bit for bit the trainer's "out" + aux_weight * "aux"


def test_segmentation_loss_fasterseg_weights_with_ohem() -> None:
    preds = {k: _inputs(i)[0] for i, k in enumerate(("pred8", "pred16", "pred32"))}
    _, masks = _inputs(10)
    ohem = functools.partial(ohem_cross_entropy, thresh=0.7, min_kept=20)
    weights = {"pred8": 1.0, "pred16": 0.2, "pred32": 0.2, "aux": 0.4}  # unused aux weight: ok
    got = segmentation_loss(preds, masks, ignore_index=IGNORE, weights=weights, criterion=ohem)
    expected = sum(
        w * ohem_reference(preds[k], masks, 0.7, 20)[0] for k, w in weights.items() if k in preds
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_output_without_weight_is_an_error() -> None:
    out, masks = _inputs(11)
    with pytest.raises(ValueError, match="'aux'"):
        segmentation_loss(
            {"out": out, "aux": out},
            masks,
            ignore_index=IGNORE,
            weights={"out": 1.0},
            criterion=F.cross_entropy,
        )
