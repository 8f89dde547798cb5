"""Differentiable latency of the search supernet from a lookup table (fasterseg.md §3, §11).

**Cell prices.** A MixedOp at given input/output widths costs ``sum_op softmax(alpha)[op] *
LUT[op | size, c_in, c_out, stride]``, times the one-hot width entries of its input and output
(1 in value, gradient to gamma). The stride-1 ``skip`` is priced as the supernet runs it, a
1x1 conv (the ``FactorizedReduce_..._stride1`` entries of the original's table).

**Path recursion.** The latency of a map is the latency of the path that produced it: a cell's
keep (down) output costs the beta-weighted latency of its inputs plus the keep (down) op's own
price, the stem's output costs the stem. The supernet's latency is the sum over the three rows
of their last keep output's latency (stem and cells; heads are not priced), so each row is the
price of stem + the cells of a network ending there. ``legacy=True`` reproduces the original's
accumulation instead (§11: beta at 1/16 never enters, the down path is charged the keep op too,
and zoomed conv x2 is priced under conv x2's key, quirk 1).

**Decoupled loss** (§3.2): ``w1 LAT(alpha | beta uniform, max width) + w2 LAT(beta | alpha
uniform, max width) + w3 LAT(gamma Gumbel | alpha, beta uniform)``, with ``w = (1, 497, 2) / 500``
(``(1, 499, 0) / 500`` with one width choice), so that each term sends gradient to one family.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.latency import (
    LEGACY_OP_KEYS,
    OP_KEYS,
    LatencyTable,
    conv_key,
    fusion_key,
    head_key,
    op_key,
    scale_sizes,
    stem_keys,
)
from leanseg.methods.fasterseg.slimmable import OPS
from leanseg.methods.fasterseg.supernet import SearchSpace, Supernet, beta_row, ratio_row

LATENCY_WEIGHTS = (1 / 500, 497 / 500, 2 / 500)
SINGLE_WIDTH_WEIGHTS = (1 / 500, 499 / 500, 0.0)


def cell_key(op: str, size: tuple[int, int], c_in: int, c_out: int, stride: int, legacy: bool):
    """The LUT key of a supernet op (the stride-1 skip is the 1x1 conv of the supernet)."""
    name = (LEGACY_OP_KEYS if legacy else OP_KEYS)[op]
    return op_key(name, *size, c_in, c_out, stride)


def cell_width_options(space: SearchSpace, layer: int, j: int) -> dict[str, tuple]:
    """Possible (input, keep output, down output) channel counts of cell ``(layer, j)``."""
    last = layer == space.layers - 1
    stems = {space.channels(0, a.stem_width) for a in space.archs}
    heads = {space.channels(j, a.head_width) for a in space.archs}
    return {
        "in": tuple(sorted(stems if layer == 0 else set(space.choices(j)))),
        "keep": tuple(sorted(heads if last else set(space.choices(j)))),
        "down": () if last or j == 2 else space.choices(j + 1),
    }


def supernet_keys(space: SearchSpace, size: tuple[int, int], legacy: bool = False) -> list[str]:
    """Every LUT key the supernet's latency can read: stems and all cell ops at all widths."""
    sizes = scale_sizes(size)
    keys: list[str] = []
    for arch in space.archs:
        keys += stem_keys(space.stem_widths(arch), sizes)
    for layer in range(space.layers):
        for j in range(min(layer, 2) + 1):
            options = cell_width_options(space, layer, j)
            for op in OPS:
                for c_in in options["in"]:
                    for c_out in options["keep"]:
                        keys.append(cell_key(op, sizes[8 << j], c_in, c_out, 1, legacy))
                    for c_out in options["down"]:
                        keys.append(cell_key(op, sizes[8 << j], c_in, c_out, 2, legacy))
    return list(dict.fromkeys(keys))


def head_keys(space: SearchSpace, size: tuple[int, int], num_classes: int) -> list[str]:
    """Every LUT key a derived network's aggregation, fusion and head can read (any branches,
    any widths), as :func:`~leanseg.methods.fasterseg.latency.spec_latency` prices them."""
    sizes = scale_sizes(size)
    keys: list[str] = []
    for arch in space.archs:
        agg = {8 << j: space.channels(j, arch.head_width) for j in range(3)}
        stem = space.channels(0, arch.stem_width)
        features = {8: {*space.choices(0), stem}, 16: set(space.choices(1))}
        keys.append(conv_key(*sizes[32], agg[32], agg[16], 1))
        keys.append(conv_key(*sizes[16], agg[16], agg[8], 1))
        for scale in (16, 8):
            for width in sorted(features[scale]):
                keys.append(conv_key(*sizes[scale], agg[scale] + width, agg[scale], 3))
        for count in (1, 2, 3):
            fused = agg[8] * count
            keys.append(fusion_key(sizes[8], fused))
            keys.append(head_key(sizes[8], fused, num_classes))
    return list(dict.fromkeys(keys))


def lut_keys(space: SearchSpace, size: tuple[int, int], num_classes: int) -> list[str]:
    """What ``leanseg search lut`` measures: the supernet's keys (fixed and legacy pricing)
    and every derived network's head keys."""
    keys = supernet_keys(space, size) + supernet_keys(space, size, legacy=True)
    return list(dict.fromkeys(keys + head_keys(space, size, num_classes)))


def check_table(table: LatencyTable, keys: Iterable[str]) -> None:
    """One-line ConfigError when ``table`` lacks any of ``keys`` (never measured on the fly)."""
    missing = [k for k in keys if k not in table.entries]
    if missing:
        raise ConfigError(
            f"latency table {table.source!r}: {len(missing)} entries missing, e.g. "
            f"{missing[0]!r}; measure a table for this search space and size with "
            "`leanseg search lut -c CONFIG`"
        )


@dataclass
class Terms:
    """The three decoupled latency terms (ms) and their weighted sum."""

    alpha: Tensor
    beta: Tensor
    gamma: Tensor
    weighted: Tensor


class SupernetLatency:
    """Prices a :class:`Supernet`'s architecture parameters from a LUT at input ``size``."""

    def __init__(
        self,
        supernet: Supernet,
        table: LatencyTable,
        size: tuple[int, int],
        *,
        legacy: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.supernet, self.table = supernet, table
        self.legacy_keys = self.legacy_recursion = legacy
        self.space = supernet.space
        self.sizes = scale_sizes(size)
        check_table(table, supernet_keys(self.space, size, legacy))
        single = len(self.space.width_choices) < 2
        self.weights = tuple(
            weights if weights is not None else SINGLE_WIDTH_WEIGHTS if single else LATENCY_WEIGHTS
        )

    def _price(self, j: int, c_in: int, c_out: int, stride: int) -> Tensor:
        """The five ops' LUT prices at one cell and widths."""
        size = self.sizes[8 << j]
        keys = [cell_key(op, size, c_in, c_out, stride, self.legacy_keys) for op in OPS]
        values = [self.table[key] for key in keys]
        return torch.tensor(values, dtype=torch.float64)

    def rows(
        self, arch: str, *, alpha: bool = True, beta: bool = True, widths: str = "max"
    ) -> list[Tensor]:
        """Latency (ms) of each row's last keep output, stem included.

        ``alpha`` / ``beta``: softmax of the parameters, or uniform when False; ``widths``: a
        width mode of :meth:`Supernet.widths` (``sample``: Gumbel, gradient to gamma).
        """
        net, space = self.supernet, self.space
        k = space.arch_index(arch)
        setting = space.archs[k]
        alphas, betas = net.softmaxed(arch)
        alphas = [a.double() for a in alphas]  # float64: sums of many small prices
        betas = {j: b.double() for j, b in betas.items()}
        if not alpha:
            alphas = [torch.full_like(a, 1 / len(OPS)) for a in alphas]
        if not beta:
            betas = {j: torch.full_like(b, 0.5) for j, b in betas.items()}
        sampled = net.widths(arch, widths)
        last = space.layers - 1

        def width(j: int, layer: int) -> tuple[int, Tensor | float]:
            if layer == -1:
                return space.channels(0, setting.stem_width), 1.0
            if layer == last:
                return space.channels(j, setting.head_width), 1.0
            return sampled[j][ratio_row(j, layer)]

        stem = sum(self.table[key] for key in stem_keys(space.stem_widths(setting), self.sizes))
        if self.legacy_recursion:
            return self._legacy_rows(alphas, betas, width, stem)
        keep_prev: dict[int, Tensor | float] = {0: stem}
        down_prev: dict[int, Tensor | float] = {}
        for layer in range(space.layers):
            keep, down = {}, {}
            for j in range(min(layer, 2) + 1):
                c_in, s_in = width(j if layer else 0, layer - 1)
                a = alphas[j][layer - j]
                if j == 0:
                    base = keep_prev[0]
                elif layer == j:
                    base = down_prev[j - 1]
                else:
                    b = betas[j][beta_row(j, layer)]
                    base = b[0] * down_prev[j - 1] + b[1] * keep_prev[j]
                c_keep, s_keep = width(j, layer)
                keep[j] = base + (a * self._price(j, c_in, c_keep, 1)).sum() * s_in * s_keep
                if layer < last and j < 2:
                    c_down, s_down = width(j + 1, layer)
                    price = (a * self._price(j, c_in, c_down, 2)).sum()
                    down[j] = base + price * s_in * s_down
            keep_prev, down_prev = keep, down
        return [torch.as_tensor(keep_prev[j]) for j in range(3)]

    def _legacy_rows(self, alphas, betas, width, stem) -> list[Tensor]:
        """The original's ``forward_latency`` accumulation, bugs included (§11)."""
        space = self.space
        totals: list[list] = [[stem, 0.0], [0.0, 0.0], [0.0, 0.0]]  # per scale: (keep, down)
        last = space.layers - 1
        for layer in range(space.layers):
            prices = []
            for j in range(min(layer, 2) + 1):
                c_in, s_in = width(j if layer else 0, layer - 1)
                a = alphas[j][layer - j]
                c_keep, s_keep = width(j, layer)
                keep = (a * self._price(j, c_in, c_keep, 1)).sum() * s_in * s_keep
                down = None
                if layer < last and j < 2:
                    c_down, s_down = width(j + 1, layer)
                    down = (a * self._price(j, c_in, c_down, 2)).sum() * s_in * s_down
                prices.append((keep, down))
            stale = min(layer, 2)  # the loop index the original reuses
            for j, (keep, down) in enumerate(prices):
                if j == 0:
                    totals[0][0] = totals[0][0] + keep
                    if down is not None:
                        totals[0][1] = totals[0][0] + down
                elif layer == j:
                    totals[j][0] = totals[j - 1][1] + keep
                    if down is not None:
                        totals[j][1] = totals[j - 1][1] + down
                else:
                    b = betas[stale][layer - stale - 1]
                    totals[j][0] = b[1] * totals[j][0] + b[0] * totals[j - 1][1] + keep
                    if down is not None:
                        totals[j][1] = b[1] * totals[j][0] + b[0] * totals[j - 1][1] + down
        return [torch.as_tensor(totals[j][0]) for j in range(3)]

    def total(self, arch: str, **kwargs) -> Tensor:
        """Sum of the three rows (ms); keyword arguments as :meth:`rows`."""
        return sum(self.rows(arch, **kwargs))

    def decoupled(self, arch: str) -> Terms:
        """The three terms of §3.2 and their weighted sum (the latency loss before lambda)."""
        w1, w2, w3 = self.weights
        alpha = self.total(arch, alpha=True, beta=False, widths="max")
        beta = self.total(arch, alpha=False, beta=True, widths="max")
        gamma = (
            self.total(arch, alpha=False, beta=False, widths="sample") if w3 else torch.zeros(())
        )
        return Terms(alpha, beta, gamma, w1 * alpha + w2 * beta + w3 * gamma)


def adapt_lambda(lam: float, fps: Sequence[float], low: float, high: float) -> float:
    """§3.2: halve lambda when any derived student reaches ``high`` FPS, else double it when
    any is at or below ``low``; otherwise keep it."""
    if any(f >= high for f in fps):
        return lam / 2
    if any(f <= low for f in fps):
        return lam * 2
    return lam
