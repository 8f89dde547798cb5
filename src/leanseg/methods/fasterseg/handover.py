"""From a search's architecture parameters to the spec files part 1 builds (fasterseg.md §5).

Per architecture, both candidate networks are derived: branches (32, 8) and (32, 16). The
student keeps the pair that scores higher on ``mIoU * (latency / target) ** -0.07`` (the
supernet's validation mIoU of the matching fused prediction, 8+32 or 16+32, and the LUT latency
of the derived network); the teacher, which is never priced, keeps the pair with the higher
mIoU. leanseg's search puts the 1/16 branch's downsample where the supernet's beta chose it
(``supernet_layers=True`` in :func:`~.derive.derive`), so that a derived network is the path
the supernet priced; the shipped reference files are derived as the original did (§6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from leanseg.methods.fasterseg.derive import derive, objective
from leanseg.methods.fasterseg.latency import LatencyTable, spec_latency
from leanseg.methods.fasterseg.supernet import SearchSpace
from leanseg.models.fasterseg.spec import ArchSpec

PAIRS = {"02": (32, 8), "12": (32, 16)}  # the fused predictions' names -> branches
PREDICTION_INDEX = {"02": 3, "12": 4}  # their index among the supernet's five outputs


@dataclass(frozen=True)
class Candidate:
    """One derived network of an architecture and what it was chosen on."""

    pair: str
    spec: ArchSpec
    miou: float
    latency_ms: float | None


def derive_branches(
    space: SearchSpace, arch: str, tensors: Mapping[str, Sequence], branches: tuple[int, ...]
) -> ArchSpec:
    """The network of ``arch`` (its ``alpha_K_S`` ... tensors) with the given branches."""
    k = space.arch_index(arch)
    setting = space.archs[k]
    return derive(
        [tensors[f"alpha_{k}_{j}"] for j in range(3)],
        [tensors[f"beta_{k}_1"], tensors[f"beta_{k}_2"]],
        [tensors[f"ratio_{k}_{j}"] for j in range(3)],
        branches=branches,
        stem_width=setting.stem_width,
        head_width=setting.head_width,
        width_choices=space.width_choices,
        allow_skip=setting.allow_skip,
        supernet_layers=True,
        fch=space.fch,
        meta={"role": arch, "branches": list(branches)},
    )


def candidates(
    space: SearchSpace,
    arch: str,
    tensors: Mapping[str, Sequence],
    mious: Mapping[str, float],
    *,
    table: LatencyTable | None,
    size: tuple[int, int],
    num_classes: int,
) -> list[Candidate]:
    """Both candidate networks with their mIoU (``mious["02"]`` / ``["12"]``) and, given a
    table, their LUT latency at ``size``."""
    result = []
    for pair, branches in PAIRS.items():
        spec = derive_branches(space, arch, tensors, branches)
        latency = None
        if table is not None:
            latency = spec_latency(spec, table, size=size, num_classes=num_classes).total
        result.append(Candidate(pair, spec, float(mious[pair]), latency))
    return result


def choose(found: Sequence[Candidate], *, priced: bool, target_ms: float) -> Candidate:
    """The student's (``priced``) pick by the latency-aware objective, else by mIoU; the
    1/16 pair wins ties, as in the original."""

    def score(c: Candidate) -> float:
        if priced and c.latency_ms is not None:
            return objective(c.miou, c.latency_ms, target_ms)
        return c.miou

    by_pair = {c.pair: c for c in found}
    return by_pair["02"] if score(by_pair["02"]) > score(by_pair["12"]) else by_pair["12"]
