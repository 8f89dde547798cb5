"""Measurements of one training step: saved-activation bytes, peak memory and time.

``leanseg bench memory -c CONFIG`` prints :func:`memory_report` as JSON; benchmarks/ scripts
compare settings side by side with the same functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanseg.bench_model import round_robin_times
from leanseg.config import Config
from leanseg.engine.objective import PixelCriterion, loss_upsamples
from leanseg.engine.precision import FP32, Compute, resolve_compute
from leanseg.methods import backrazor
from leanseg.models.base import set_training_logits_upsampled

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process since start or the last reset (Linux VmHWM)."""
    return _status_bytes("VmHWM:")


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux VmRSS)."""
    return _status_bytes("VmRSS:")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingStep:
    """Forward, cross-entropy, backward and an SGD step of one model on fixed data, in the
    precision and memory format of ``compute`` (default fp32, contiguous); with
    ``fused_upsampling`` the model hands over feature-resolution logits and the loss upsamples
    them (``loss.fused_upsampling``), else the model upsamples."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        compute: Compute = FP32,
        fused_upsampling: bool = False,
    ) -> None:
        self.model, self.targets = compute.prepare(model.train()), targets
        self.images = compute.images(images)
        self.ignore_index, self.compute = ignore_index, compute
        set_training_logits_upsampled(model, not fused_upsampling)
        self.criterion = PixelCriterion(align_corners=bool(getattr(model, "align_corners", 0)))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def loss(self) -> torch.Tensor:
        with self.compute.autocast(self.images.device):
            out = self.model(self.images)
        out = out["out"] if isinstance(out, dict) else out
        return self.criterion(out.float(), self.targets, ignore_index=self.ignore_index)

    def __call__(self) -> float:
        """One step; returns its wall-clock seconds (device synchronised)."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        _sync(self.images.device)
        return time.perf_counter() - start


def train_step_report(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 3,
    ignore_index: int = 255,
    compute: Compute = FP32,
    fused_upsampling: bool = False,
) -> dict[str, Any]:
    """Saved bytes (measured), peak memory and median time of forward+backward+SGD steps.

    ``peak_rss_step_bytes`` is how far the resident memory rose above its level before the
    timed steps (after a warm-up step, so optimizer state is already allocated).
    """
    device = images.device
    step = TrainingStep(model, images, targets, ignore_index, compute, fused_upsampling)
    saved = backrazor.saved_tensor_bytes(step.loss, exclude_parameters=True)
    step()  # warm-up
    before = rss_bytes()
    rss_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = sorted(step() for _ in range(steps))
    peak = peak_rss_bytes() if rss_reset else None
    report = {
        "saved_activation_bytes": saved,
        "step_seconds_median": times[len(times) // 2],
        "peak_rss_bytes": peak,
        "peak_rss_step_bytes": peak - before if peak is not None and before is not None else None,
    }
    if device.type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def interleaved_step_seconds(
    models: list[nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    rounds: int = 3,
    ignore_index: int = 255,
    compute: Compute = FP32,
    fused_upsampling: bool = False,
) -> list[float]:
    """Median step time of each model, timed round-robin (one step each per round).

    Interleaving exposes every model to the same drift of a shared machine (other processes,
    clock speed), which timing them one after another does not; one untimed round warms up.
    """
    steps = [
        TrainingStep(m, images, targets, ignore_index, compute, fused_upsampling) for m in models
    ]
    for step in steps:
        step()
    return round_robin_seconds(steps, rounds)


def round_robin_seconds(steps: list[Callable[[], float]], rounds: int) -> list[float]:
    """Median of each timed callable over ``rounds`` rounds of one call each, in turn."""
    return [spent[len(spent) // 2] for spent in round_robin_times(steps, rounds)]


def memory_report(cfg: Config, num_classes: int, device: torch.device) -> dict[str, Any]:
    """One training step of the config's model at its crop and batch size, on generated data."""
    from leanseg.engine.trainer import model_options
    from leanseg.models import build_model

    model = build_model(cfg.model.name, num_classes, **model_options(cfg))
    if cfg.backrazor.ratio is not None:
        backrazor.apply_config(model, cfg.backrazor)
    model = model.to(device)
    height, width = cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size
    shape = (cfg.data.batch_size, 3, height, width)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator).to(device)
    targets = torch.randint(num_classes, (shape[0], height, width), generator=generator)
    compute = resolve_compute(cfg.train.precision, cfg.train.channels_last, device, model)
    fused = loss_upsamples(cfg)
    report = train_step_report(
        model, images, targets.to(device), compute=compute, fused_upsampling=fused
    )
    report["analytic_saved_bytes"] = backrazor.analytic_saved_bytes(model, shape)
    return {
        "model": cfg.model.name,
        "input": list(shape),
        "compute": compute.to_dict(),
        "loss_fused_upsampling": fused,
        "backrazor_ratio": cfg.backrazor.ratio,
        "backrazor_scope": cfg.backrazor.scope,
        "backrazor_value_dtype": cfg.backrazor.value_dtype,
        "backrazor_bn": cfg.backrazor.bn,
        "device": str(device),
        **report,
    }
