"""leanseg: semantic segmentation that is lean in memory, size and time."""

from leanseg import methods  # noqa: F401  (registers the methods' checkpoint hooks)
from leanseg.errors import CheckpointError, ConfigError, DataError, LeansegError
from leanseg.fuse import fuse_bn
from leanseg.models import build_model, list_models, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Predictor",
    "ConfigError",
    "DataError",
    "LeansegError",
    "build_model",
    "fuse_bn",
    "list_models",
    "load_pretrained",
    "__version__",
]


def __getattr__(name: str):
    """``leanseg.Predictor`` is imported on first use (it pulls in the engine)."""
    if name == "Predictor":
        from leanseg.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'leanseg' has no attribute {name!r}")
