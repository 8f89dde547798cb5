"""Which entries BackRazor keeps: the per-sample top-k magnitudes (backrazor.md section 2).

For each sample ``b`` of ``x`` (shape ``[B, ...]``; a 1-D ``x`` is one sample) with
``n = numel(x[b])``: ``tau_b`` is the ``ceil((1 - ratio) * n)``-th largest ``|x[b]|`` and
``M[b] = |x[b]| >= tau_b``, so ties at ``tau`` are all kept and ``ratio = 0`` keeps everything.
Exact zeros are never kept: a dropped zero unsparsifies to the same zero, and this avoids the
original's pitfall 3 (``tau = 0`` after a ReLU keeps all the zeros as values).

The selection is exact but avoids a full top-k over each sample (the costliest part of a
BackRazor step on CPU). A strided sample of each row gives lower bounds that at least ``keep``
magnitudes very probably reach (a tight one, then a safe one); one pass collects the
candidates (the entries at or above the bound; counted per row, so a miss is seen and the
next bound, or finally every entry, is used). ``tau`` is then selected among the candidates:
within a narrow band that a sample of them brackets, checked by counting (full selection
among the candidates where it misses). The kept entries are the candidates at or above
``tau``, so the result is the full selection's whatever the bounds are; they only set the cost.

The mask depends only on each sample's multiset of magnitudes, not on their order, so
:func:`kept_mask` works on any ``[rows, n]`` layout of the samples (the sparsifier uses the
tensor's memory order, so that a channels-last tensor is not copied).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SAMPLE_STRIDE = 61  # prime, so that the sample does not lock onto channel or row periods
_MIN_SAMPLE = 256  # smaller rows are selected directly
_BAND_SAMPLE = 2048  # sample size for narrowing tau among a row's candidates
_MIN_BAND_STRIDE = 8  # fewer than 8 * _BAND_SAMPLE candidates are selected directly


def keep_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at prune ratio ``ratio``: ``ceil((1 - ratio) * n)``, in ``[1, n]``.

    ``ratio * n`` is rounded to 6 decimals first so that float noise (``0.7 * 10 = 7.0000001``)
    does not move the count by one.
    """
    dropped = math.floor(round(ratio * n, 6))
    return min(max(n - dropped, 1), n)


def _sampled_lower_bounds(rows: Tensor, keep: int, signed: bool) -> list[Tensor]:
    """Per-row values that at least ``keep`` magnitudes very probably reach, tight first.

    From a strided sample: the tight bound has 3 sigma of margin, the safe one over 6 sigma
    plus 5%; both are only hints, which the caller checks (no bound: no usable sample). A NaN
    in a row's sample makes its safe bound NaN, which no entry reaches: then only that bound
    is given, so that the row takes the full selection as before.
    """
    sample = rows[:, ::_SAMPLE_STRIDE]
    size, n = sample.shape[1], rows.shape[1]
    expected = keep * size / n
    safe = math.ceil(1.05 * expected + 6 * math.sqrt(expected) + 8)  # over 6 sigma above
    if size < _MIN_SAMPLE or safe >= size:
        return []
    tight = math.ceil(expected + 3 * math.sqrt(expected) + 2)
    sample = sample.abs() if signed else sample
    top = sample.topk(safe, dim=1, sorted=False).values
    safe_bound = top.amin(dim=1, keepdim=True)
    if bool(safe_bound.isnan().any()):
        return [safe_bound]
    # the tight-th largest of the sample is the (safe - tight + 1)-th smallest of its top
    return [top.kthvalue(safe - tight + 1, dim=1, keepdim=True).values, safe_bound]


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest of a 1-D tensor, by a topk of the smaller side (NaN: largest)."""
    count = values.numel()
    if k <= count - k + 1:
        return values.topk(k, largest=False, sorted=False).values.amax()
    return values.topk(count - k + 1, sorted=False).values.amin()


def _row_threshold(values: Tensor, keep: int) -> Tensor:
    """``tau`` of one row: the ``keep``-th largest of its candidate magnitudes ``values``.

    That is the ``m = count - keep + 1``-th smallest. A strided sample of the candidates gives a
    narrow band ``[low, high]`` that very probably holds it; counting the candidates below the
    band checks that it does, and ``tau`` is then selected among the band only. Otherwise (or
    for few candidates) it is the largest of the ``m`` smallest, as a full selection gives.
    NaN is neither below nor in a band, so a NaN ``tau`` always takes the full selection.
    """
    count = values.numel()
    m = count - keep + 1
    stride = count // _BAND_SAMPLE
    if stride >= _MIN_BAND_STRIDE:
        sample = values[::stride]
        size = sample.numel()
        expected = m * size / count
        half = 4 * math.sqrt(expected * (1 - m / count)) + 2  # 4 sigma
        low_rank, high_rank = math.floor(expected - half), math.ceil(expected + half)
        if low_rank >= 1 and high_rank <= size:
            low = sample.kthvalue(low_rank).values
            high = sample.kthvalue(high_rank).values
            below = int(torch.count_nonzero(values < low))
            band = values[(values >= low) & (values <= high)]
            if below < m <= below + band.numel():
                return _kth_smallest(band, m - below)
    return values.topk(m, largest=False, sorted=False).values.amax()


def _thresholds(magnitudes: Tensor, counts: list[int], keep: int) -> Tensor:
    """``tau`` of each row (:func:`_row_threshold`); the rows' candidates one after another.

    Equal rows with few candidates take one batched selection (the same values).
    """
    if len(set(counts)) == 1 and counts[0] < _MIN_BAND_STRIDE * _BAND_SAMPLE:
        rows = magnitudes.view(len(counts), counts[0])
        m = counts[0] - keep + 1
        return rows.topk(m, dim=1, largest=False, sorted=False).values.amax(dim=1)
    return torch.stack([_row_threshold(row, keep) for row in magnitudes.split(counts)])


def _has_negative(rows: Tensor) -> bool:
    """Whether ``rows`` may hold a negative entry (a strided sample first, then every entry)."""
    return bool((rows[:, ::_SAMPLE_STRIDE] < 0).any()) or not bool(rows.min() >= 0)


def _reached(magnitudes: Tensor, counts: list[int], keep: int) -> Tensor:
    """Which candidates reach their row's ``tau`` (the rows' candidates one after another).

    With ``tau == 0`` (fewer than ``keep`` nonzero entries) only the nonzero ones do
    (``> 0`` changes nothing where ``tau > 0``).
    """
    taus = _thresholds(magnitudes, counts, keep)
    if len(set(counts)) == 1:
        reached = (magnitudes.view(len(counts), -1) >= taus[:, None]).view(-1)
    else:  # (a repeat_interleave of taus is slower than this on CPU)
        rows = magnitudes.split(counts)
        reached = torch.cat([row >= tau for row, tau in zip(rows, taus.unbind(), strict=True)])
    if bool((taus == 0).any()):
        reached.logical_and_(magnitudes > 0)
    return reached


@torch.no_grad()
def kept_mask(rows: Tensor, ratio: float, out: Tensor, nonnegative: bool = False) -> Tensor:
    """Write the kept entries of ``rows`` (``[samples, n]``, contiguous) into ``out``.

    ``out`` is a contiguous bool tensor shaped like ``rows``; returns the kept values, in
    order. ``nonnegative`` promises that no entry is negative (a ReLU's output), which skips a
    pass.
    """
    flat, mask = rows.reshape(-1), out.view(-1)
    n = rows.shape[1] if rows.dim() == 2 else 0
    if flat.numel() == 0:
        return flat
    keep = keep_count(n, ratio)
    if keep == n:  # ratio 0 keeps every entry: no selection needed
        torch.ne(flat, 0, out=mask)
        return flat.index_select(0, mask.nonzero().squeeze(1))
    signed = not nonnegative and _has_negative(rows)
    for lower in _sampled_lower_bounds(rows, keep, signed):
        # the candidates |x| >= lower, without a full-size copy |x|
        torch.ge(rows, lower, out=out)
        if signed:
            out.logical_or_(rows <= -lower)
        index = mask.nonzero().squeeze(1)
        starts = torch.arange(rows.shape[0] + 1, device=index.device) * n
        counts = torch.searchsorted(index, starts).diff().tolist()
        if min(counts) >= keep:
            values = flat.index_select(0, index)
            reached = _reached(values.abs() if signed else values, counts, keep)
            # out holds the candidates: clear the ones below tau (fewer than those above)
            mask.index_fill_(0, index[~reached], False)
            return values[reached]
    # no sample, or both sampled bounds missed: every entry is a candidate
    magnitudes = rows.abs() if signed else rows
    reached = _reached(magnitudes.reshape(-1), [n] * rows.shape[0], keep)
    mask.copy_(reached)
    return flat[reached]


def _as_rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``[samples, n]`` tensor in row-major order (a 1-D ``x``: 1 row)."""
    return x.reshape(x.shape[0] if x.dim() > 1 else 1, -1).contiguous()


@torch.no_grad()
def magnitude_mask(x: Tensor, ratio: float) -> Tensor:
    """The bool mask of the entries BackRazor keeps, shaped like ``x``."""
    rows = _as_rows(x)
    mask = torch.empty(rows.shape, dtype=torch.bool, device=x.device)
    kept_mask(rows, ratio, mask)
    return mask.view(x.shape)


@torch.no_grad()
def kept_indices(x: Tensor, ratio: float) -> Tensor:
    """Flat indices (ascending, row-major) of the entries of ``x`` that BackRazor keeps."""
    return magnitude_mask(x, ratio).reshape(-1).nonzero().squeeze(1)
