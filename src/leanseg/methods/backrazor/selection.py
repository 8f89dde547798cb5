"""Which entries BackRazor keeps: the per-sample top-k magnitudes (backrazor.md section 2).

For each sample ``b`` of ``x`` (shape ``[B, ...]``; a 1-D ``x`` is one sample) with
``n = numel(x[b])``: ``tau_b`` is the ``ceil((1 - ratio) * n)``-th largest ``|x[b]|`` and
``M[b] = |x[b]| >= tau_b``, so ties at ``tau`` are all kept and ``ratio = 0`` keeps everything.
Exact zeros are never kept: a dropped zero unsparsifies to the same zero, and this avoids the
original's pitfall 3 (``tau = 0`` after a ReLU keeps all the zeros as values).

The selection is exact but avoids a full top-k over each sample (the costliest part of a
BackRazor step on CPU): a strided sample of each row gives a lower bound that, with a wide
margin, at least ``keep`` magnitudes reach; the exact ``tau`` is then selected among those
candidates only. If the bound misses for some row, every entry is a candidate instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SAMPLE_STRIDE = 61  # prime, so that the sample does not lock onto channel or row periods
_MIN_SAMPLE = 256  # smaller rows are selected directly


def keep_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at prune ratio ``ratio``: ``ceil((1 - ratio) * n)``, in ``[1, n]``.

    ``ratio * n`` is rounded to 6 decimals first so that float noise (``0.7 * 10 = 7.0000001``)
    does not move the count by one.
    """
    dropped = math.floor(round(ratio * n, 6))
    return min(max(n - dropped, 1), n)


def _candidate_bound(magnitudes: Tensor, keep: int) -> Tensor | None:
    """Per-row values that at least ``keep`` magnitudes almost surely reach (None: no sample)."""
    sample = magnitudes[:, ::_SAMPLE_STRIDE]
    size, n = sample.shape[1], magnitudes.shape[1]
    expected = keep * size / n
    rank = math.ceil(1.05 * expected + 6 * math.sqrt(expected) + 8)  # over 6 sigma above
    if size < _MIN_SAMPLE or rank >= size:
        return None
    return sample.topk(rank, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


def _candidates(magnitudes: Tensor, bound: Tensor | None) -> tuple[Tensor, list[int]]:
    """Flat indices (ascending) of the magnitudes ``>= bound`` and their count per row."""
    rows, n = magnitudes.shape
    if bound is None:
        return torch.arange(rows * n, device=magnitudes.device), [n] * rows
    index = (magnitudes >= bound).reshape(-1).nonzero().squeeze(1)
    starts = torch.arange(rows + 1, device=index.device) * n
    return index, torch.searchsorted(index, starts).diff().tolist()


@torch.no_grad()
def kept_indices(x: Tensor, ratio: float) -> Tensor:
    """Flat indices (ascending, row-major) of the entries of ``x`` that BackRazor keeps."""
    rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    n = rows.shape[1]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    keep = keep_count(n, ratio)
    if keep == n:  # ratio 0 keeps every entry: no selection needed
        return rows.reshape(-1).nonzero().squeeze(1)
    # post-ReLU inputs are their own magnitudes: skip the copy that abs() would make
    magnitudes = rows if bool(rows.min() >= 0) else rows.abs()
    index, counts = _candidates(magnitudes, _candidate_bound(magnitudes, keep))
    if min(counts) < keep:  # the sampled bound missed: select among all entries
        index, counts = _candidates(magnitudes, None)
    values = magnitudes.reshape(-1).index_select(0, index)
    # tau per row: the keep-th largest candidate, i.e. the largest of the (count - keep + 1)
    # smallest (topk of that few is about twice as fast as kthvalue on CPU)
    taus = torch.stack(
        [
            row.topk(count - keep + 1, largest=False, sorted=False).values.amax()
            for row, count in zip(values.split(counts), counts, strict=True)
        ]
    )
    tau = taus.repeat_interleave(torch.tensor(counts, device=x.device))
    return index[(values >= tau) & (values != 0)]


@torch.no_grad()
def magnitude_mask(x: Tensor, ratio: float) -> Tensor:
    """The bool mask of the entries :func:`kept_indices` keeps, shaped like ``x``."""
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    return mask.index_fill_(0, kept_indices(x, ratio), True).view(x.shape)
