"""Deployment latency on this CPU: torch eager, torch with fused BN, and onnxruntime.

    python benchmarks/deploy.py [--sizes 512x512 512x1024 1024x2048] [--threads 1 2]
        [--models NAME ...] [--runs 10] [--warmup 2] [--out PATH] [--quick]

Batch-1 forward latency of deeplabv3_mobilenetv2, deeplabv3_resnet50, pspnet50 (21 classes,
default options; PSPNet's training-only aux head is built but eval skips it), pspnet50_acosp4
(the same pspnet50 with ACoSP masks at sparsity 0.75, i.e. 1/4 of the channels kept: random
N(0, 1) scores, hardened, physically shrunk with ``acosp.shrink``; 21 classes) and
fasterseg_student (19 classes). All weights are random (fixed seed): fine for latency, not for
accuracy. All models run at the first size; later sizes run fasterseg_student only.

Three candidates per model, those of ``leanseg bench model --backend torch fused onnxruntime``
(:func:`leanseg.bench_model.backend_candidates`): "torch" (eval, ``torch.inference_mode``),
"fused" (:func:`leanseg.fuse_bn`: BN folded into the convs, channels_last) and "onnxruntime"
(``torch.onnx.export``, one CPU session; PSPNet's adaptive pools with uneven bins are exported
as the same averages over slices, :mod:`leanseg.onnx_compat`, as ``leanseg export`` does). Per
size and
thread count (``torch.set_num_threads`` and the ORT session's intra-op threads), every model x
candidate is timed round-robin in one run (:func:`leanseg.bench_model.round_robin_times`:
``--warmup`` untimed rounds, then ``--runs`` rounds of one call each), so that drift on a
shared machine hits them alike. Reported: median / p10 / p90 ms and the speed-up vs that
model's torch eager (ratio of the medians). Targets (deeplabv3_mobilenetv2, 2 threads, first
size): onnxruntime >= 1.8x and fused >= 1.5x. Prints JSON and writes it to ``--out``.
``--quick`` is a smoke test: 64x64, first size only, 1 run, no warm-up. The committed
benchmarks/results/deploy_cpu.json comes from ``python benchmarks/deploy.py`` (all defaults).
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
from torch import nn

from leanseg import build_model
from leanseg.bench_model import (
    backend_candidates,
    num_threads,
    parameter_counts,
    round_robin_times,
)
from leanseg.methods import acosp
from leanseg.onnx_compat import exportable

MODELS = (
    "deeplabv3_mobilenetv2",
    "deeplabv3_resnet50",
    "pspnet50",
    "pspnet50_acosp4",
    "fasterseg_student",
)
LARGE_SIZE_MODELS = ("fasterseg_student",)  # the only models run at sizes after the first
BACKENDS = ("torch", "fused", "onnxruntime")
NUM_CLASSES = {"fasterseg_student": 19}  # the others: 21
ACOSP_SPARSITY = 0.75
TARGET_MODEL, TARGET_THREADS = "deeplabv3_mobilenetv2", 2
TARGETS = {"onnxruntime": 1.8, "fused": 1.5}  # speed-up vs torch eager
DEFAULT_OUT = Path(__file__).parent / "results" / "deploy_cpu.json"


def _build(name: str) -> nn.Module:
    """An eval model with random weights (seed 0); the ACoSP one is derived from pspnet50."""
    torch.manual_seed(0)
    if name != "pspnet50_acosp4":
        return build_model(name, NUM_CLASSES.get(name, 21)).eval()
    model = acosp.apply(_build("pspnet50"), ACOSP_SPARSITY)
    acosp.harden(model)
    return acosp.shrink(model).eval()


def _model_info(name: str, model: nn.Module) -> dict[str, Any]:
    eval_params = sum(
        p.numel() for key, p in model.named_parameters() if not key.startswith("aux_classifier.")
    )
    info = {
        "num_classes": NUM_CLASSES.get(name, 21),
        **parameter_counts(model),
        "eval_parameters": eval_params,
        "weights": "random (seed 0)",
    }
    if name == "pspnet50_acosp4":
        info["acosp"] = {
            "sparsity": ACOSP_SPARSITY,
            "scores": "random N(0, 1), hardened, shrunk (acosp.shrink)",
        }
    return info


def bench_size(
    built: dict[str, nn.Module], size: tuple[int, int], threads: list[int], runs: int, warmup: int
) -> dict[str, Any]:
    """Every model x backend at ``size``, round-robin once per thread count."""
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {"runs": runs, "warmup": warmup, "threads": {}}
    for count in threads:
        steps: list[Any] = []
        entries: list[dict[str, Any]] = []
        models: dict[str, dict[str, Any]] = {}
        for name, model in built.items():
            models[name] = {}
            with num_threads(count):
                candidates = backend_candidates(model, images, count, BACKENDS)
            for backend, (step, info) in candidates.items():
                if backend == "onnxruntime":
                    info = {**info, "adaptive_pools_sliced": exportable(model)[1]}
                steps.append(step)
                entries.append(models[name].setdefault(backend, {"backend": info}))
        with num_threads(count), torch.inference_mode():
            times = round_robin_times(steps, runs, warmup)
        for entry, seconds in zip(entries, times, strict=True):
            entry.update(summary_ms(seconds))
        for backends in models.values():
            base = backends["torch"]["median_ms"]
            for entry in backends.values():
                entry["speedup_vs_torch"] = base / entry["median_ms"]
        report["threads"][str(count)] = models
        summary = {
            name: {b: round(e["speedup_vs_torch"], 2) for b, e in backends.items()}
            for name, backends in models.items()
        }
        print(f"{size[0]}x{size[1]} threads={count}: {json.dumps(summary)}", file=sys.stderr)
    return report


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The MobileNetV2 targets at 2 threads, at the first size (value None: not measured)."""
    key = next(iter(result["sizes"]), None)
    found = result["sizes"].get(key, {}).get("threads", {}).get(str(TARGET_THREADS), {})
    block: dict[str, Any] = {"model": TARGET_MODEL, "threads": TARGET_THREADS, "size": key}
    for backend, target in TARGETS.items():
        value = found.get(TARGET_MODEL, {}).get(backend, {}).get("speedup_vs_torch")
        met = None if value is None else value >= target
        block[f"{backend}_speedup_vs_torch"] = {"value": value, "target": target, "met": met}
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=[(512, 512), (512, 1024), (1024, 2048)]
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: 64x64, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.runs, args.warmup = [(64, 64)], 1, 0
    if args.runs < 1 or args.warmup < 0 or min(args.threads) < 1:
        parser.error("need --runs >= 1, --warmup >= 0 and --threads >= 1")
    built = {name: _build(name) for name in args.models}
    argv = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {
        "benchmark": "deploy",
        "command": " ".join(["python", "benchmarks/deploy.py", *argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "batch": 1,
        "threads": args.threads,
        "note": "random weights: latency only; speed-ups are torch eager median / backend median",
        "models": {name: _model_info(name, model) for name, model in built.items()},
        "load_average_before": os.getloadavg(),
        "sizes": {},
    }
    for i, size in enumerate(args.sizes):
        names = [n for n in args.models if i == 0 or n in LARGE_SIZE_MODELS]
        if names:
            chosen = {name: built[name] for name in names}
            report = bench_size(chosen, size, args.threads, args.runs, args.warmup)
            result["sizes"][f"{size[0]}x{size[1]}"] = report
    result["load_average_after"] = os.getloadavg()
    result["targets"] = targets(result)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
