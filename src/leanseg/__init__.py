"""leanseg: semantic segmentation that is lean in memory, size and time.

The names below are imported on first use, so that ``import leanseg`` (and ``leanseg --help``)
does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from leanseg.errors import CheckpointError, ConfigError, DataError, LeansegError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Predictor": "leanseg.predictor",
    "Trainer": "leanseg.engine.trainer",
    "load_config": "leanseg.config",
    "fuse_bn": "leanseg.fuse",
    "build_model": "leanseg.models",
    "list_models": "leanseg.models",
    "load_pretrained": "leanseg.models",
    "register_model": "leanseg.models",
    "register_builder": "leanseg.models",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LeansegError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "methods":  # ``leanseg.methods`` as an attribute, as before
        return import_module("leanseg.methods")
    raise AttributeError(f"module 'leanseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
