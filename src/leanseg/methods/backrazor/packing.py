"""Per-sample magnitude masks and the (bitmap, values) storage of a sparsified tensor.

Storage (backrazor.md section 3): ``values`` are the kept entries as one 1-D gather in row-major
order; ``bitmap`` is the mask flattened, zero-padded to a multiple of 8 and packed MSB-first,
8 mask bits per ``uint8``. Cost per element: ``(1 - R) * bytes(dtype) + 1/8``, where the values
keep the activation's dtype or, with ``value_dtype``, a narrower one (float16 / bfloat16).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from leanseg.methods.backrazor.selection import kept_indices

# Packing works on 64-bit words: the 8 mask bytes (0 or 1) of a word are gathered into its top
# byte, MSB first, by one multiplication (the shifted copies never overlap, so nothing carries);
# unpacking spreads a byte back over 8 bytes the same way. Both assume a little-endian machine.
# (both multipliers have bit 63 set: written as the signed int64 with the same bits)
_PACK_MULTIPLIER = sum(1 << (63 - 9 * i) for i in range(8)) - (1 << 64)
_UNPACK_MULTIPLIER = sum(1 << (9 * i) for i in range(8)) - (1 << 64)
_LOW_BIT_OF_EACH_BYTE = 0x0101010101010101
assert sys.byteorder == "little", "leanseg's BackRazor bit packing assumes a little-endian CPU"


def pack_mask(mask: Tensor) -> tuple[Tensor, int]:
    """Pack a bool mask MSB-first, 8 bits per byte, zero-padded; returns ``(bytes, numel)``."""
    flat = mask.reshape(-1).to(torch.bool)
    numel = flat.numel()
    pad = (-numel) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if flat.storage_offset() % 8:
        flat = flat.clone()
    words = flat.view(torch.uint8).view(torch.int64)
    return ((words * _PACK_MULTIPLIER) >> 56).to(torch.uint8), numel


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape`` (the padding bits are cut)."""
    numel = math.prod(shape)
    words = ((packed.reshape(-1).to(torch.int64) * _UNPACK_MULTIPLIER) >> 7) & _LOW_BIT_OF_EACH_BYTE
    return words.view(torch.uint8).view(torch.bool)[:numel].view(tuple(shape))


@torch.no_grad()
def sparsify(
    x: Tensor, ratio: float, value_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(packed bitmap, kept values)`` of ``x``: the entries :func:`kept_indices` keeps.

    The values are stored as ``value_dtype`` when given (None: ``x.dtype``).
    """
    index = kept_indices(x, ratio)
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device).index_fill_(0, index, True)
    packed, _ = pack_mask(mask)
    values = x.detach().reshape(-1).index_select(0, index)
    return packed, values if value_dtype is None else values.to(value_dtype)


def unsparsify(
    packed: Tensor,
    values: Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Scatter ``values`` (as ``dtype``, None: their own) into zeros of ``shape`` at the mask."""
    mask = unpack_mask(packed, shape)
    if dtype is not None:
        values = values.to(dtype)
    return values.new_zeros(tuple(shape)).masked_scatter_(mask, values)
