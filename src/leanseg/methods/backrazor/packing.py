"""Per-sample magnitude masks and the (bitmap, values) storage of a sparsified tensor.

Storage (backrazor.md section 3): ``values`` are the kept entries as one 1-D gather in row-major
order; ``bitmap`` is the mask flattened, zero-padded to a multiple of 8 and packed MSB-first,
8 mask bits per ``uint8``. Cost per element: ``(1 - R) * bytes(dtype) + 1/8``, where the values
keep the activation's dtype or, with ``value_dtype``, a narrower one (float16 / bfloat16).

The layers' saved copies (:func:`sparsify_stored`) use the tensor's memory order instead of the
logical row-major one, so that a channels-last activation is neither copied to sparsify it nor
rebuilt in another memory format for the backward; :class:`Layout` records that order. Which
entries are kept does not depend on it (each sample is one contiguous block either way).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from leanseg.methods.backrazor.selection import kept_mask

# Packing works on 64-bit words: the 8 mask bytes (0 or 1) of a word are gathered into its top
# byte, MSB first, by one multiplication (the shifted copies never overlap, so nothing carries);
# unpacking spreads a byte back over 8 bytes the same way. Both assume a little-endian machine.
# (both multipliers have bit 63 set: written as the signed int64 with the same bits)
_PACK_MULTIPLIER = sum(1 << (63 - 9 * i) for i in range(8)) - (1 << 64)
_UNPACK_MULTIPLIER = sum(1 << (9 * i) for i in range(8)) - (1 << 64)
_LOW_BIT_OF_EACH_BYTE = 0x0101010101010101
_TOP_BYTE = 7  # index of a word's most significant byte in its little-endian bytes
assert sys.byteorder == "little", "leanseg's BackRazor bit packing assumes a little-endian CPU"


class Layout(NamedTuple):
    """Shape and strides of a sparsified tensor; its saved copy is in memory (storage) order.

    ``flat.as_strided(shape, stride)`` turns the memory-order entries back into the tensor,
    with the very strides of the original (what the stock backward would have seen).
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_dense(x: Tensor) -> bool:
    """Whether ``x``'s entries fill ``numel`` consecutive storage places (any dim order)."""
    expected = 1
    for size, stride in sorted(
        ((n, s) for n, s in zip(x.shape, x.stride(), strict=True) if n > 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def storage_rows(x: Tensor) -> tuple[Tensor, Layout]:
    """``x``'s entries in memory order as ``[samples, n]`` (a 1-D ``x``: one row) and its layout.

    A view where each sample is one contiguous block of memory (row-major and channels-last
    tensors are), else a row-major copy.
    """
    numel, samples = x.numel(), x.shape[0] if x.dim() > 1 else 1
    if not (_is_dense(x) and (samples <= 1 or x.stride(0) * samples == numel)):
        x = x.contiguous()
    n = numel // samples if samples else 0
    rows = x.as_strided((samples, n), (n, 1))
    return rows, Layout(tuple(x.shape), tuple(x.stride()))


def padded_bool(numel: int, device: torch.device) -> Tensor:
    """A bool buffer of ``numel`` rounded up to 8, uninitialised except the padding (False)."""
    size = numel + (-numel) % 8
    buffer = torch.empty(size, dtype=torch.bool, device=device)
    buffer[numel:] = False
    return buffer


def pack_buffer(buffer: Tensor) -> Tensor:
    """Pack a bool buffer (contiguous, numel a multiple of 8, word aligned) in place.

    The buffer is overwritten; the result holds one byte per 8 entries.
    """
    buffer.view(torch.int64).mul_(_PACK_MULTIPLIER)
    return buffer.view(torch.uint8)[_TOP_BYTE::8].clone(memory_format=torch.contiguous_format)


def pack_mask(mask: Tensor) -> tuple[Tensor, int]:
    """Pack a bool mask MSB-first, 8 bits per byte, zero-padded; returns ``(bytes, numel)``."""
    flat = mask.reshape(-1).to(torch.bool)
    numel = flat.numel()
    buffer = padded_bool(numel, flat.device)
    buffer[:numel] = flat
    return pack_buffer(buffer), numel


def unpack_bytes(packed: Tensor, numel: int) -> Tensor:
    """The mask bits of ``packed`` as ``numel`` bytes, each 0 or 1 (``uint8``)."""
    words = packed.reshape(-1).to(torch.int64, memory_format=torch.contiguous_format)
    words.mul_(_UNPACK_MULTIPLIER).bitwise_right_shift_(7).bitwise_and_(_LOW_BIT_OF_EACH_BYTE)
    return words.view(torch.uint8)[:numel]


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape`` (the padding bits are cut)."""
    numel = math.prod(shape)
    return unpack_bytes(packed, numel).view(torch.bool).view(tuple(shape))


class _BackwardScratch(threading.local):
    """Dead dense buffers of the running backward pass (CPU), reused by later layers.

    A fresh multi-megabyte CPU tensor is page-faulted in on first touch, which costs far more
    than writing it (glibc maps big blocks afresh each time), and the backward builds one
    dense ``x~`` (and a ReLU one 0 / 1 mask) per layer, each used once. Up to
    ``_SCRATCH_BUFFERS`` buffers given back are handed out again (the oldest dropped first)
    until the backward pass ends, when an engine callback drops them all.
    """

    def __init__(self) -> None:
        self.free: list[Tensor] = []
        self.armed = False

    def _clear(self) -> None:
        self.free.clear()
        self.armed = False

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """A given-back flat buffer of ``numel`` entries of ``dtype`` (uninitialised), or None."""
        if device.type != "cpu":
            return None
        for i in range(len(self.free) - 1, -1, -1):
            if self.free[i].numel() == numel and self.free[i].dtype == dtype:
                return self.free.pop(i)
        return None

    def give(self, tensor: Tensor) -> None:
        """Give back a CPU tensor nothing else refers to; kept only inside a backward pass."""
        if tensor.device.type != "cpu" or torch.is_grad_enabled():  # create_graph may save it
            return
        if not self.armed:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._clear)
            except RuntimeError:  # not inside a backward pass
                return
            self.armed = True
        self.free.append(tensor.as_strided((tensor.numel(),), (1,), 0))
        del self.free[:-_SCRATCH_BUFFERS]


_SCRATCH_BUFFERS = 3
scratch = _BackwardScratch()


def dense_buffer(numel: int, dtype: torch.dtype, device: torch.device, zeroed: bool) -> Tensor:
    """A flat ``numel`` tensor (all zeros if ``zeroed``), reusing a dead backward buffer."""
    buffer = scratch.take(numel, dtype, device)
    if buffer is None:
        make = torch.zeros if zeroed else torch.empty
        return make(numel, dtype=dtype, device=device)
    return buffer.zero_() if zeroed else buffer


@torch.no_grad()
def sparsify_stored(
    x: Tensor, ratio: float, value_dtype: torch.dtype | None = None, nonnegative: bool = False
) -> tuple[Tensor, Tensor, Layout]:
    """``(packed bitmap, kept values, layout)`` of ``x``, both in ``x``'s memory order.

    ``nonnegative`` promises that ``x`` has no negative entry (see :func:`kept_mask`).
    """
    rows, layout = storage_rows(x.detach())
    buffer = padded_bool(rows.numel(), x.device)
    values = kept_mask(rows, ratio, buffer[: rows.numel()].view(rows.shape), nonnegative)
    if value_dtype is not None:
        values = values.to(value_dtype)
    return pack_buffer(buffer), values, layout


def unsparsify_stored(
    packed: Tensor, values: Tensor, layout: Layout, dtype: torch.dtype | None = None
) -> Tensor:
    """Inverse of :func:`sparsify_stored` (zeros where pruned), with the original's strides.

    Inside a backward pass the result may be a reused buffer: give it back to
    :data:`scratch` once used.
    """
    numel = math.prod(layout.shape)
    mask = unpack_bytes(packed, numel).view(torch.bool)
    if dtype is not None:
        values = values.to(dtype)
    dense = dense_buffer(numel, values.dtype, values.device, zeroed=True)
    return dense.masked_scatter_(mask, values).as_strided(layout.shape, layout.stride)


@torch.no_grad()
def sparsify(
    x: Tensor, ratio: float, value_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(packed bitmap, kept values)`` of ``x`` in row-major order (see :func:`kept_indices`).

    The values are stored as ``value_dtype`` when given (None: ``x.dtype``).
    """
    packed, values, _ = sparsify_stored(x.contiguous(), ratio, value_dtype)
    return packed, values


def unsparsify(
    packed: Tensor,
    values: Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Scatter ``values`` (as ``dtype``, None: their own) into zeros of ``shape`` at the mask."""
    shape = tuple(shape)
    return unsparsify_stored(packed, values, Layout(shape, _contiguous_strides(shape)), dtype)
