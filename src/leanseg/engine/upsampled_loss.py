"""Cross-entropy of bilinearly upsampled logits that saves only the low-resolution logits.

The usual training loss ``F.cross_entropy(F.interpolate(logits, size=(H, W), mode="bilinear"),
target)`` makes autograd save the full-resolution log-probabilities (``B*C*H*W`` floats) and the
int64 target: ~6 MB a sample at 256x256 with 21 classes, for a model whose logits are 32x32.

Bilinear upsampling is separable and linear: ``up = A_h @ X @ A_w^T`` with ``A_h`` (``H x h``)
and ``A_w`` (``W x w``) interpolation matrices of at most two non-zeros a row, built here to
match PyTorch's ``upsample_bilinear2d`` for both ``align_corners``. :class:`UpsampledCrossEntropy`
computes the loss over chunks of output rows (upsample those rows only, log-softmax, gather,
weight, accumulate) and saves for backward only the low-resolution logits, the target packed as
uint8 (ignored and OHEM-dropped pixels folded into it), the class weights, the two small
matrices and the normaliser. Backward recomputes each chunk's upsampled logits, forms
``(softmax - onehot) * w[t] * valid / normaliser`` and maps it back with
``A_h[rows]^T @ grad @ A_w``. No full-resolution tensor outlives a chunk except, with OHEM, a
``B x H x W`` per-pixel temporary in forward.

Arithmetic is float32 whatever the logits dtype (float64 stays float64, for gradcheck); the
gradient has the logits' dtype. Autocast is disabled inside, so the matmuls stay float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

CHUNK_BYTES = 8 << 20  # the size of one chunk's B x C x rows x W temporary when chunk_rows=None

__all__ = [
    "UpsampledCrossEntropy",
    "interpolation_matrix",
    "no_autocast",
    "upsampled_cross_entropy",
]


@functools.lru_cache(maxsize=128)
def _taps(in_size: int, out_size: int, align_corners: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(i0, i1, lam)`` of each output index, as ``upsample_bilinear2d`` computes them (CPU)."""
    dst = torch.arange(out_size, dtype=torch.float64)
    if in_size == out_size:  # PyTorch's shortcut: the identity
        idx = torch.arange(out_size)
        return idx, idx, torch.zeros(out_size, dtype=torch.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = ((in_size / out_size) * (dst + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    lam = (src - i0).clamp(0.0, 1.0)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


def interpolation_matrix(
    in_size: int,
    out_size: int,
    *,
    align_corners: bool,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``out_size x in_size`` matrix of 1-D bilinear resizing (<= 2 non-zeros a row).

    ``A_h @ X @ A_w^T`` equals ``F.interpolate(X, size=(H, W), mode="bilinear",
    align_corners=align_corners)`` (no antialias) for ``X`` of size ``h x w``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"interpolation_matrix: sizes must be >= 1, got {in_size} -> {out_size}")
    i0, i1, lam = _taps(in_size, out_size, align_corners)
    rows = torch.arange(out_size)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    mat.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    mat.index_put_((rows, i1), lam, accumulate=True)
    return mat.to(device=device, dtype=dtype)


def _label_encoding(num_classes: int, ignore_index: int) -> tuple[torch.dtype, int]:
    """``(dtype, sentinel)`` of the saved target: valid labels kept, ignored pixels -> sentinel.

    uint8 whenever the labels fit in 0..255 with a free value for the sentinel (the
    ``ignore_index`` itself when it is in 0..255, else 255), otherwise the smallest signed type.
    """
    if num_classes <= 256 and 0 <= ignore_index <= 255:
        return torch.uint8, ignore_index
    if num_classes <= 255:
        return torch.uint8, 255
    for dtype in (torch.int16, torch.int32):
        if num_classes - 1 <= torch.iinfo(dtype).max:
            return dtype, -1
    return torch.int64, -1


def _valid_mask(target: Tensor, ignore_index: int) -> Tensor:
    """``target != ignore_index``, also when ``ignore_index`` does not fit target's dtype.

    (PyTorch wraps an out-of-range scalar: a uint8 ``target != -100`` would test ``!= 156``.)
    """
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _chunks(in_h: int, out_h: int, align_corners: bool, rows: int) -> list[tuple[int, ...]]:
    """``(r0, r1, lo, hi)``: output rows ``r0:r1`` read input rows ``lo:hi`` only."""
    i0, i1, _ = _taps(in_h, out_h, align_corners)
    bounds = [(r0, min(r0 + rows, out_h)) for r0 in range(0, out_h, rows)]
    return [(r0, r1, int(i0[r0]), int(i1[r1 - 1]) + 1) for r0, r1 in bounds]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for ``device`` (our matmuls, and the losses, stay in the compute dtype)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _upsample_rows(x: Tensor, a_h: Tensor, a_w_t: Tensor, chunk: tuple[int, ...]) -> Tensor:
    """Rows ``r0:r1`` of ``A_h @ x @ A_w^T``: ``B x C x (r1 - r0) x W``."""
    r0, r1, lo, hi = chunk
    return torch.matmul(a_h[r0:r1, lo:hi], torch.matmul(x[:, :, lo:hi], a_w_t))


class UpsampledCrossEntropy(torch.autograd.Function):
    """Autograd function behind :func:`upsampled_cross_entropy` (see the module docstring).

    ``forward(logits, target, weight, align_corners, ignore_index, ohem, chunk_rows)``: the
    arguments are checked by :func:`upsampled_cross_entropy`; ``weight`` may be None.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        align_corners: bool,
        ignore_index: int,
        ohem: tuple[float, int] | None,
        chunk_rows: int | None,
    ) -> Tensor:
        b, c, h, w = logits.shape
        out_h, out_w = target.shape[-2:]
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        device = logits.device
        with no_autocast(device):
            x = logits.to(cdtype)
            a_h = interpolation_matrix(h, out_h, align_corners=align_corners, dtype=cdtype)
            a_h = a_h.to(device)
            a_w = interpolation_matrix(w, out_w, align_corners=align_corners, dtype=cdtype)
            a_w = a_w.to(device)
            a_w_t = a_w.t().contiguous()
            wt = None if weight is None else weight.detach().to(device=device, dtype=cdtype)
            if chunk_rows is None:
                chunk_rows = max(1, CHUNK_BYTES // (b * c * out_w * x.element_size()))
            chunks = _chunks(h, out_h, align_corners, chunk_rows)

            enc_dtype, sentinel = _label_encoding(c, ignore_index)
            valid = _valid_mask(target, ignore_index)
            enc = torch.where(valid, target.to(enc_dtype), sentinel)
            pixel_nll = (
                torch.empty(b, out_h, out_w, dtype=cdtype, device=device)
                if ohem is not None
                else None
            )
            total = torch.zeros((), dtype=cdtype, device=device)
            norm = torch.zeros((), dtype=cdtype, device=device)
            for chunk in chunks:
                r0, r1 = chunk[0], chunk[1]
                up = _upsample_rows(x, a_h, a_w_t, chunk)
                ok = valid[:, r0:r1]
                safe = torch.where(ok, target[:, r0:r1], 0).long()
                nll = torch.logsumexp(up, dim=1) - up.gather(1, safe.unsqueeze(1)).squeeze(1)
                del up
                if pixel_nll is not None:
                    pixel_nll[:, r0:r1] = nll
                    continue
                pw = ok.to(cdtype) if wt is None else wt[safe] * ok
                total += (nll * pw).sum()
                norm += pw.sum()

            if pixel_nll is not None:
                kept = _ohem_keep(pixel_nll, valid, ohem)
                enc = torch.where(kept, enc, torch.full_like(enc, sentinel))
                safe = torch.where(kept, enc, torch.zeros_like(enc)).long()
                pw = kept.to(cdtype) if wt is None else wt[safe] * kept
                total = (pixel_nll * pw).sum()
                norm = pw.sum()
                del pixel_nll, safe, pw

            positive = norm > 0
            loss = torch.where(positive, total / torch.where(positive, norm, 1.0), 0.0)

        ctx.save_for_backward(logits, enc, wt, a_h, a_w, norm)
        ctx.chunks = chunks
        ctx.sentinel = sentinel
        ctx.cdtype = cdtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        logits, enc, wt, a_h, a_w, norm = ctx.saved_tensors
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        cdtype = ctx.cdtype
        with no_autocast(logits.device):
            x = logits.to(cdtype)
            a_w_t = a_w.t().contiguous()
            positive = norm > 0
            scale = torch.where(
                positive, grad_output.to(cdtype) / torch.where(positive, norm, 1.0), 0.0
            )
            grad = torch.zeros_like(x)
            for chunk in ctx.chunks:
                r0, r1, lo, hi = chunk
                ok = enc[:, r0:r1] != ctx.sentinel
                safe = torch.where(ok, enc[:, r0:r1], torch.zeros_like(enc[:, r0:r1])).long()
                coef = (ok.to(cdtype) if wt is None else wt[safe] * ok) * scale
                coef = coef.unsqueeze(1)
                g = torch.softmax(_upsample_rows(x, a_h, a_w_t, chunk), dim=1)
                g.mul_(coef)
                g.scatter_add_(1, safe.unsqueeze(1), -coef)  # (softmax - onehot) * coef
                grad[:, :, lo:hi] += torch.matmul(torch.matmul(a_h[r0:r1, lo:hi].t(), g), a_w)
        return (grad.to(logits.dtype), *none)


def _ohem_keep(pixel_nll: Tensor, valid: Tensor, ohem: tuple[float, int]) -> Tensor:
    """The pixels OHEM keeps, by the rules of :func:`leanseg.engine.losses.ohem_cross_entropy`.

    ``p = exp(-nll)`` is the true-class probability. Nothing valid: none kept; fewer valid than
    ``min_kept``: all valid; otherwise ``p <= max(thresh, kthvalue(p, min_kept))`` (``thresh``
    alone when ``min_kept <= 0``), ties kept.
    """
    thresh, min_kept = ohem
    num_valid = int(valid.sum())
    if num_valid == 0 or num_valid < min_kept:
        return valid
    prob = torch.exp(-pixel_nll)
    threshold = torch.tensor(float(thresh), dtype=prob.dtype, device=prob.device)
    if min_kept > 0:
        threshold = torch.maximum(threshold, prob[valid].kthvalue(min_kept).values)
    return valid & (prob <= threshold)


def upsampled_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    align_corners: bool,
    ignore_index: int = 255,
    weight: Tensor | None = None,
    ohem: tuple[float, int] | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Cross-entropy of ``logits`` (``B x C x h x w``) bilinearly resized to ``target``'s size.

    Equals ``F.cross_entropy(F.interpolate(logits.float(), size=target.shape[-2:],
    mode="bilinear", align_corners=align_corners), target.long(), weight=weight,
    ignore_index=ignore_index)`` up to rounding, but autograd keeps only the low-resolution
    logits and a uint8 target. ``ohem=(thresh, min_kept)`` mines hard pixels as
    :func:`leanseg.engine.losses.ohem_cross_entropy` does (class weights, if given, then weight
    the kept pixels). No valid (or kept) pixel, or a zero total weight: a zero in the graph.
    ``chunk_rows``: output rows computed at a time (None: a ~8 MB chunk). Returns a float32
    scalar (float64 for float64 logits).
    """
    if logits.ndim != 4:
        raise ValueError(
            "upsampled_cross_entropy: logits must be B x C x h x w, got shape "
            f"{tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"upsampled_cross_entropy: logits must be floating, got {logits.dtype}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"upsampled_cross_entropy: target must be B x H x W with B = {logits.shape[0]} "
            f"(logits {tuple(logits.shape)}), got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"upsampled_cross_entropy: target must be integer, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(
            f"upsampled_cross_entropy: target on {target.device}, logits on {logits.device}"
        )
    if min(target.shape) == 0 or min(logits.shape) == 0:
        raise ValueError(
            f"upsampled_cross_entropy: empty input (logits {tuple(logits.shape)}, "
            f"target {tuple(target.shape)})"
        )
    num_classes = logits.shape[1]
    if weight is not None and tuple(weight.shape) != (num_classes,):
        raise ValueError(
            f"upsampled_cross_entropy: weight must have shape ({num_classes},), "
            f"got {tuple(weight.shape)}"
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"upsampled_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if ohem is not None and len(ohem) != 2:
        raise ValueError(f"upsampled_cross_entropy: ohem must be (thresh, min_kept), got {ohem}")
    bad = target < 0  # no scalar out of the dtype's range (PyTorch would wrap it)
    if num_classes <= torch.iinfo(target.dtype).max:
        bad |= target >= num_classes
    bad &= _valid_mask(target, ignore_index)
    if bool(bad.any()):
        label = int(target[bad][0])
        raise ValueError(
            f"upsampled_cross_entropy: label {label} is outside 0..{num_classes - 1} and is not "
            f"ignore_index {ignore_index}"
        )
    return UpsampledCrossEntropy.apply(
        logits, target, weight, align_corners, ignore_index, ohem, chunk_rows
    )
