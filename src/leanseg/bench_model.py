"""Size and speed of a model's inference: parameters, FLOPs of one forward, forward latency.

``leanseg bench model -c CONFIG [--backend torch fused onnxruntime]`` prints
:func:`model_report` as JSON: the latency on each backend, timed side by side. The benchmarks/
scripts compare models with the same functions, timed round-robin (:func:`round_robin_times`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from leanseg.errors import ConfigError
from leanseg.flops import flop_counter
from leanseg.fuse import ChannelsLast, fuse_bn
from leanseg.ort_latency import OrtRun, require_onnxruntime

BACKENDS = ("torch", "fused", "onnxruntime")


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
    """Calling it times one forward of ``model`` on ``images`` (device synchronised), under
    autocast to ``autocast_dtype`` when given."""

    def __init__(
        self, model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None = None
    ) -> None:
        self.model, self.images, self.autocast_dtype = model, images, autocast_dtype

    def __call__(self) -> float:
        device = self.images.device
        start = time.perf_counter()
        if self.autocast_dtype is None:
            self.model(self.images)
        else:
            with torch.autocast(device.type, dtype=self.autocast_dtype):
                self.model(self.images)
        _sync(device)
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


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def backend_candidates(
    model: nn.Module,
    images: torch.Tensor,
    threads: int,
    backends: Sequence[str],
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, tuple[Callable[[], float], dict[str, Any]]]:
    """Per backend a timed call (one forward on ``images``, seconds) and what it runs.

    ``"torch"``: eager under the caller's ``torch.inference_mode()``, under autocast to
    ``autocast_dtype`` (None: fp32) and in channels_last when asked; ``"fused"``:
    :func:`leanseg.fuse_bn` (BN folded into the convs, channels_last where it is exact), same
    autocast; ``"onnxruntime"``: the model exported (fp32) and run in one onnxruntime session
    with ``threads`` intra-op threads (CUDA execution provider for a CUDA model).
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends or len(set(backends)) != len(backends):
        raise ConfigError(
            f"--backend: got {list(backends)}; choose one or more of {list(BACKENDS)}, each once"
        )
    if "onnxruntime" in backends:
        require_onnxruntime()  # before any work
    device = images.device
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    torch_info = {**torch_backend(device, threads), "precision": precision}
    candidates: dict[str, tuple[Callable[[], float], dict[str, Any]]] = {}
    for name in backends:
        if name == "torch":
            eager, x = model.eval(), images
            if channels_last:
                eager = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
                x = images.contiguous(memory_format=torch.channels_last)
            step = TimedForward(eager, x, autocast_dtype)
            candidates[name] = (step, {**torch_info, "channels_last": channels_last})
        elif name == "fused":
            fused = fuse_bn(model, example_input=images)
            info = {
                **torch_info,
                "name": "torch eager, BN folded (leanseg.fuse_bn)",
                "channels_last": isinstance(fused, ChannelsLast),
                "batchnorms_before": _batchnorms(model),
                "batchnorms_left": _batchnorms(fused),
            }
            candidates[name] = (TimedForward(fused, images, autocast_dtype), info)
        else:
            session = OrtRun(model, images, threads)
            candidates[name] = (session, session.backend())
    return candidates


def model_report(
    model: nn.Module,
    input_shape: Sequence[int],
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    backends: Sequence[str] = ("torch",),
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Parameters, FLOPs of one forward and forward latency of ``model`` (set to eval mode).

    The input is N(0, 1) data of ``input_shape`` (N, C, H, W) on the model's device. Each of
    ``backends`` (:func:`backend_candidates`: ``"torch"``, ``"fused"``, ``"onnxruntime"``) is
    timed round-robin with the others in one run, ``warmup`` untimed rounds then ``runs``
    rounds, with ``threads`` intra-op threads (None: torch's current number).
    ``report["backends"][name]`` holds what it ran (``"backend"``), the median / p10 / p90
    seconds, images per second and ``"speedup"``: the first backend's median over this one's.
    """
    shape = [int(n) for n in input_shape]
    if len(shape) != 4 or min(shape) < 1:
        raise ConfigError(f"input shape {shape}: need 4 positive sizes (N, C, H, W)")
    _check_runs(runs, warmup)
    device = _device(model)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with num_threads(threads) as used:
        flops = forward_flops(model, images)
        candidates = backend_candidates(
            model,
            images,
            used,
            backends,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
        )
        with torch.inference_mode():
            times = round_robin_times([step for step, _ in candidates.values()], runs, warmup)
    measured: dict[str, dict[str, Any]] = {}
    for (name, (_, info)), seconds in zip(candidates.items(), times, strict=True):
        latency = latency_summary(seconds)
        measured[name] = {
            "backend": info,
            **latency,
            "images_per_second": shape[0] / latency["latency_seconds_median"],
        }
    first = measured[backends[0]]["latency_seconds_median"]
    for entry in measured.values():
        entry["speedup"] = first / entry["latency_seconds_median"]
    return {
        "input": shape,
        "device": str(device),
        "threads": used,
        **parameter_counts(model),
        "flops": flops,
        "gflops": flops / 1e9,
        "runs": runs,
        "warmup": warmup,
        "speedup_relative_to": backends[0],
        "backends": measured,
    }
