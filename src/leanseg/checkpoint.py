"""Checkpoints: plain tensors and data, written atomically, read with ``weights_only=True``.

The file format sits below the models' users: methods (``leanseg shrink``) and the engine both
read and write it here. Rebuilding a checkpoint's model is :func:`model_from_checkpoint`: the
model is built by name, then every method that changes a model's layers (ACoSP masks, a shrunk
network) restores them through the hook it registered with :func:`register_rebuild`, then the
weights load strictly.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.errors import CheckpointError
from leanseg.models import build_model
from leanseg.models import model_options as accepted_options

FORMAT = "leanseg-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model", "num_classes", "state_dict")

Rebuild = Callable[[nn.Module, dict[str, Any]], None]
_REBUILDS: dict[str, Rebuild] = {}
# The packages whose import registers rebuild hooks. They sit above this module, so they are
# named, not imported, here: model_from_checkpoint imports them by name on first use, so that
# ``leanseg.checkpoint`` alone rebuilds an ACoSP or shrunk checkpoint (``import leanseg`` no
# longer imports them: it must not import torch).
REBUILD_PROVIDERS = ("leanseg.methods",)


def register_rebuild(method: str, rebuild: Rebuild) -> None:
    """Have :func:`model_from_checkpoint` call ``rebuild(model, payload)`` on every model it
    builds, before the weights load: the hook of ``method`` changes the freshly built model
    into the one the checkpoint's weights were saved from (and leaves other models alone).
    Registering a method again replaces its hook."""
    _REBUILDS[method] = rebuild


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename.

    A failed write (no space, no permission) leaves the previous file at ``path`` untouched,
    removes the temporary file and raises one-line :class:`CheckpointError`.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint '{path}' ({cause.strerror or cause}): free space or fix "
            f"permissions in '{path.parent}', or set train.work_dir elsewhere; {kept}"
        ) from None


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch wraps a failed write in a RuntimeError)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a leanseg checkpoint; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' not found: pass the path of a best.pt or last.pt"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({reason[:120]}): it is corrupt or not a "
            "leanseg checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is not a leanseg checkpoint (no '{FORMAT}' header); for a plain "
            "state dict use leanseg.load_pretrained"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing or payload["version"] > VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has version {payload.get('version')} / missing {missing}: "
            f"this leanseg reads version <= {VERSION}; upgrade leanseg"
        )
    return payload


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, naming the first mismatching keys on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with "
            f"another shape {wrong[:3]}; check model.name / data.num_classes"
        )
    model.load_state_dict(state_dict)


def self_contained_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the files they name replaced by their content, as plain data.

    A checkpoint records its model's builder options; with this it rebuilds the model without
    those files: FasterSeg's ``arch`` given as the path of a spec ``.json`` becomes the spec
    itself (a dict, which the builder accepts as ``arch``). Other options are returned as is.
    """
    arch = options.get("arch")
    if "arch" not in accepted_options(name) or not isinstance(arch, str | Path):
        return dict(options)
    if not str(arch).endswith(".json"):
        return dict(options)  # a packaged name ("student" / "teacher")
    from leanseg.models.fasterseg.spec import load_spec, spec_to_dict

    return {**options, "arch": spec_to_dict(load_spec(arch))}


def model_from_checkpoint(payload: dict[str, Any], source: str) -> nn.Module:
    """Rebuild the model a checkpoint was saved from and load its weights.

    The registered methods' hooks (:func:`register_rebuild`) restore what they changed, e.g.
    ACoSP's masks or a ``leanseg shrink`` checkpoint's smaller layers.
    """
    for provider in REBUILD_PROVIDERS:
        importlib.import_module(provider)
    model = build_model(
        payload["model"], payload["num_classes"], **payload.get("model_options", {})
    )
    for rebuild in _REBUILDS.values():
        rebuild(model, payload)
    load_model_state(model, payload["state_dict"], source)
    return model
