"""The recipes shipped inside the package, found by name, and ``_base_`` inheritance.

``-c pspnet50_cityscapes_713`` names ``leanseg/configs/pspnet50_cityscapes_713.yaml``;
``-c my.yaml`` reads a file. A YAML may start from other recipes (mmsegmentation style)::

    _base_: pspnet50_cityscapes_713       # or a list; a path is relative to this file
    train:
      iterations: 1000

Bases merge in order, then the file itself: mappings key by key, anything else replaced. A file
that names another ``model.name`` than its bases starts from no ``model.options``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from leanseg.errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "configs"
BASE_KEY = "_base_"


@dataclass(frozen=True)
class Recipe:
    """A packaged recipe: its name, file, first comment line and published target."""

    name: str
    path: Path
    title: str
    published: str  # the figure after "Published:" in its header comment, or ""


def list_recipes() -> list[Recipe]:
    """The packaged recipes, sorted by name."""
    return [_recipe(path) for path in sorted(RECIPE_DIR.glob("*.yaml"))]


def _recipe(path: Path) -> Recipe:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    published = next((h.split(":", 1)[1] for h in header if h.startswith("Published:")), "")
    published = re.split(r" \(|;|\. ", published.strip(), maxsplit=1)[0].rstrip(".")
    return Recipe(path.stem, path, header[0] if header else "", published)


def find_recipe(value: str | Path, relative_to: Path | None = None) -> Path:
    """The file ``value`` names: an existing path (relative to ``relative_to`` first), else a
    packaged recipe's name (with or without ``.yaml``)."""
    candidates = [Path(value)]
    if relative_to is not None and not Path(value).is_absolute():
        candidates.insert(0, relative_to / value)
    for path in candidates:
        if path.is_file():
            return path
    name = Path(value).name.removesuffix(".yaml")
    bare = str(value) in (name, f"{name}.yaml")  # a name, not a path into a directory
    if bare and (RECIPE_DIR / f"{name}.yaml").is_file():
        return RECIPE_DIR / f"{name}.yaml"
    close = difflib.get_close_matches(name, [r.name for r in list_recipes()], n=1)
    hint = f" (did you mean {close[0]!r}?)" if bare and close else ""
    raise ConfigError(
        f"config file '{value}' not found{hint}: give an existing YAML file, or a recipe name "
        "from `leanseg configs`"
    )


def read_recipe(path: Path) -> dict[str, Any]:
    """The mapping of a YAML file with its ``_base_`` chain merged in (bases first)."""
    return _compose(path, chain=())


def _compose(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError(f"config file '{path}': _base_ forms a cycle ({cycle}); remove one link")
    data = _read_mapping(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"config file '{path}': _base_ must be a recipe name or path, or a list of them"
        )
    merged: dict[str, Any] = {}
    for base in bases:
        try:
            base_path = find_recipe(base, relative_to=path.parent)
        except ConfigError as err:
            raise ConfigError(f"config file '{path}': _base_ {err}") from None
        merged = merge(merged, _compose(base_path, (*chain, resolved)))
    return merge(merged, data)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, other values are replaced; a ``top``
    that names another ``model.name`` drops the base's ``model.options``."""
    base_model, top_model = base.get("model"), top.get("model")
    if isinstance(base_model, dict) and isinstance(top_model, dict):
        if "name" in top_model and top_model["name"] != base_model.get("name"):
            base = {**base, "model": {k: v for k, v in base_model.items() if k != "options"}}
    return _deep_merge(base, top)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"config file '{path}'{line} is not valid YAML (or uses a tag that safe loading "
            "refuses): fix it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (data:, model:, ...)"
        )
    return data
