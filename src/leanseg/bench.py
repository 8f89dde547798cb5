"""Measurements of one training step: saved-activation bytes, peak memory and time.

``leanseg bench memory -c CONFIG`` prints :func:`memory_report` as JSON; benchmarks/ scripts
compare settings side by side with the same functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanseg.config import Config
from leanseg.methods import backrazor

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process since start or the last reset (Linux VmHWM)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_report(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 2,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Saved bytes (measured), peak memory and median time of forward+backward+SGD steps."""
    device = images.device
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def loss_of_forward() -> torch.Tensor:
        return F.cross_entropy(model(images)["out"], targets, ignore_index=ignore_index)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of_forward().backward()
        optimizer.step()

    saved = backrazor.saved_tensor_bytes(loss_of_forward, exclude_parameters=True)
    step()  # warm-up
    _sync(device)
    rss_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    report = {
        "saved_activation_bytes": saved,
        "step_seconds_median": sorted(times)[len(times) // 2],
        "peak_rss_bytes": peak_rss_bytes() if rss_reset else None,
    }
    if device.type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def memory_report(cfg: Config, num_classes: int, device: torch.device) -> dict[str, Any]:
    """One training step of the config's model at its crop and batch size, on generated data."""
    from leanseg.engine.trainer import model_options
    from leanseg.models import build_model

    model = build_model(cfg.model.name, num_classes, **model_options(cfg))
    if cfg.backrazor.ratio is not None:
        backrazor.apply(model, cfg.backrazor.ratio, cfg.backrazor.scope)
    model = model.to(device)
    height, width = cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size
    shape = (cfg.data.batch_size, 3, height, width)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator).to(device)
    targets = torch.randint(num_classes, (shape[0], height, width), generator=generator)
    report = train_step_report(model, images, targets.to(device))
    report["analytic_saved_bytes"] = backrazor.analytic_saved_bytes(model, shape)
    return {
        "model": cfg.model.name,
        "input": list(shape),
        "backrazor_ratio": cfg.backrazor.ratio,
        "backrazor_scope": cfg.backrazor.scope,
        "device": str(device),
        **report,
    }
