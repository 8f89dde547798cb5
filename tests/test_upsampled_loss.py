"""upsampled_cross_entropy against F.cross_entropy(F.interpolate(...)) and ohem_cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from leanseg.engine.losses import ohem_cross_entropy
from leanseg.engine.upsampled_loss import interpolation_matrix, upsampled_cross_entropy

IGNORE = 255


def _inputs(
    shape: tuple[int, int, int, int] = (2, 5, 7, 9),
    size: tuple[int, int] = (37, 41),
    *,
    seed: int = 0,
    ignore_frac: float = 0.0,
    dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random low-res logits (requiring grad) and full-res int64 labels with some ignored."""
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (b, *size), generator=gen)
    target[torch.rand((b, *size), generator=gen) < ignore_frac] = IGNORE
    return logits.requires_grad_(), target


def _up(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def _reference(logits, target, *, align_corners, weight=None, ignore_index=IGNORE):
    """The loss being replaced: full-resolution cross-entropy of the upsampled logits."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    up = _up(x, target.shape[-2:], align_corners)
    return F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index)


def _ohem_reference(logits, target, *, align_corners, thresh, min_kept, weight=None):
    """``ohem_cross_entropy``'s rules in the logits' dtype (it casts to float32), + weights."""
    up = _up(logits, target.shape[-2:], align_corners)
    valid = target != IGNORE
    num_valid = int(valid.sum())
    if num_valid == 0:
        return up.sum() * 0.0
    if num_valid < min_kept:
        return F.cross_entropy(up, target, weight=weight, ignore_index=IGNORE)
    with torch.no_grad():
        safe = torch.where(valid, target, 0)
        prob = F.softmax(up, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        threshold = torch.tensor(float(thresh), dtype=prob.dtype)
        if min_kept > 0:
            threshold = torch.maximum(threshold, prob[valid].kthvalue(min_kept).values)
        kept = valid & (prob <= threshold)
    if not bool(kept.any()):
        return up.sum() * 0.0
    hard = torch.where(kept, target, IGNORE)
    return F.cross_entropy(up, hard, weight=weight, ignore_index=IGNORE)


def _grad(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def _saved(fn) -> tuple[torch.Tensor, int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    """Run ``fn``; return its output, the bytes autograd saved (each storage once), the tensors."""
    sizes: dict[tuple[int, int], int] = {}
    tensors: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        sizes[key] = max(sizes.get(key, 0), t.numel() * t.element_size())
        tensors.append((t.dtype, tuple(t.shape)))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes.values()), tensors


# 1. interpolation matrices ----------------------------------------------------------------

SIZES = [
    ((13, 7), (100, 50)),
    ((7, 13), (50, 100)),
    ((33, 5), (257, 41)),
    ((32, 32), (256, 256)),
    ((16, 12), (256, 200)),
    ((1, 3), (5, 1)),
    ((8, 9), (8, 9)),  # identity
    ((10, 9), (4, 9)),  # downsampling rows, identity columns
]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("low", "high"), SIZES)
def test_interpolation_matrices_match_f_interpolate(align_corners, low, high) -> None:
    x = torch.randn(2, 3, *low, dtype=torch.float64)
    a_h = interpolation_matrix(low[0], high[0], align_corners=align_corners)
    a_w = interpolation_matrix(low[1], high[1], align_corners=align_corners)
    assert a_h.shape == (high[0], low[0]) and a_w.shape == (high[1], low[1])
    assert int((a_h != 0).sum(dim=1).max()) <= 2 and int((a_w != 0).sum(dim=1).max()) <= 2
    torch.testing.assert_close(a_h.sum(dim=1), torch.ones(high[0], dtype=torch.float64))
    torch.testing.assert_close(a_h @ x @ a_w.T, _up(x, high, align_corners), rtol=0, atol=1e-12)
    if low == high:
        assert torch.equal(a_h, torch.eye(low[0], dtype=torch.float64))


# 2. loss values ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 7, None, 37])
@pytest.mark.parametrize("case", ["plain", "ignore", "weighted"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_loss_value_matches_reference(dtype, rtol, align_corners, case, chunk_rows) -> None:
    logits, target = _inputs(ignore_frac=0.0 if case == "plain" else 0.3, dtype=dtype)
    weight = torch.rand(5, dtype=dtype) + 0.1 if case == "weighted" else None
    ours = upsampled_cross_entropy(
        logits, target, align_corners=align_corners, weight=weight, chunk_rows=chunk_rows
    )
    ref = _reference(logits, target, align_corners=align_corners, weight=weight)
    assert ours.dtype == dtype and ours.ndim == 0
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_size_and_uint8_target(align_corners) -> None:
    logits, target = _inputs(size=(7, 9), ignore_frac=0.2)
    ours = upsampled_cross_entropy(logits, target.to(torch.uint8), align_corners=align_corners)
    ref = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), rtol=1e-10, atol=1e-14)


# 3. gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", ["plain", "ignore", "weighted"])
def test_gradients_match_reference(align_corners, case) -> None:
    logits, target = _inputs(ignore_frac=0.0 if case == "plain" else 0.3)
    weight = torch.rand(5, dtype=torch.float64) + 0.1 if case == "weighted" else None
    kwargs = {"align_corners": align_corners, "weight": weight}
    ours = _grad(upsampled_cross_entropy(logits, target, chunk_rows=6, **kwargs), logits)
    ref = _grad(_reference(logits, target, **kwargs), logits)
    assert ours.dtype == torch.float64 and ref.abs().max() > 1e-4
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)


def _branch_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Inputs for the OHEM tests: logits, target, the upsampled true-class p, the valid count."""
    logits, target = _inputs((2, 4, 5, 6), (23, 29), seed=3, ignore_frac=0.2, scale=3.0)
    up = _up(logits.detach(), target.shape[-2:], False)
    valid = target != IGNORE
    prob = F.softmax(up, 1).gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    return logits, target, prob[valid], int(valid.sum())


def _ohem_case(name: str, prob: torch.Tensor, num_valid: int) -> tuple[float, int]:
    """``(thresh, min_kept)`` of each branch, checked to land in that branch."""
    if name == "few":  # fewer valid pixels than min_kept: plain CE
        return 0.7, num_valid + 1
    if name == "raised":  # kthvalue above thresh raises the threshold
        min_kept = num_valid // 2
        assert float(prob.kthvalue(min_kept).values) > 0.05
        return 0.05, min_kept
    if name == "thresh":  # kthvalue below thresh: thresh decides
        assert float(prob.kthvalue(10).values) < 0.5 and 10 < int((prob <= 0.5).sum())
        return 0.5, 10
    if name == "thresh_only":  # min_kept <= 0: thresh alone
        assert 0 < int((prob <= 0.4).sum()) < num_valid
        return 0.4, 0
    if name == "none_kept":  # min_kept <= 0 and every p > thresh: zero
        assert float(prob.min()) > 1e-9
        return 1e-9, 0
    raise AssertionError(name)


OHEM_CASES = ["few", "raised", "thresh", "thresh_only", "none_kept"]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", OHEM_CASES)
def test_ohem_gradients_match_reference(name, weighted) -> None:
    logits, target, prob, num_valid = _branch_inputs()
    thresh, min_kept = _ohem_case(name, prob, num_valid)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    ours = upsampled_cross_entropy(
        logits, target, align_corners=False, weight=weight, ohem=(thresh, min_kept), chunk_rows=5
    )
    ref = _ohem_reference(
        logits, target, align_corners=False, thresh=thresh, min_kept=min_kept, weight=weight
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g_ours, g_ref = _grad(ours, logits), _grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-12)
    if name == "none_kept":
        assert ours.item() == 0.0 and not bool(g_ours.any())
    else:
        assert ours.item() > 0 and g_ours.abs().max() > 1e-4
    if name == "few":
        plain = _reference(logits, target, align_corners=False, weight=weight)
        torch.testing.assert_close(ours, plain, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", OHEM_CASES)
def test_ohem_matches_ohem_cross_entropy_float32(name) -> None:
    """The real ``ohem_cross_entropy`` on the upsampled float32 logits; the same pixels kept."""
    logits, target, prob, num_valid = _branch_inputs()
    thresh, min_kept = _ohem_case(name, prob, num_valid)
    x = logits.detach().float().requires_grad_()
    ours, _, _ = _saved(
        lambda: upsampled_cross_entropy(x, target, align_corners=False, ohem=(thresh, min_kept))
    )
    up = _up(x, target.shape[-2:], False)
    ref = ohem_cross_entropy(up, target, ignore_index=IGNORE, thresh=thresh, min_kept=min_kept)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grad(ours, x), _grad(ref, x), rtol=1e-4, atol=1e-8)


def test_ohem_folds_selection_into_saved_target() -> None:
    logits, target, prob, num_valid = _branch_inputs()
    thresh, min_kept = _ohem_case("thresh_only", prob, num_valid)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.uint8:
            kept.append(t != IGNORE)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        upsampled_cross_entropy(logits, target, align_corners=False, ohem=(thresh, min_kept))
    assert len(kept) == 1 and int(kept[0].sum()) == int((prob <= thresh).sum())


def test_ohem_ties_are_kept() -> None:
    """Equal logits: every p is 1/C, so the min_kept-th p ties with all and all are kept."""
    logits = torch.zeros(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 10, 11))
    ours = upsampled_cross_entropy(logits, target, align_corners=True, ohem=(0.1, 5))
    ref = _reference(logits, target, align_corners=True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("ohem", [None, (0.7, 10), (0.7, 0)])
def test_nothing_valid_is_zero_in_graph(ohem) -> None:
    logits, target = _inputs()
    target.fill_(IGNORE)
    loss = upsampled_cross_entropy(logits, target, align_corners=False, ohem=ohem)
    assert loss.requires_grad and loss.item() == 0.0
    grad = _grad(loss, logits)
    assert grad.shape == logits.shape and not bool(grad.any()) and not bool(grad.isnan().any())


# 4. gradcheck -----------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(align_corners, weighted) -> None:
    logits, target = _inputs((2, 3, 3, 4), (11, 13), seed=1, ignore_frac=0.2)
    weight = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64) if weighted else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return upsampled_cross_entropy(
            x, target, align_corners=align_corners, weight=weight, chunk_rows=4
        )

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


# 5. saved-for-backward bytes --------------------------------------------------------------


@pytest.mark.parametrize("low", [32, 16])
def test_saved_bytes(low) -> None:
    b, c, size = 2, 21, (256, 256)
    logits, target = _inputs((b, c, low, low), size, dtype=torch.float32, ignore_frac=0.1)
    ours, ours_bytes, ours_saved = _saved(
        lambda: upsampled_cross_entropy(logits, target, align_corners=False)
    )
    ref, ref_bytes, _ = _saved(lambda: _reference(logits, target, align_corners=False))
    print(
        f"\nsaved per sample, {low}x{low} -> 256x256, C=21: ours {ours_bytes / b / 1e6:.3f} MB, "
        f"reference {ref_bytes / b / 1e6:.3f} MB ({ref_bytes / ours_bytes:.0f}x less)"
    )
    assert ours_bytes / b <= 1e6
    assert ref_bytes / b >= 5e6
    big = [(dtype, shape) for dtype, shape in ours_saved if torch.Size(shape).numel() >= 256 * 256]
    assert big == [(torch.uint8, (b, *size))]  # the only full-res tensor: the uint8 target
    ours.backward()  # the saved tensors are enough for backward
    assert logits.grad is not None and logits.grad.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("num_classes", "ignore_index", "target_dtype", "dtype"),
    [
        (21, -100, torch.int64, torch.uint8),
        (256, 255, torch.int64, torch.uint8),
        (300, -100, torch.int64, torch.int16),
        (200, -100, torch.uint8, torch.uint8),  # -100 must not wrap to 156 in uint8
        (300, -100, torch.uint8, torch.int16),  # label 255 is a class, not ignored
    ],
)
def test_saved_target_dtype(num_classes, ignore_index, target_dtype, dtype) -> None:
    logits, target = _inputs((1, num_classes, 3, 3), (6, 5), ignore_frac=0.3)
    target[target == IGNORE] = ignore_index if target_dtype == torch.int64 else 0
    target[0, 0, :3] = torch.tensor([155, 156, 255]).clamp_max(num_classes - 1)
    target = target.to(target_dtype)
    ours, _, saved = _saved(
        lambda: upsampled_cross_entropy(
            logits, target, align_corners=False, ignore_index=ignore_index
        )
    )
    assert [d for d, shape in saved if shape == (1, 6, 5)] == [dtype]
    ref = _reference(logits, target, align_corners=False, ignore_index=ignore_index)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), rtol=1e-8, atol=1e-14)


# 6. low-precision logits ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype) -> None:
    logits, target = _inputs((2, 5, 8, 8), (64, 60), dtype=dtype, ignore_frac=0.2)
    ours = upsampled_cross_entropy(logits, target, align_corners=False, chunk_rows=9)
    assert ours.dtype == torch.float32
    x32 = logits.detach().float().requires_grad_()
    ref = _reference(x32, target, align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)  # same values, both in float32
    grad = _grad(ours, logits)
    assert grad.dtype == dtype
    ref_grad = _grad(ref, x32)
    torch.testing.assert_close(
        grad.float(), ref_grad, rtol=1e-2, atol=1e-2 * float(ref_grad.abs().max())
    )


def test_autocast_does_not_lower_precision() -> None:
    logits, target = _inputs((2, 5, 8, 8), (64, 60), dtype=torch.float32, ignore_frac=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = upsampled_cross_entropy(logits, target, align_corners=True)
        grad = _grad(ours, logits)
    ref = _reference(logits, target, align_corners=True)
    assert ours.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, _grad(ref, logits), rtol=1e-4, atol=1e-9)


# 7. aux-head sum --------------------------------------------------------------------------


def test_aux_head_sum() -> None:
    out, target = _inputs((2, 5, 8, 8), (31, 33), seed=4, ignore_frac=0.2)
    aux, _ = _inputs((2, 5, 4, 5), (31, 33), seed=5)
    ours = upsampled_cross_entropy(out, target, align_corners=False) + 0.4 * (
        upsampled_cross_entropy(aux, target, align_corners=False, chunk_rows=3)
    )
    ref = _reference(out, target, align_corners=False) + 0.4 * (
        _reference(aux, target, align_corners=False)
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    g_ours = torch.autograd.grad(ours, (out, aux))
    g_ref = torch.autograd.grad(ref, (out, aux))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


# 8. bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logits_shape", "target_shape", "kwargs", "match"),
    [
        ((2, 5, 7, 9), (3, 20, 20), {}, "target must be B x H x W with B = 2"),
        ((2, 5, 7, 9), (2, 1, 20, 20), {}, "target must be B x H x W"),
        ((2, 5, 7, 9), (2, 20), {}, "target must be B x H x W"),
        ((5, 7, 9), (20, 20), {}, "logits must be B x C x h x w"),
        ((2, 5, 7, 9), (2, 20, 20), {"weight": torch.ones(4)}, r"weight must have shape \(5,\)"),
        ((2, 5, 7, 9), (2, 20, 20), {"chunk_rows": 0}, "chunk_rows must be >= 1"),
    ],
)
def test_bad_inputs(logits_shape, target_shape, kwargs, match) -> None:
    logits = torch.randn(logits_shape)
    target = torch.zeros(target_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match) as info:
        upsampled_cross_entropy(logits, target, align_corners=False, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("label", "dtype"), [(7, torch.int64), (-3, torch.int64), (44, torch.uint8)]
)
def test_out_of_range_label(label, dtype) -> None:
    logits, target = _inputs()
    target[0, 3, 4] = label
    with pytest.raises(ValueError, match=f"label {label} is outside 0..4") as info:
        upsampled_cross_entropy(logits, target.to(dtype), align_corners=False)
    assert "\n" not in str(info.value)
