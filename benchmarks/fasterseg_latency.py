"""FasterSeg latency on this machine: student, teacher and DeepLabV3-MobileNetV2, two backends.

    python benchmarks/fasterseg_latency.py [--sizes 512x1024 1024x2048] [--runs 20 5]
        [--warmup 3 1] [--threads 2] [--backends torch onnxruntime] [--out PATH]
        [--profile RUNS]

Every model is built with 19 classes, in eval mode, without aux heads (other options at their
defaults: MobileNetV2 at output stride 16), batch 1, N(0, 1) input. Per size, every candidate
(model x backend: torch eager under ``inference_mode``, and the model exported with
``torch.onnx.export`` in an onnxruntime session, see :mod:`leanseg.ort_latency`) is timed
round-robin in one run (:func:`leanseg.bench_model.round_robin_times`: ``--warmup`` untimed rounds,
then ``--runs`` rounds of one call each), so that drift on a shared machine hits them alike.
Prints JSON, and writes it to ``--out``: per model and backend median / p10 / p90 ms with the
backend recorded, and per backend the ratios ``deeplabv3_mobilenetv2 / model`` of the medians.
Targets (issue 12) at 512x1024: student ratio > 2.73 in torch eager and > 1.35 in onnxruntime.
``--profile RUNS`` adds, at the first size, where each model's time goes: torch.profiler self
CPU time by aten op, and onnxruntime kernel time by op type and its top nodes (ms per run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from result_file import machine, parse_size, summary_ms, write_result

from leanseg import build_model
from leanseg.bench_model import (
    TimedForward,
    forward_flops,
    num_threads,
    parameter_counts,
    round_robin_times,
    torch_backend,
)
from leanseg.ort_latency import OrtRun

MODELS = ("fasterseg_student", "fasterseg_teacher", "deeplabv3_mobilenetv2")
BASELINE = "deeplabv3_mobilenetv2"
NUM_CLASSES = 19
TARGETS = {"torch": 2.73, "onnxruntime": 1.35}  # student, 512x1024
DEFAULT_OUT = Path(__file__).parent / "results" / "fasterseg_latency_cpu.json"


def torch_profile(model: torch.nn.Module, images: torch.Tensor, runs: int) -> dict[str, Any]:
    """Self CPU ms per forward of the top aten ops (torch.profiler), after one warm-up."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(images)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {
        "runs": runs,
        "total_ms": total / 1000 / runs,
        "by_op_ms": {e.key: e.self_cpu_time_total / 1000 / runs for e in events[:12]},
    }


def bench_size(
    size: tuple[int, int],
    models: list[str],
    backends: list[str],
    runs: int,
    warmup: int,
    profile_runs: int = 0,
) -> dict[str, Any]:
    """Every model (built with 19 classes) x backend at ``size``, timed round-robin; the
    figures and ratios (and with ``profile_runs`` the profiles)."""
    built = {name: build_model(name, NUM_CLASSES).eval() for name in models}
    return bench_models(built, size, backends, runs, warmup, profile_runs)


def bench_models(
    built: dict[str, torch.nn.Module],
    size: tuple[int, int],
    backends: list[str],
    runs: int,
    warmup: int,
    profile_runs: int = 0,
) -> dict[str, Any]:
    """:func:`bench_size` for given eval-mode models (e.g. trained checkpoints)."""
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    device, threads = images.device, torch.get_num_threads()
    models = list(built)
    report: dict[str, Any] = {"runs": runs, "warmup": warmup, "models": {}}
    candidates: list[tuple[str, str]] = []
    steps: list[Any] = []
    sessions: dict[str, OrtRun] = {}
    for name, model in built.items():
        entry = {**parameter_counts(model), "gflops": forward_flops(model, images) / 1e9}
        report["models"][name] = entry
        for backend in backends:
            if backend == "torch":
                steps.append(TimedForward(model, images))
                entry["torch"] = {"backend": torch_backend(device, threads)}
            else:
                session = sessions[name] = OrtRun(model, images, threads)
                steps.append(session)
                entry["onnxruntime"] = {"backend": session.backend()}
            candidates.append((name, backend))
    with torch.inference_mode():
        times = round_robin_times(steps, runs, warmup)
    for (name, backend), seconds in zip(candidates, times, strict=True):
        report["models"][name][backend].update(summary_ms(seconds))
    report["ratios"] = {
        backend: {
            f"{BASELINE}/{name}": report["models"][BASELINE][backend]["median_ms"]
            / report["models"][name][backend]["median_ms"]
            for name in models
            if name != BASELINE
        }
        for backend in backends
        if BASELINE in models
    }
    if profile_runs:
        report["profile"] = {
            name: {
                **(
                    {"torch": torch_profile(model, images, profile_runs)}
                    if "torch" in backends
                    else {}
                ),
                **(
                    {"onnxruntime": sessions[name].profile(profile_runs)}
                    if name in sessions
                    else {}
                ),
            }
            for name, model in built.items()
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 1024), (1024, 2048)])
    parser.add_argument("--runs", nargs="+", type=int, default=[20, 5], help="per size")
    parser.add_argument("--warmup", nargs="+", type=int, default=[3, 1], help="per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument(
        "--backends", nargs="+", choices=["torch", "onnxruntime"], default=["torch", "onnxruntime"]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="RUNS", help="profile at the first size"
    )
    args = parser.parse_args(argv)
    if not len(args.runs) == len(args.warmup) == len(args.sizes):
        parser.error("give one --runs and one --warmup per size")
    result: dict[str, Any] = {
        "benchmark": "fasterseg_latency",
        "command": " ".join(["python", "benchmarks/fasterseg_latency.py", *sys.argv[1:]]),
        "machine": machine(),
        "threads": args.threads,
        "batch": 1,
        "num_classes": NUM_CLASSES,
        "load_average_before": os.getloadavg(),
        "targets_512x1024": {f"{BASELINE}/fasterseg_student": TARGETS},
        "sizes": {},
    }
    with num_threads(args.threads):
        for i, (size, runs, warmup) in enumerate(
            zip(args.sizes, args.runs, args.warmup, strict=True)
        ):
            key = f"{size[0]}x{size[1]}"
            profile = args.profile if i == 0 else 0
            result["sizes"][key] = bench_size(
                size, args.models, args.backends, runs, warmup, profile
            )
            print(f"{key}: {json.dumps(result['sizes'][key]['ratios'])}", file=sys.stderr)
    result["load_average_after"] = os.getloadavg()
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
