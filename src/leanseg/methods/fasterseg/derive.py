"""Derive a discrete FasterSeg network (an ArchSpec) from architecture parameters (section 5).

A pure function of its inputs (the original mutates alpha in place and re-applies softmax to
beta on each of its three branch calls, quirk 2): every branch is derived from the same
parameters, and nothing passed in is changed.

Parameters, for ``L`` layers (16) and scales 1/8, 1/16, 1/32 (index ``j`` = 0, 1, 2):

- ``alphas[j]``: ``(L - j) x 5`` operator logits; row ``r`` is the cell of layer ``r + j``;
  columns in :data:`ALPHA_OPS` order (section 11);
- ``betas``: the 1/16 and 1/32 path logits, ``(L - 2) x 2`` and ``(L - 3) x 2``, columns
  ``[from down, from keep]``;
- ``ratios[j]``: width logits, ``(L - 1) x W``, ``(L - 1) x W``, ``(L - 2) x W``; row ``r`` is
  the output width of layer ``r + max(j - 1, 0)``; ``W = 1`` means full width only.

**Beta indexing.** In the supernet, row ``r`` of beta[1/16] mixes the inputs of the 1/16 cell
of layer ``r + 2`` (so weighs the down emitted by layer ``r + 1``) and row ``r`` of beta[1/32]
the 1/32 cell of layer ``r + 3`` (the down of layer ``r + 2``). The derivation of a 1/32 branch
agrees (downs at layers ``i + 1`` and ``j + 2``), but a 1/16 branch puts its down at layer
``r``, one layer earlier: section 5's "offset by one layer". The default keeps this, since the
shipped parameters then give the shipped networks (section 6); ``supernet_layers=True`` puts the
1/16 branch's down at ``r + 1`` instead, which a search in leanseg may prefer.

Run ``python -m leanseg.methods.fasterseg.derive REFERENCE.json OUT.json [--branches 32 16]``
to write the spec of a reference file (how ``models/fasterseg/archs/*.json`` were made).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leanseg.errors import ConfigError
from leanseg.models.fasterseg.spec import (
    ArchSpec,
    BranchSpec,
    CellSpec,
    HeadSpec,
    aux_scales,
)

ALPHA_OPS = ("skip", "conv", "zoomed_conv", "conv_x2", "zoomed_conv_x2")  # alpha column order
WIDTH_CHOICES = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 12 / 12)  # gamma column order (section 2.4)
FCH = 12  # base width: a map at scale s has up to s * FCH channels
STUDENT_WIDTH = 8 / 12  # stem and head width of the student; the teacher's is 1

Matrix = Sequence[Sequence[float]]


@dataclass(frozen=True)
class BranchPlan:
    """One derived branch before widths become channels: per kept cell its op, its input scale
    index and (but for the last) its output width multiplier."""

    ops: tuple[str, ...]
    path: tuple[int, ...]
    widths: tuple[float, ...]


def softmax(row: Sequence[float]) -> list[float]:
    """Softmax of one row (``-inf`` entries get 0)."""
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def argmax(row: Sequence[float]) -> int:
    """Index of the first maximum (as torch and numpy break ties)."""
    return max(range(len(row)), key=lambda i: (row[i], -i))


def num_filters(scale: int, width: float, fch: int = FCH) -> int:
    """``round(scale * fch * width)``: the channel count of a map at ``scale``."""
    return int(round(scale * fch * width))


def head_mid(width: int) -> int:
    """The 3x3 width of a head on ``width`` channels: itself up to 256, half above."""
    return width if width <= 256 else width // 2


def branch_path(
    betas: Sequence[Matrix], last: int, layers: int, *, supernet_layers: bool = False
) -> tuple[int, ...]:
    """Scale index of each of the ``layers`` cells' input for a branch ending at ``last``.

    - ``last = 0``: every cell at 1/8;
    - ``last = 1``: one down, at layer ``r`` (``r + 1`` with ``supernet_layers``) for the row
      ``r`` in ``1 .. L - 4`` maximising softmax(beta16)[r][down] (first on ties);
    - ``last = 2``: downs at layers ``i + 1`` and ``j + 2`` for the ``(i, j)``, ``j < L - 4``,
      ``1 <= i < j - 1``, maximising softmax(beta16)[i][down] * softmax(beta32)[j][down] (first
      in ``j``-then-``i`` order on ties).
    """
    downs = [0] * layers
    p16 = [softmax(row)[0] for row in betas[0]]
    p32 = [softmax(row)[0] for row in betas[1]]
    if last == 1:
        row = max(range(1, layers - 3), key=lambda r: (p16[r], -r))
        downs[row + int(supernet_layers)] = 1
    elif last == 2:
        best, pair = 0.0, (0, 1)
        for j in range(layers - 4):
            for i in range(1, j - 1):
                if p16[i] * p32[j] > best:
                    best, pair = p16[i] * p32[j], (i, j)
        downs[pair[0] + 1] = downs[pair[1] + 2] = 1
    path = [0]
    for down in downs[:-1]:
        path.append(path[-1] + down)
    return tuple(path)


def branch_plan(
    alphas: Sequence[Matrix],
    path: tuple[int, ...],
    widths: Sequence[float],
    *,
    allow_skip: bool = True,
) -> BranchPlan:
    """Ops by arg-max of alpha, then skip handling (section 5.4 as the original does it).

    1. A skip at a non-downsampling cell (or the last) is a removal candidate, scored by its
       softmax(alpha) skip probability.
    2. After the first downsample, a segment between downsamples (or to the end) made only of
       candidates has its weakest one (last on ties) switched to its next-best op. (The
       original does not check the segment before the first downsample, nor 1/8 branches.)
    3. At most ``L - min_len`` candidates are removed, the most confident first, with
       ``min_len = round(L / 3) + 2 * last``; a candidate switched in step 2 still takes part
       in this ranking but is kept. Every other skip is switched to its next-best op.
    """
    layers = len(path)
    rows = [list(alphas[path[i]][i - path[i]]) for i in range(layers)]
    if not allow_skip:
        for row in rows:
            row[0] = -math.inf
    ops = [argmax(row) for row in rows]
    skip_score = {
        i: softmax(rows[i])[0]
        for i in range(layers)
        if ops[i] == 0 and (i == layers - 1 or path[i] == path[i + 1])
    }
    switched = set()
    downs = [i for i in range(layers - 1) if path[i] < path[i + 1]]
    stops = [*downs[1:], layers] if downs else []  # a 1/8 branch has no segments
    for start, stop in zip(downs, stops, strict=True):
        segment = range(start + 1, stop)
        if len(segment) and all(i in skip_score for i in segment):
            switched.add(min(reversed(segment), key=lambda i: skip_score[i]))
    min_len = int(round(layers / 3)) + 2 * path[-1]
    ranked = sorted(skip_score, key=lambda i: skip_score[i], reverse=True)
    removed = set(ranked[: layers - min_len]) - switched
    kept_ops, kept_path, kept_widths = [], [], []
    for i in range(layers):
        if i in removed:
            if i == layers - 1:  # the new last cell's output is the head width
                kept_widths.pop()
            continue
        op = ops[i] if ops[i] != 0 else argmax([-math.inf, *rows[i][1:]])
        kept_ops.append(ALPHA_OPS[op])
        kept_path.append(path[i])
        if i < layers - 1:
            kept_widths.append(widths[i])
    return BranchPlan(tuple(kept_ops), tuple(kept_path), tuple(kept_widths))


def branch_widths(
    ratios: Sequence[Matrix], path: tuple[int, ...], choices: Sequence[float]
) -> list[float]:
    """Output width multiplier of each cell but the last: arg-max of gamma at its output scale."""
    widths = []
    for k in range(len(path) - 1):
        scale = path[k + 1]
        widths.append(choices[argmax(ratios[scale][k - max(scale - 1, 0)])])
    return widths


def plan_cells(
    plan: BranchPlan, stem_width: float, head_width: float, fch: int = FCH
) -> tuple[CellSpec, ...]:
    """Channels of a branch's cells: stem width in, widths between, head width out."""
    cells = []
    n = len(plan.ops)
    for k in range(n):
        scale = 8 << plan.path[k]
        stride = 2 if k < n - 1 and plan.path[k + 1] > plan.path[k] else 1
        c_in = (
            num_filters(8, stem_width, fch)
            if k == 0
            else num_filters(scale, plan.widths[k - 1], fch)
        )
        c_out = (
            num_filters(scale, head_width, fch)
            if k == n - 1
            else num_filters(scale * stride, plan.widths[k], fch)
        )
        cells.append(CellSpec(plan.ops[k], scale, stride, c_in, c_out))
    return tuple(cells)


def _shares(
    branch: tuple[CellSpec, ...], earlier: list[tuple[CellSpec, ...]]
) -> tuple[int, int] | None:
    """(earlier branch, cells) of the longest common prefix, excluding either's last cell."""
    best: tuple[int, int] | None = None
    for index, other in enumerate(earlier):
        count = 0
        limit = min(len(branch), len(other)) - 1
        while count < limit and branch[count] == other[count]:
            count += 1
        if count and (best is None or count > best[1]):
            best = (index, count)
    return best


def derive(
    alphas: Sequence[Matrix],
    betas: Sequence[Matrix],
    ratios: Sequence[Matrix],
    *,
    branches: Sequence[int] = (32, 16),
    stem_width: float = 1.0,
    head_width: float = 1.0,
    width_choices: Sequence[float] = WIDTH_CHOICES,
    allow_skip: bool = True,
    supernet_layers: bool = False,
    fch: int = FCH,
    meta: Mapping[str, Any] | None = None,
) -> ArchSpec:
    """The network with branches ending at ``branches`` (in fusion order) as an ArchSpec.

    ``stem_width`` / ``head_width``: multipliers of the stem output and of each branch's last
    cell (student 8/12, teacher 1). ``width_choices``: what gamma's columns mean (ignored when
    gamma has one column: full width). ``allow_skip=False`` for the teacher.
    ``supernet_layers``: see the module docstring (beta indexing). ``fch``: the base width.
    """
    _check_shapes(alphas, betas, ratios)
    layers = len(alphas[0])
    columns = len(ratios[0][0])
    choices = (1.0,) if columns == 1 else tuple(width_choices)
    if len(choices) != columns:
        raise ConfigError(f"width_choices: {len(choices)} given for {columns} gamma columns")
    if not branches or len(set(branches)) != len(branches) or set(branches) - {8, 16, 32}:
        raise ConfigError(f"branches: got {list(branches)}; distinct scales out of 8, 16, 32")
    cells: list[tuple[CellSpec, ...]] = []
    specs = []
    for scale in branches:
        last = {8: 0, 16: 1, 32: 2}[scale]
        path = branch_path(betas, last, layers, supernet_layers=supernet_layers)
        widths = branch_widths(ratios, path, choices)
        plan = branch_plan(alphas, path, widths, allow_skip=allow_skip)
        branch_cells = plan_cells(plan, stem_width, head_width, fch)
        specs.append(BranchSpec(scale, branch_cells, _shares(branch_cells, cells)))
        cells.append(branch_cells)
    stem = (2 * num_filters(2, stem_width, fch), 2 * num_filters(4, stem_width, fch))
    stem_spec = (*stem, num_filters(8, stem_width, fch))
    agg = {s: num_filters(s, head_width, fch) for s in (8, 16, 32) if s <= max(branches)}
    fusion = agg[8] * len(branches)
    draft = ArchSpec(stem_spec, tuple(specs), HeadSpec(agg, fusion, head_mid(fusion)))
    aux_in = draft.aux_in_widths()
    aux_mid = {s: head_mid(aux_in[s]) for s in sorted(aux_scales(tuple(branches)))}
    head = HeadSpec(agg, fusion, head_mid(fusion), aux_mid)
    return ArchSpec(stem_spec, tuple(specs), head, dict(meta or {}))


def _check_shapes(alphas: Sequence[Matrix], betas: Sequence[Matrix], ratios: Sequence[Matrix]):
    if len(alphas) != 3 or len(betas) != 2 or len(ratios) != 3:
        raise ConfigError("derive: expected 3 alphas, 2 betas (1/16, 1/32) and 3 ratios")
    layers = len(alphas[0])
    expected = {
        "alphas": ([layers, layers - 1, layers - 2], len(ALPHA_OPS)),
        "betas": ([layers - 2, layers - 3], 2),
        "ratios": ([layers - 1, layers - 1, layers - 2], len(ratios[0][0]) if ratios[0] else 0),
    }
    for name, values in (("alphas", alphas), ("betas", betas), ("ratios", ratios)):
        rows, cols = expected[name]
        for j, matrix in enumerate(values):
            if len(matrix) != rows[j] or any(len(row) != cols for row in matrix):
                raise ConfigError(f"{name}[{j}]: expected {rows[j]} rows of {cols} values")


# ------------------------------------------------------------------- the reference file format


@dataclass(frozen=True)
class ArchParams:
    """Architecture parameters as the original ships them (``alpha_K_S``, ``beta_K_S``,
    ``ratio_K_S``; K = 0 teacher, 1 student; S = scale index), with what the file records."""

    alphas: tuple[Matrix, Matrix, Matrix]
    betas: tuple[Matrix, Matrix]
    ratios: tuple[Matrix, Matrix, Matrix]
    role: str
    recorded: dict[str, float] = field(default_factory=dict)
    source: str = ""


def read_arch_params(path: str | Path) -> ArchParams:
    """Read ``shared/reference/fasterseg_arch_{teacher,student}.json`` (JSON only)."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"arch params {where!r}: cannot read: {error}") from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict):
        raise ConfigError(f"arch params {where!r}: tensors: missing or not an object")
    keys = sorted(tensors)
    index = {k.split("_")[1] for k in keys if k.startswith("alpha_")}
    if len(index) != 1:
        raise ConfigError(f"arch params {where!r}: tensors: expected alpha_K_S of one K")
    k = index.pop()

    def get(name: str) -> Matrix:
        if name not in tensors:
            raise ConfigError(f"arch params {where!r}: tensors.{name}: missing")
        return tensors[name]

    role = data.get("role") or ("teacher" if k == "0" else "student")
    return ArchParams(
        alphas=(get(f"alpha_{k}_0"), get(f"alpha_{k}_1"), get(f"alpha_{k}_2")),
        betas=(get(f"beta_{k}_1"), get(f"beta_{k}_2")),
        ratios=(get(f"ratio_{k}_0"), get(f"ratio_{k}_1"), get(f"ratio_{k}_2")),
        role=role,
        recorded=dict(data.get("recorded", {})),
        source=str(data.get("source", "")),
    )


def objective(miou: float, latency_ms: float, target_ms: float = 8.3, w: float = -0.07) -> float:
    """Branch-selection score ``mIoU * (latency / target) ** w`` (section 5.5)."""
    return miou * (latency_ms / target_ms) ** w


def select_branches(recorded: Mapping[str, float]) -> tuple[int, int]:
    """(32, 8) or (32, 16), whichever recorded ``mIoU02/latency02`` vs ``mIoU12/latency12`` pair
    scores higher (the 1/16 pair wins ties, as in the original)."""
    score8 = objective(recorded["mIoU02"], recorded["latency02"])
    score16 = objective(recorded["mIoU12"], recorded["latency12"])
    return (32, 8) if score8 > score16 else (32, 16)


def derive_reference(params: ArchParams, *, branches: Sequence[int] | None = None) -> ArchSpec:
    """Derive a shipped architecture as the original's training script does: the teacher at full
    width without skips, the student at 8/12 stem/head width; branches from the recorded
    figures unless given (both files record the student's, quirk 3)."""
    teacher = params.role == "teacher"
    width = 1.0 if teacher else STUDENT_WIDTH
    chosen = tuple(branches) if branches is not None else select_branches(params.recorded)
    meta = {"role": params.role, "derived_from": params.source, "branches": list(chosen)}
    return derive(
        params.alphas,
        params.betas,
        params.ratios,
        branches=chosen,
        stem_width=width,
        head_width=width,
        allow_skip=not teacher,
        meta=meta,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m leanseg.methods.fasterseg.derive REFERENCE.json OUT.json [--branches ...]``."""
    import argparse

    from leanseg.models.fasterseg.spec import save_spec

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("reference", help="arch parameters (shared/reference format)")
    parser.add_argument("out", help="spec JSON to write")
    parser.add_argument("--branches", type=int, nargs="+", help="default: by recorded figures")
    parser.add_argument("--name", default="", help="meta.name of the spec")
    args = parser.parse_args(argv)
    spec = derive_reference(read_arch_params(args.reference), branches=args.branches)
    if args.name:
        spec = replace(spec, meta={"name": args.name, **spec.meta})
    save_spec(spec, args.out)


if __name__ == "__main__":
    main()
