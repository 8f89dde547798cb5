"""Training-step speed of today's fp32 path against the new defaults (and with compile).

    python benchmarks/train_speed.py [--models deeplabv3_mobilenetv2 deeplabv3_resnet50 pspnet50]
        [--batch 8 --size 256 --classes 21] [--rounds 3] [--no-compile] [--out PATH] [--quick]

Per model (output stride 16 for DeepLab, PSPNet's own 8; random weights and data, seed 0),
three variants of one SGD training step (forward, cross-entropy, backward, update;
:class:`leanseg.bench.TrainingStep`):

- ``fp32``: fp32, contiguous, the model upsamples its logits (the path before issue 15);
- ``defaults``: ``train.precision=auto``, ``train.channels_last=auto`` and
  ``loss.fused_upsampling=true`` as resolved on this machine (the new defaults);
- ``compiled``: the defaults with ``torch.compile`` (``train.compile=true``); its first step,
  which compiles, is reported apart as ``compile_warmup_seconds``.

Per variant: bytes saved for backward by one forward + loss (parameters excluded, measured
from the saved tensors), the peak RSS of a step above the resident level before it, and the
step time, taken round-robin over the variants (``--rounds`` rounds after one warm-up round)
so that drift on a shared machine hits them alike; images/s and the speed-up vs ``fp32``.
Targets on a CPU with native bf16: defaults >= 1.7x fp32 images/s for mobilenetv2 and >= 2.0x
for resnet50. Prints JSON and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from result_file import machine, write_result

from leanseg import build_model
from leanseg.bench import (
    TrainingStep,
    peak_rss_bytes,
    reset_peak_rss,
    round_robin_seconds,
    rss_bytes,
)
from leanseg.engine.compile import compile_or_eager
from leanseg.engine.precision import FP32, resolve_compute
from leanseg.engine.runtime import select_device
from leanseg.methods import backrazor

MODELS = ("deeplabv3_mobilenetv2", "deeplabv3_resnet50", "pspnet50")
TARGETS = {"deeplabv3_mobilenetv2": 1.7, "deeplabv3_resnet50": 2.0}
DEFAULT_OUT = Path(__file__).parent / "results" / "train_speed_cpu.json"


def _model(name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"output_stride": 16} if name.startswith("deeplab") else {}
    return build_model(name, classes, **options)


def _peak_step(step: TrainingStep) -> int | None:
    """How far the resident memory rose above its level before one step (after a warm-up)."""
    before = rss_bytes()
    if not reset_peak_rss() or before is None:
        return None
    step()
    peak = peak_rss_bytes()
    return None if peak is None else peak - before


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    masks = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=generator)
    masks = masks.to(device)
    base = _model(name, args.classes).to(device)
    compute = resolve_compute("auto", "auto", device, base)
    variants: dict[str, tuple[TrainingStep, dict[str, Any]]] = {
        "fp32": (
            TrainingStep(copy.deepcopy(base), images, masks, 255, FP32, fused_upsampling=False),
            {**FP32.to_dict(), "fused_upsampling": False, "compile": False},
        ),
        "defaults": (
            TrainingStep(copy.deepcopy(base), images, masks, 255, compute, fused_upsampling=True),
            {**compute.to_dict(), "fused_upsampling": True, "compile": False},
        ),
    }
    if args.compile:
        model = copy.deepcopy(base)
        step = TrainingStep(model, images, masks, 255, compute, fused_upsampling=True)
        said: list[str] = []
        step.model = compile_or_eager(model, say=said.append)
        start = time.perf_counter()
        step()  # compiles
        warmup = time.perf_counter() - start
        info = {**compute.to_dict(), "fused_upsampling": True, "compile": True}
        info.update(compile_warmup_seconds=warmup, compile_failure=said[0] if said else None)
        variants["compiled"] = (step, info)
    report: dict[str, Any] = {}
    for key, (step, info) in variants.items():
        saved = backrazor.saved_tensor_bytes(step.loss, exclude_parameters=True)
        step()  # warm-up (optimizer state allocated)
        report[key] = {**info, "saved_bytes": saved, "peak_rss_step_bytes": _peak_step(step)}
    seconds = round_robin_seconds([step for step, _ in variants.values()], args.rounds)
    for key, spent in zip(variants, seconds, strict=True):
        report[key].update(step_seconds_median=spent, images_per_second=args.batch / spent)
    base_rate = report["fp32"]["images_per_second"]
    for entry in report.values():
        entry["speedup_vs_fp32"] = entry["images_per_second"] / base_rate
        entry["saved_bytes_vs_fp32"] = entry["saved_bytes"] / report["fp32"]["saved_bytes"]
    summary = {k: round(v["speedup_vs_fp32"], 2) for k, v in report.items()}
    print(f"{name}: speed-up vs fp32 {json.dumps(summary)}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 2, 64 px, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.rounds = 2, 64, 1
    device = select_device(args.device)
    result: dict[str, Any] = {
        "benchmark": "train_speed",
        "command": " ".join(["python", "benchmarks/train_speed.py", *(argv or sys.argv[1:])]),
        "machine": machine(device=str(device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "classes": args.classes,
        "rounds": args.rounds,
        "load_average_before": os.getloadavg(),
        "models": {name: measure(name, args, device) for name in args.models},
    }
    result["load_average_after"] = os.getloadavg()
    result["targets"] = {
        name: {
            "defaults_speedup_vs_fp32": result["models"][name]["defaults"]["speedup_vs_fp32"],
            "target": target,
            "met": result["models"][name]["defaults"]["speedup_vs_fp32"] >= target,
        }
        for name, target in TARGETS.items()
        if name in result["models"]
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
