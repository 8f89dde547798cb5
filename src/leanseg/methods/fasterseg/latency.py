"""Latency of a derived network from a lookup table (LUT) of per-module timings (section 3.1).

The price of a spec is the sum of the LUT entries of its modules at the input size: the stem,
every cell (a shared cell once), the aggregation convs, the fusion conv and the main head, as
the original's ``forward_latency`` sums them (auxiliary heads and the final upsample are not
priced). A missing entry is an error, never measured on the fly (quirk 5).

``legacy=True`` reproduces the original's search-time pricing, which looks up a zoomed conv x2
under the conv x2 key (quirk 1, about 2x too expensive); the default prices each op by its own
key. The shipped table (``luts/original.json``) is the original's 667 entries with metadata: the
authors' GPU (a GTX 1080 Ti is inferred, unconfirmed) and TensorRT, fp32, batch 1, in ms. It
says nothing about the latency on any other machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanseg.errors import ConfigError
from leanseg.models.fasterseg.spec import ArchSpec

LUT_FORMAT = "leanseg.fasterseg.lut"
ORIGINAL_LUT = Path(__file__).parent / "luts" / "original.json"
OP_KEYS = {
    "skip": "FactorizedReduce",
    "conv": "BasicResidual1x",
    "zoomed_conv": "BasicResidual_downup_1x",
    "conv_x2": "BasicResidual2x",
    "zoomed_conv_x2": "BasicResidual_downup_2x",
}
LEGACY_OP_KEYS = {**OP_KEYS, "zoomed_conv_x2": "BasicResidual2x"}  # quirk 1


@dataclass(frozen=True)
class LatencyTable:
    """LUT entries (key -> ms) and what they were measured on."""

    entries: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __getitem__(self, key: str) -> float:
        if key not in self.entries:
            raise ConfigError(
                f"latency table {self.source!r}: no entry {key!r}; measure it on the table's "
                "device and backend (entries are never mixed across hardware)"
            )
        return self.entries[key]


def load_lut(path: str | Path = ORIGINAL_LUT) -> LatencyTable:
    """Read a LUT: leanseg's format or the reference copy (``{"entries": {...}}``)."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"latency table {where!r}: cannot read: {error}") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"latency table {where!r}: entries: missing or empty")
    for key, value in entries.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"latency table {where!r}: entries.{key}: got {value!r}; ms >= 0")
    meta = {k: v for k, v in data.items() if k != "entries"}
    return LatencyTable({k: float(v) for k, v in entries.items()}, meta, where)


@dataclass(frozen=True)
class Latency:
    """A priced network: ms per part and the LUT key of every priced module."""

    stem: float
    cells: float
    aggregation: float
    fusion: float
    head: float
    keys: tuple[str, ...]

    @property
    def total(self) -> float:
        """Sum of the parts, in ms."""
        return self.stem + self.cells + self.aggregation + self.fusion + self.head

    @property
    def fps(self) -> float:
        """``1000 / total``."""
        return 1000.0 / self.total


def op_key(name: str, h: int, w: int, c_in: int, c_out: int, stride: int) -> str:
    """Key of a cell operator (``name``: a value of :data:`OP_KEYS`) on an ``h x w`` input."""
    key = f"{name}_H{h}_W{w}_Cin{c_in}_Cout{c_out}_stride{stride}"
    return key if name == "FactorizedReduce" else f"{key}_dilation1"


def conv_key(h: int, w: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> str:
    """Key of a ``kernel x kernel`` conv-BN-ReLU on an ``h x w`` input."""
    return f"ConvNorm_H{h}_W{w}_Cin{c_in}_Cout{c_out}_kernel{kernel}_stride{stride}"


def fusion_key(size: tuple[int, int], channels: int) -> str:
    """Key of the 1x1 fusion conv over ``channels`` at 1/8 (``size``)."""
    return f"ff_H{size[0]}_W{size[1]}_C{channels}"


def head_key(size: tuple[int, int], c_in: int, num_classes: int) -> str:
    """Key of the classifier head on ``c_in`` channels at 1/8 (``size``)."""
    return f"head_H{size[0]}_W{size[1]}_Cin{c_in}_Cout{num_classes}"


def scale_sizes(size: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """Feature-map size at strides 1..32 for an input ``size`` (each stride-2 step: ceil)."""
    sizes = {1: (int(size[0]), int(size[1]))}
    for stride in (2, 4, 8, 16, 32):
        h, w = sizes[stride // 2]
        sizes[stride] = ((h + 1) // 2, (w + 1) // 2)
    return sizes


def stem_keys(widths: tuple[int, int, int], sizes: dict[int, tuple[int, int]]) -> list[str]:
    """Keys of the stem with output ``widths`` (3x3 s2 conv, two stride-2 ConvX2)."""
    s0, s1, s2 = widths
    return [
        conv_key(*sizes[1], 3, s0, 3, 2),
        op_key("BasicResidual2x", *sizes[2], s0, s1, 2),
        op_key("BasicResidual2x", *sizes[4], s1, s2, 2),
    ]


def spec_latency(
    spec: ArchSpec,
    table: LatencyTable,
    *,
    size: tuple[int, int] = (1024, 2048),
    num_classes: int = 19,
    legacy: bool = False,
) -> Latency:
    """Price ``spec`` at input ``size`` (H, W) from ``table``; see the module docstring."""
    sizes = scale_sizes(size)
    op_keys = LEGACY_OP_KEYS if legacy else OP_KEYS
    stem = stem_keys(spec.stem, sizes)
    cells = []
    for branch in spec.branches:
        shared = branch.shares[1] if branch.shares is not None else 0
        for cell in branch.cells[shared:]:
            name = op_keys[cell.op]
            cells.append(op_key(name, *sizes[cell.scale], cell.c_in, cell.c_out, cell.stride))
    agg = spec.head.agg
    aggregation = []
    for branch in spec.branches:
        features = branch.feature_widths(spec.stem[-1])
        for scale in (16, 8):
            if scale < branch.scale:
                aggregation.append(conv_key(*sizes[2 * scale], agg[2 * scale], agg[scale], 1))
                c_in = agg[scale] + features[scale]
                aggregation.append(conv_key(*sizes[scale], c_in, agg[scale], 3))
    fused = agg[8] * len(spec.branches)
    if spec.head.fusion != fused:
        raise ConfigError(
            f"latency: the LUT prices fusion {fused} -> {fused} only, not -> {spec.head.fusion}"
        )
    if spec.head.mid != (fused if fused <= 256 else fused // 2):
        raise ConfigError(
            f"latency: the LUT's heads have the original's 3x3 width, not {spec.head.mid}"
        )
    fusion = [fusion_key(sizes[8], fused)]
    head = [head_key(sizes[8], fused, num_classes)]
    parts = [stem, cells, aggregation, fusion, head]
    stem_ms, cells_ms, agg_ms, fusion_ms, head_ms = (sum(table[k] for k in p) for p in parts)
    keys = tuple(k for part in parts for k in part)
    return Latency(stem_ms, cells_ms, agg_ms, fusion_ms, head_ms, keys)
