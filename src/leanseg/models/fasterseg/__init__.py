"""FasterSeg networks (shared/methods/fasterseg.md, docs/fasterseg.md) and their builders.

- ``fasterseg_student`` / ``fasterseg_teacher``: the networks derived from the original's shipped
  architecture parameters (section 6), kept as spec files in ``archs/``;
- ``fasterseg``: any spec; ``arch`` is ``"student"``, ``"teacher"``, a spec JSON file path or the
  spec as a dict (what a checkpoint records, so that it rebuilds without the file).

Options: ``aux`` builds the auxiliary 1/16 and 1/32 heads (training outputs ``"aux16"`` and
``"aux32"``); ``width_mult`` scales every width (for tests and small experiments).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from leanseg.errors import ConfigError
from leanseg.models.fasterseg.network import FasterSeg
from leanseg.models.fasterseg.spec import ArchSpec, load_spec, save_spec, spec_from_dict
from leanseg.models.registry import register_builder

ARCHS_DIR = Path(__file__).parent / "archs"
PACKAGED = ("student", "teacher")


def packaged_spec(name: str) -> ArchSpec:
    """The shipped spec ``"student"`` or ``"teacher"``."""
    if name not in PACKAGED:
        raise ConfigError(f"arch: unknown packaged architecture {name!r}; choose one of {PACKAGED}")
    return load_spec(ARCHS_DIR / f"{name}.json")


def resolve_arch(arch: str | Path | Mapping[str, Any]) -> ArchSpec:
    """A packaged name, the path of a spec file, or a spec itself (a checkpoint's record)."""
    if isinstance(arch, Mapping):
        return spec_from_dict(arch, source="arch")
    if isinstance(arch, str) and arch in PACKAGED:
        return packaged_spec(arch)
    if not isinstance(arch, (str, Path)) or not str(arch).endswith(".json"):
        raise ConfigError(
            f"arch: got {arch!r}; give one of {list(PACKAGED)} or the path of a spec .json file"
        )
    return load_spec(arch)


def _build(*, num_classes: int, arch: str, aux: bool, width_mult: float) -> FasterSeg:
    if not isinstance(aux, bool):
        raise ConfigError(f"aux: got {aux!r}; must be true or false")
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ConfigError(f"width_mult: got {width_mult!r}; must be a number > 0")
    return FasterSeg(resolve_arch(arch).scaled(float(width_mult)), num_classes, aux=aux)


_OPTIONS = {"aux": False, "width_mult": 1.0}
for _name in PACKAGED:
    register_builder(
        f"fasterseg_{_name}",
        partial(_build, arch=_name),
        _OPTIONS,
        f"FasterSeg {_name} derived from the original's shipped architecture (fasterseg.md §6).",
    )
register_builder(
    "fasterseg",
    _build,
    {"arch": "student", **_OPTIONS},
    "FasterSeg from a spec: arch = 'student', 'teacher' or the path of a spec JSON file.",
)

__all__ = [
    "ArchSpec",
    "FasterSeg",
    "load_spec",
    "packaged_spec",
    "resolve_arch",
    "save_spec",
    "spec_from_dict",
]
