"""Where leanseg keeps what it generates or downloads (the synthetic dataset, weights)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LEANSEG_CACHE`` or ``~/.cache/leanseg``."""
    env = os.environ.get("LEANSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leanseg"
