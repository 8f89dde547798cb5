"""A derived FasterSeg network as plain, versioned JSON data (format ``leanseg.fasterseg.arch``).

Version 1 (every width is a channel count; scales are output strides 8, 16, 32)::

    {
      "format": "leanseg.fasterseg.arch",
      "version": 1,
      "meta": {"name": "...", "source": "..."},          # optional, free-form JSON object
      "stem": [32, 64, 64],                                # 3x3 s2 conv, ConvX2 s2, ConvX2 s2
      "branches": [                                        # in fusion (concatenation) order
        {"scale": 32,                                      # where the branch ends
         "cells": [{"op": "conv_x2", "scale": 8, "stride": 1, "in": 64, "out": 32}, ...]},
        {"scale": 16, "shares": {"branch": 0, "cells": 3}, "cells": [...]}
      ],
      "head": {"agg": {"8": 64, "16": 128, "32": 256},    # aggregation width per scale
               "fusion": 128,                              # 1x1 fusion conv output
               "mid": 128,                                 # 3x3 width of the main head
               "aux_mid": {"16": 192, "32": 256}}          # 3x3 width of each auxiliary head
    }

Cells: ``op`` is one of :data:`OPS`; ``scale`` is the cell's input scale and ``stride`` 2 halves
the resolution (``out`` then lives at ``2 * scale``). Each branch lists all its cells from the
stem on; ``shares`` says that its first ``cells`` cells are the same modules as those of an
earlier branch (they must be equal there). Every branch starts at 1/8 with ``in == stem[-1]``,
chains ``in``/``out`` and scales, and ends at its ``scale`` with ``out == head.agg[scale]``.

Aggregation (section 6 of shared/methods/fasterseg.md), per branch: 1/32: 1x1 ``agg32 -> agg16``,
up, concat the branch's last 1/16 feature, 3x3 to ``agg16``, 1x1 to ``agg8``, up, concat its last
1/8 feature, 3x3 to ``agg8``; 1/16: 1x1 to ``agg8``, up, concat its last 1/8 feature, 3x3 to
``agg8``; 1/8: as is. ``head.aux_mid`` has the key ``"32"`` when a branch ends at 1/32 and
``"16"`` when one ends at 1/16 or 1/32 (:meth:`ArchSpec.aux_in_widths`).
The number of classes is not part of the spec: it is the builder's ``num_classes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leanseg.errors import ConfigError

FORMAT = "leanseg.fasterseg.arch"
VERSION = 1
OPS = ("skip", "conv", "zoomed_conv", "conv_x2", "zoomed_conv_x2")
SCALES = (8, 16, 32)


@dataclass(frozen=True)
class CellSpec:
    """One cell: operator ``op`` at input ``scale`` with ``stride``, ``c_in -> c_out`` channels."""

    op: str
    scale: int
    stride: int
    c_in: int
    c_out: int

    @property
    def out_scale(self) -> int:
        """Scale of the cell's output."""
        return self.scale * self.stride


@dataclass(frozen=True)
class BranchSpec:
    """The cells from the stem to output ``scale``; the first ``shares[1]`` are branch
    ``shares[0]``'s."""

    scale: int
    cells: tuple[CellSpec, ...]
    shares: tuple[int, int] | None = None

    def feature_widths(self, stem_width: int) -> dict[int, int]:
        """Width of the branch's last feature map at each scale it visits (1/8: maybe the stem)."""
        widths = {8: stem_width}
        for cell in self.cells:
            widths[cell.out_scale] = cell.c_out
        return widths


@dataclass(frozen=True)
class HeadSpec:
    """Aggregation widths per scale, fusion width and the 3x3 widths of the heads."""

    agg: dict[int, int]
    fusion: int
    mid: int
    aux_mid: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ArchSpec:
    """A complete derived network (everything but the number of classes)."""

    stem: tuple[int, int, int]
    branches: tuple[BranchSpec, ...]
    head: HeadSpec
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def scales(self) -> tuple[int, ...]:
        """Branch output scales, in fusion order."""
        return tuple(branch.scale for branch in self.branches)

    def aux_in_widths(self) -> dict[int, int]:
        """Input widths of the auxiliary heads (training only), by scale.

        1/32: the 1/32 branch's output. 1/16: the concatenation, in branch order, of the 1/32
        branch's last 1/16 feature and the 1/16 branch's output (whichever exist).
        """
        widths: dict[int, int] = {}
        for branch in self.branches:
            if branch.scale == 32:
                widths[32] = branch.cells[-1].c_out
                widths[16] = widths.get(16, 0) + branch.feature_widths(self.stem[-1])[16]
            elif branch.scale == 16:
                widths[16] = widths.get(16, 0) + branch.cells[-1].c_out
        return widths

    def scaled(self, width_mult: float) -> ArchSpec:
        """Every width times ``width_mult``, rounded to an even count >= 2 (1.0: unchanged)."""
        if width_mult == 1.0:
            return self

        def f(width: int) -> int:
            return max(2, 2 * round(width * width_mult / 2))

        branches = tuple(
            replace(b, cells=tuple(replace(c, c_in=f(c.c_in), c_out=f(c.c_out)) for c in b.cells))
            for b in self.branches
        )
        head = HeadSpec(
            agg={s: f(w) for s, w in self.head.agg.items()},
            fusion=f(self.head.fusion),
            mid=f(self.head.mid),
            aux_mid={s: f(w) for s, w in self.head.aux_mid.items()},
        )
        stem = (f(self.stem[0]), f(self.stem[1]), f(self.stem[2]))
        return replace(self, stem=stem, branches=branches, head=head)


def agg_scales(scales: tuple[int, ...]) -> set[int]:
    """Scales whose aggregation width the branches ending at ``scales`` use."""
    return {8} | {s for s in SCALES if any(s <= b for b in scales)}


def aux_scales(scales: tuple[int, ...]) -> set[int]:
    """Scales of the auxiliary heads for branches ending at ``scales``."""
    return ({32} if 32 in scales else set()) | ({16} if {16, 32} & set(scales) else set())


# ------------------------------------------------------------------------------- to / from JSON


def spec_to_dict(spec: ArchSpec) -> dict[str, Any]:
    """The JSON object of ``spec`` (the inverse of :func:`spec_from_dict`)."""
    branches = []
    for branch in spec.branches:
        entry: dict[str, Any] = {"scale": branch.scale}
        if branch.shares is not None:
            entry["shares"] = {"branch": branch.shares[0], "cells": branch.shares[1]}
        entry["cells"] = [
            {"op": c.op, "scale": c.scale, "stride": c.stride, "in": c.c_in, "out": c.c_out}
            for c in branch.cells
        ]
        branches.append(entry)
    head = spec.head
    return {
        "format": FORMAT,
        "version": VERSION,
        "meta": dict(spec.meta),
        "stem": list(spec.stem),
        "branches": branches,
        "head": {
            "agg": {str(s): w for s, w in sorted(head.agg.items())},
            "fusion": head.fusion,
            "mid": head.mid,
            "aux_mid": {str(s): w for s, w in sorted(head.aux_mid.items())},
        },
    }


def save_spec(spec: ArchSpec, path: str | Path) -> None:
    """Write ``spec`` as indented JSON with one line per cell."""
    Path(path).write_text(dumps_spec(spec) + "\n", encoding="utf-8")


def dumps_spec(spec: ArchSpec) -> str:
    """The JSON text :func:`save_spec` writes: indented, objects/lists of scalars on one line."""
    return _dumps(spec_to_dict(spec), "")


def _dumps(value: Any, indent: str) -> str:
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(value, (dict, list)) or not any(isinstance(v, (dict, list)) for v in items):
        return json.dumps(value)
    inner = indent + "  "
    if isinstance(value, dict):
        lines = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"
    lines = [f"{inner}{_dumps(v, inner)}" for v in value]
    return "[\n" + ",\n".join(lines) + f"\n{indent}]"


def load_spec(path: str | Path) -> ArchSpec:
    """Read and validate a spec file; every problem is a one-line ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"spec {source!r}: cannot read: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"spec {source!r}: not valid JSON: {error}") from None
    return spec_from_dict(data, source=source)


def spec_from_dict(data: Any, *, source: str = "<dict>") -> ArchSpec:
    """Validate a spec's JSON object and return it as an :class:`ArchSpec`."""
    return _Parser(source).spec(data)


class _Parser:
    """Validation with errors of the form ``spec 'x.json': branches[1].cells[3].op: ...``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"spec {self.source!r}: {where}: {problem}")

    def obj(self, value: Any, where: str, required: tuple, optional: tuple = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, got {_kind(value)}")
        for key in value:
            if key not in required + optional:
                raise self.fail(
                    _join(where, key), f"unknown field; expected {list(required + optional)}"
                )
        for key in required:
            if key not in value:
                raise self.fail(_join(where, key), "missing field")
        return value

    def width(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(where, f"got {value!r}; must be a positive int")
        return value

    def choice(self, value: Any, where: str, choices: tuple) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise self.fail(where, f"{value!r} is not one of {list(choices)}")
        return value

    def width_map(self, value: Any, where: str, scales: set[int]) -> dict[int, int]:
        keys = tuple(str(s) for s in sorted(scales))
        value = self.obj(value, where, keys)
        return {int(k): self.width(v, _join(where, k)) for k, v in value.items()}

    def spec(self, data: Any) -> ArchSpec:
        keys = ("format", "version", "stem", "branches", "head")
        data = self.obj(data, "top level", keys, ("meta",))
        if data["format"] != FORMAT:
            raise self.fail("format", f"got {data['format']!r}; expected {FORMAT!r}")
        version = data["version"]
        if isinstance(version, bool) or version != VERSION:
            raise self.fail("version", f"{version!r} is not supported; expected {VERSION}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise self.fail("meta", f"expected a JSON object, got {_kind(meta)}")
        stem = data["stem"]
        if not isinstance(stem, list) or len(stem) != 3:
            raise self.fail("stem", f"got {stem!r}; expected a list of 3 widths")
        stem_widths = tuple(self.width(w, f"stem[{i}]") for i, w in enumerate(stem))
        raw_branches = data["branches"]
        if not isinstance(raw_branches, list) or not 1 <= len(raw_branches) <= len(SCALES):
            raise self.fail("branches", "expected a list of 1 to 3 branches")
        scales = tuple(self.branch_scale(raw_branches, i) for i in range(len(raw_branches)))
        head = self.head(data["head"], scales)
        branches: list[BranchSpec] = []
        for i, raw in enumerate(raw_branches):
            branches.append(self.branch(raw, f"branches[{i}]", stem_widths[-1], head, branches))
        return ArchSpec(stem_widths, tuple(branches), head, dict(meta))  # type: ignore[arg-type]

    def branch_scale(self, raw_branches: list, index: int) -> int:
        where = f"branches[{index}]"
        raw = self.obj(raw_branches[index], where, ("scale", "cells"), ("shares",))
        scale = self.choice(raw["scale"], f"{where}.scale", SCALES)
        for other in range(index):
            if raw_branches[other]["scale"] == scale:
                raise self.fail(f"{where}.scale", f"{scale} is already branches[{other}]'s")
        return scale

    def head(self, raw: Any, scales: tuple[int, ...]) -> HeadSpec:
        raw = self.obj(raw, "head", ("agg", "fusion", "mid", "aux_mid"))
        return HeadSpec(
            agg=self.width_map(raw["agg"], "head.agg", agg_scales(scales)),
            fusion=self.width(raw["fusion"], "head.fusion"),
            mid=self.width(raw["mid"], "head.mid"),
            aux_mid=self.width_map(raw["aux_mid"], "head.aux_mid", aux_scales(scales)),
        )

    def branch(
        self, raw: dict, where: str, stem_width: int, head: HeadSpec, earlier: list[BranchSpec]
    ) -> BranchSpec:
        cells_raw = raw["cells"]
        if not isinstance(cells_raw, list) or not cells_raw:
            raise self.fail(f"{where}.cells", "expected a non-empty list of cells")
        cells: list[CellSpec] = []
        scale, width = 8, stem_width
        for i, cell_raw in enumerate(cells_raw):
            cell = self.cell(cell_raw, f"{where}.cells[{i}]", scale, width)
            cells.append(cell)
            scale, width = cell.out_scale, cell.c_out
        if scale != raw["scale"]:
            raise self.fail(f"{where}.cells", f"end at 1/{scale}, not at 1/{raw['scale']}")
        if width != head.agg[scale]:
            last = f"{where}.cells[{len(cells) - 1}].out"
            raise self.fail(last, f"got {width}; must equal head.agg.{scale} = {head.agg[scale]}")
        shares = None
        if "shares" in raw:
            shares = self.shares(raw["shares"], f"{where}.shares", cells, earlier)
        return BranchSpec(raw["scale"], tuple(cells), shares)

    def cell(self, raw: Any, where: str, scale: int, width: int) -> CellSpec:
        raw = self.obj(raw, where, ("op", "scale", "stride", "in", "out"))
        op = self.choice(raw["op"], f"{where}.op", OPS)
        cell_scale = self.choice(raw["scale"], f"{where}.scale", SCALES)
        stride = self.choice(raw["stride"], f"{where}.stride", (1, 2))
        c_in = self.width(raw["in"], f"{where}.in")
        c_out = self.width(raw["out"], f"{where}.out")
        if cell_scale != scale:
            raise self.fail(
                f"{where}.scale", f"got {cell_scale}; the previous output is at {scale}"
            )
        if c_in != width:
            raise self.fail(f"{where}.in", f"got {c_in}; the previous output has {width} channels")
        if stride == 2 and scale == 32:
            raise self.fail(f"{where}.stride", "2 at scale 32; there is no 1/64")
        if op == "skip" and stride == 1 and c_in != c_out:
            raise self.fail(f"{where}.out", f"got {c_out}; a stride-1 skip keeps in = {c_in}")
        if op == "skip" and stride == 2 and c_out % 2:
            raise self.fail(f"{where}.out", f"got {c_out}; a stride-2 skip needs an even width")
        return CellSpec(op, cell_scale, stride, c_in, c_out)

    def shares(
        self, raw: Any, where: str, cells: list[CellSpec], earlier: list[BranchSpec]
    ) -> tuple[int, int]:
        raw = self.obj(raw, where, ("branch", "cells"))
        index = raw["branch"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(earlier):
            raise self.fail(f"{where}.branch", f"got {index!r}; must index an earlier branch")
        other = earlier[index].cells
        count = self.width(raw["cells"], f"{where}.cells")
        if count > min(len(cells), len(other)):
            raise self.fail(f"{where}.cells", f"got {count}; more than either branch has")
        for i in range(count):
            if cells[i] != other[i]:
                branch = where.rsplit(".", 1)[0]
                raise self.fail(
                    f"{branch}.cells[{i}]", f"differs from branches[{index}].cells[{i}] it shares"
                )
        return index, count


def _join(where: str, key: str) -> str:
    return key if where == "top level" else f"{where}.{key}"


def _kind(value: Any) -> str:
    names: Mapping[type, str] = {list: "a list", str: "a string", dict: "an object"}
    return names.get(type(value), type(value).__name__)
