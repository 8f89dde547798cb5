"""Precision and memory format of a run: ``train.precision`` and ``train.channels_last``.

``auto`` uses what the hardware is fast at: bf16 autocast and channels_last on CPUs with native
bf16 (avx512_bf16 or AMX) and on CUDA devices with bf16, fp16 autocast (+ loss scaling) and
channels_last on older GPUs, fp32 and the default layout elsewhere. Autocast leaves losses,
metrics and BatchNorm statistics in fp32. The choice is printed at the start of a run and
recorded in its directory (``compute.json``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from leanseg.errors import ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_bf16_flag() -> str | None:
    """The CPU flag that gives native bf16 matmuls (``avx512_bf16`` / ``amx_bf16``), or None.

    Read from ``/proc/cpuinfo`` (Linux); elsewhere None, i.e. fp32."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        return None
    return next((flag for flag in _CPU_BF16_FLAGS if flag in flags), None)


def cuda_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes bf16 natively (Ampere and later)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Compute:
    """The resolved precision (``fp32`` / ``bf16`` / ``fp16``) and memory format of a run."""

    precision: str
    channels_last: bool
    reason: str  # why, for the start line: "auto: CPU with avx512_bf16"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return _DTYPES[self.precision]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in this precision (a no-op context for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in this memory format (in place; returns it)."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(memory_format=layout)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch in this memory format."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def describe(self) -> str:
        """E.g. ``bf16 autocast + channels_last (auto: CPU with avx512_bf16)``."""
        what = "fp32" if self.precision == "fp32" else f"{self.precision} autocast"
        layout = " + channels_last" if self.channels_last else ""
        return f"{what}{layout} ({self.reason})"

    def to_dict(self) -> dict[str, object]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "reason": self.reason,
        }


def _has_group_norm(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, nn.GroupNorm) for m in model.modules())


def resolve_compute(
    precision: str,
    channels_last: str,
    device: torch.device,
    model: nn.Module | None = None,
) -> Compute:
    """The precision and memory format for ``device`` from the ``train.precision`` /
    ``train.channels_last`` settings (``auto`` or explicit); ``model`` lets ``auto`` skip
    channels_last for GroupNorm models on the CPU. fp16 on the CPU is a one-line ConfigError."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "config key 'train.precision': fp16 needs a CUDA device; use bf16 (or auto) on CPU"
        )
    if precision == "auto":
        if device.type == "cuda":
            chosen = "bf16" if cuda_bf16(device) else "fp16"
            why = f"auto: {torch.cuda.get_device_name(device)}"
        else:
            flag = cpu_bf16_flag() if device.type == "cpu" else None
            chosen = "bf16" if flag else "fp32"
            why = f"auto: CPU with {flag}" if flag else "auto: no native bf16 on this CPU"
    else:
        chosen, why = precision, "train.precision"
    if channels_last == "auto":
        layout = chosen != "fp32" and not (device.type == "cpu" and _has_group_norm(model))
    else:
        layout = channels_last == "true"
        why = f"{why}; train.channels_last"
    return Compute(chosen, layout, why)


FP32 = Compute("fp32", False, "fixed")  # e.g. an onnxruntime model
