"""Per-sample magnitude masks and the (bitmap, values) storage of a sparsified tensor.

Storage (backrazor.md section 3): ``values`` are the kept entries as one 1-D gather in row-major
order; ``bitmap`` is the mask flattened, zero-padded to a multiple of 8 and packed MSB-first,
8 mask bits per ``uint8``. Cost per element: ``(1 - R) * bytes(dtype) + 1/8``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # MSB first


def _shifts(device: torch.device) -> Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.uint8, device=device)


def pack_mask(mask: Tensor) -> tuple[Tensor, int]:
    """Pack a bool mask MSB-first, 8 bits per byte, zero-padded; returns ``(bytes, numel)``."""
    flat = mask.reshape(-1).to(torch.uint8)
    numel = flat.numel()
    pad = (-numel) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    packed = (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)
    return packed, numel


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape`` (the padding bits are cut)."""
    numel = math.prod(shape)
    bits = (packed.reshape(-1, 1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].view(tuple(shape)).bool()


def keep_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at prune ratio ``ratio``: ``ceil((1 - ratio) * n)``, in ``[1, n]``.

    ``ratio * n`` is rounded to 6 decimals first so that float noise (``0.7 * 10 = 7.0000001``)
    does not move the count by one.
    """
    dropped = math.floor(round(ratio * n, 6))
    return min(max(n - dropped, 1), n)


@torch.no_grad()
def magnitude_mask(x: Tensor, ratio: float) -> Tensor:
    """Per-sample top-k magnitude mask of ``x`` (shape ``[B, ...]``; a 1-D ``x`` is one sample).

    For each sample ``b`` with ``n = numel(x[b])``: ``tau_b`` is the ``ceil((1 - ratio) * n)``-th
    largest ``|x[b]|`` and ``M[b] = |x[b]| >= tau_b``, so ties at ``tau`` are all kept and
    ``ratio = 0`` keeps everything. Exact zeros are never kept: a dropped zero unsparsifies to
    the same zero, and this avoids the original's pitfall 3 (``tau = 0`` after a ReLU keeps all
    the zeros as values).
    """
    rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1).abs()
    n = rows.shape[1]
    if n == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k_smallest = n - keep_count(n, ratio) + 1
    if k_smallest == 1:  # ratio 0 keeps every entry: no selection needed
        return (rows != 0).view(x.shape)
    tau = rows.kthvalue(k_smallest, dim=1, keepdim=True).values
    keep = (rows >= tau) & (rows != 0)
    return keep.view(x.shape)


@torch.no_grad()
def sparsify(x: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """``(packed bitmap, kept values)`` of ``x`` under :func:`magnitude_mask`."""
    mask = magnitude_mask(x, ratio)
    # nonzero + index_select: the same values as masked_select, 2-5x faster on CPU
    values = x.detach().reshape(-1).index_select(0, mask.reshape(-1).nonzero().squeeze(1))
    packed, _ = pack_mask(mask)
    return packed, values


def unsparsify(packed: Tensor, values: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Scatter ``values`` into a zero tensor of ``shape`` where the packed mask is set."""
    mask = unpack_mask(packed, shape)
    return values.new_zeros(tuple(shape)).masked_scatter_(mask, values)
