"""Size and speed of a model's inference: parameters, FLOPs of one forward, forward latency.

``leanseg bench model -c CONFIG [--backend torch|onnxruntime]`` prints :func:`model_report` as
JSON, the latency with the backend it was measured on; benchmarks/acosp.py and
benchmarks/fasterseg_latency.py compare models with the same functions, timed round-robin
(:func:`round_robin_times`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from leanseg.errors import ConfigError
from leanseg.flops import flop_counter
from leanseg.ort_latency import OrtRun, require_onnxruntime

BACKENDS = ("torch", "onnxruntime")


def round_robin_times(
    steps: list[Callable[[], float]], rounds: int, warmup: int = 0
) -> list[list[float]]:
    """Each timed callable's seconds (sorted) over ``rounds`` rounds of one call each, in turn,
    after ``warmup`` untimed rounds."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(warmup + rounds):
        for step, spent in zip(steps, times, strict=True):
            seconds = step()
            if round_ >= warmup:
                spent.append(seconds)
    return [sorted(spent) for spent in times]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and trainable (``requires_grad``) parameter counts."""
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
    }


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Fix ``torch.set_num_threads`` (None: keep the current number) and restore it after."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: got {threads}; must be >= 1")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs (multiply-adds x 2) of one eval-mode forward on ``images``.

    The first forward of a report: a RuntimeError (input too small for the model's strides and
    pools) becomes a one-line ConfigError.
    """
    model.eval()
    counter = flop_counter()
    try:
        with torch.inference_mode(), counter:
            model(images)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else "RuntimeError"
        size = "x".join(str(n) for n in images.shape[-2:])
        raise ConfigError(
            f"a {size} input fails in {type(model).__name__}'s forward ({reason}); "
            "try a larger --size"
        ) from None
    return counter.get_total_flops()


class TimedForward:
    """Calling it times one forward of ``model`` on ``images`` (device synchronised)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def __call__(self) -> float:
        start = time.perf_counter()
        self.model(self.images)
        _sync(self.images.device)
        return time.perf_counter() - start


def torch_backend(device: torch.device, threads: int) -> dict[str, Any]:
    """What torch-eager figures were measured with."""
    info: dict[str, Any] = {
        "name": "torch eager",
        "torch": torch.__version__,
        "device": str(device),
        "threads": threads,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _check_runs(runs: int, warmup: int) -> None:
    if runs < 1 or warmup < 0:
        raise ConfigError(f"--runs {runs} / --warmup {warmup}: need runs >= 1 and warmup >= 0")


def interleaved_forward_seconds(
    models: Sequence[nn.Module], images: torch.Tensor, *, runs: int, warmup: int
) -> list[list[float]]:
    """Eval-mode forward seconds of each model, timed round-robin under ``inference_mode``.

    ``warmup`` untimed rounds, then ``runs`` rounds of one forward per model, so that drift of a
    shared machine (other processes, clock speed) hits every model alike. Returns per model
    its ``runs`` times, sorted.
    """
    _check_runs(runs, warmup)
    for model in models:
        model.eval()
    with torch.inference_mode():
        return round_robin_times([TimedForward(m, images) for m in models], runs, warmup)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p10 and p90 (linear interpolation) of forward times in seconds."""
    p10, median, p90 = np.percentile(np.asarray(seconds, dtype=float), [10, 50, 90])
    return {
        "latency_seconds_median": float(median),
        "latency_seconds_p10": float(p10),
        "latency_seconds_p90": float(p90),
    }


def model_report(
    model: nn.Module,
    input_shape: Sequence[int],
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Parameters, FLOPs of one forward and forward latency of ``model`` (set to eval mode).

    The input is N(0, 1) data of ``input_shape`` (N, C, H, W) on the model's device; latency is
    the median / p10 / p90 of ``runs`` forwards after ``warmup`` untimed ones with ``threads``
    intra-op threads (None: torch's current number), on ``backend``: ``"torch"`` (eager, under
    ``torch.inference_mode()``) or ``"onnxruntime"`` (the exported model's ``session.run``).
    ``"backend"`` in the report records what the latency was measured with.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: got {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "onnxruntime":
        require_onnxruntime()  # before any work
    shape = [int(n) for n in input_shape]
    if len(shape) != 4 or min(shape) < 1:
        raise ConfigError(f"input shape {shape}: need 4 positive sizes (N, C, H, W)")
    _check_runs(runs, warmup)
    device = _device(model)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with num_threads(threads) as used:
        flops = forward_flops(model, images)
        if backend == "torch":
            (seconds,) = interleaved_forward_seconds([model], images, runs=runs, warmup=warmup)
            info = torch_backend(device, used)
        else:
            session = OrtRun(model, images, used)
            (seconds,) = round_robin_times([session], runs, warmup)
            info = session.backend()
    latency = latency_summary(seconds)
    return {
        "input": shape,
        "device": str(device),
        "threads": used,
        "backend": info,
        **parameter_counts(model),
        "flops": flops,
        "gflops": flops / 1e9,
        "runs": runs,
        "warmup": warmup,
        **latency,
        "images_per_second": shape[0] / latency["latency_seconds_median"],
    }
