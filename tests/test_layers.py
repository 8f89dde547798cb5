"""The package's layers never reach up, and methods restore their checkpoints through hooks.

Layers, lowest first: errors / measurement tools (flops, fuse, bench_model, ort_latency), models,
data, the checkpoint format, methods, the engine, the deploy front (export, predictor), the CLI.
Every ``import leanseg.X`` in a module, at module level or inside a function, counts. The one
named exception: ``leanseg.checkpoint.REBUILD_PROVIDERS`` lists the packages whose hooks
``model_from_checkpoint`` loads by name (a plug-in list; see the fresh-interpreter test below).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from leanseg import checkpoint
from leanseg.checkpoint import model_from_checkpoint, register_rebuild, save_checkpoint
from leanseg.errors import CheckpointError
from leanseg.models import build_model

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "leanseg"
CLI = {"cli", "cli_config", "cli_export", "cli_report", "cli_search", "__main__"}
FRONT = {"predictor", "export", "onnx_model"} | CLI
TOOLS = {"errors", "cache", "recipes", "flops", "fuse", "bench_model", "ort_latency"}
# part of the package -> the parts it must not import
FORBIDDEN: dict[str, set[str]] = {
    **{
        tool: {"models", "data", "methods", "engine", "checkpoint", "bench"} | FRONT
        for tool in TOOLS
    },
    "models": {"methods", "engine", "checkpoint", "bench", "data"} | FRONT,
    "data": {"methods", "engine", "checkpoint", "bench"} | FRONT,
    "checkpoint": {"methods", "engine", "bench"} | FRONT,
    "methods": {"engine", "bench"} | FRONT,
    "engine": FRONT,
    "predictor": CLI,
    "export": CLI,
    "onnx_model": CLI,
}


def _part(path: Path) -> str:
    """``leanseg/engine/trainer.py`` -> ``engine``; ``leanseg/cli.py`` -> ``cli``."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("leanseg.")}
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        for target in sorted(_imported_parts(path) & FORBIDDEN.get(part, set())):
            bad.append(f"{path.relative_to(PACKAGE)} imports leanseg.{target}")
    return bad


def test_no_layer_imports_a_layer_above_it():
    assert _violations() == []


def test_the_check_sees_a_lazy_import(tmp_path, monkeypatch):
    """A function-level import that reaches up is caught (the old checkpoint <-> acosp circle)."""
    fake = tmp_path / "leanseg"
    (fake / "methods").mkdir(parents=True)
    (fake / "methods" / "x.py").write_text(
        "def f():\n    from leanseg.engine.trainer import Trainer\n"
    )
    (fake / "checkpoint.py").write_text("from leanseg.methods import acosp\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == [
        "checkpoint.py imports leanseg.methods",
        "methods/x.py imports leanseg.engine",
    ]


# ------------------------------------------------------------------------ rebuild hooks
def _widen(model: nn.Module, payload: dict) -> None:
    """A test method's hook: its checkpoints have a 7-channel 1x1 classifier."""
    if payload.get("widened"):
        model.classifier = nn.Conv2d(model.classifier.in_channels, 7, 1)


def test_a_registered_hook_rebuilds_the_model_before_its_weights_load(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_REBUILDS", dict(checkpoint._REBUILDS))
    torch.manual_seed(0)
    saved = build_model("segnet", 3)
    saved.classifier = nn.Conv2d(saved.classifier.in_channels, 7, 1)
    path = tmp_path / "widened.pt"
    save_checkpoint(
        path,
        {"model": "segnet", "num_classes": 3, "widened": True, "state_dict": saved.state_dict()},
    )
    payload = torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        model_from_checkpoint(payload, str(path))  # without the hook the shapes differ
    register_rebuild("widen", _widen)
    rebuilt = model_from_checkpoint(payload, str(path))
    assert rebuilt.classifier.out_channels == 7
    assert torch.equal(rebuilt.classifier.weight, saved.classifier.weight)


def test_acosp_checkpoints_rebuild_in_a_fresh_interpreter(tmp_path):
    """``leanseg.checkpoint`` alone (no explicit methods import) rebuilds a masked checkpoint:
    ``model_from_checkpoint`` loads the hook providers it names."""
    from leanseg.methods import acosp

    model = acosp.apply(build_model("segnet", 4), 0.5)
    path = tmp_path / "masked.pt"
    save_checkpoint(
        path,
        {
            "model": "segnet",
            "num_classes": 4,
            "config": {"acosp": {"sparsity": 0.5}},
            "state_dict": model.state_dict(),
        },
    )
    code = (
        "import sys; from leanseg.checkpoint import load_checkpoint, model_from_checkpoint;"
        "m = model_from_checkpoint(load_checkpoint(sys.argv[1]), sys.argv[1]);"
        "print(sum(k.endswith('acosp_score') for k in m.state_dict()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == sum(k.endswith("acosp_score") for k in model.state_dict()) > 0
