"""Device selection, autocast dtype and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from leanseg.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'train.device': cuda requested but no GPU is visible; use cpu"
        )
    return torch.device(name)


def autocast_dtype(enabled: bool, requested: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``device`` (None when AMP is off): bf16 on CPU, fp16 on CUDA."""
    if not enabled:
        return None
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("config key 'train.amp_dtype': fp16 autocast needs CUDA; use bf16 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """torch's global RNG states (dropout and other in-model randomness)."""
    state: dict = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
