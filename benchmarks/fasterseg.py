"""FasterSeg on the synthetic dataset: teacher, student with and without KD, and MobileNetV2.

    python benchmarks/fasterseg.py [--work-dir /tmp/fasterseg_bench] [--runs 10] [--threads 2]

Every model trains with the default recipe's budget and optimizer (800 iterations, batch 16,
112 px crops, AdamW 2e-3, seed 0). The FasterSeg models add their own loss (OHEM, threshold 0.7,
min_kept = batch x crop area / 16 as in the original; outputs weighted out 1, aux16 0.2, aux32
0.2); the KD student adds the KL to the trained teacher's logits (weight 1, element-wise mean, as
the original). deeplabv3_mobilenetv2 trains with plain cross-entropy, its own recipe's loss.
Finished runs in ``--work-dir`` are reused. Then each trained model is measured in eval mode:
val mIoU, parameters, MACs at 512x1024 (``leanseg.flops`` counts 2 FLOPs per multiply-add) and
batch-1 CPU latency at 512x1024, torch eager and onnxruntime (exported with torch.onnx here),
every model x backend timed round-robin in one run. Prints JSON; writes it and a plot to
``benchmarks/results/fasterseg_synthetic.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from result_file import machine, write_result
from synthetic_runs import train_run

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint

RESULTS = Path(__file__).parent / "results"
FASTERSEG_LOSS = [
    "model.aux=true",
    "loss.name=ohem",
    "loss.ohem_thresh=0.7",
    f"loss.ohem_min_kept={16 * 112 * 112 // 16}",
    "loss.weights={out: 1.0, aux16: 0.2, aux32: 0.2}",
]


def runs(work: Path) -> dict[str, list[str]]:
    """Run name -> overrides of the default recipe (the KD student needs the teacher's run)."""
    teacher = work / "fasterseg_teacher" / "last.pt"
    return {
        "fasterseg_teacher": ["model.name=fasterseg_teacher", *FASTERSEG_LOSS],
        "fasterseg_student": ["model.name=fasterseg_student", *FASTERSEG_LOSS],
        "fasterseg_student_kd": [
            "model.name=fasterseg_student",
            *FASTERSEG_LOSS,
            f"distill.teacher={teacher}",
            "distill.weight=1.0",
        ],
        "deeplabv3_mobilenetv2": ["model.name=deeplabv3_mobilenetv2"],
    }


def seed_runs(work: Path, seeds: list[int]) -> dict[str, list[str]]:
    """The student with and without KD again at other seeds (same teacher): how far a seed
    moves the KD gain."""
    base = runs(work)
    return {
        f"{name}_seed{seed}": [*base[name], f"train.seed={seed}"]
        for seed in seeds
        for name in ("fasterseg_student", "fasterseg_student_kd")
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """val mIoU against onnxruntime and torch latency, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: cycle[i % len(cycle)] for i, name in enumerate(report["models"])}
    for backend, marker in (("torch", "o"), ("onnxruntime", "s")):
        for name, entry in report["models"].items():
            ms = entry[backend]["median_ms"]
            ax.scatter(ms, entry["miou"], marker=marker, color=colours[name])
        ax.scatter([], [], marker=marker, color="grey", label=backend)
    for name, colour in colours.items():
        ax.scatter([], [], marker="o", color=colour, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency at 512x1024, batch 1, 2 threads (ms, median)")
    ax.set_ylabel("val mIoU (synthetic, 800 iterations)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fasterseg_bench"))
    parser.add_argument("--runs", type=int, default=10, help="timed rounds per candidate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="train, do not measure")
    parser.add_argument("--only", nargs="+", help="train only these runs (with --train-only)")
    parser.add_argument(
        "--student-seeds", nargs="*", type=int, default=[], help="more seeds for the students"
    )
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads while training (on a shared 2-core machine, 2 threads next to "
        "another busy process made the teacher's step 13x slower than 1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fasterseg_synthetic.json")
    args = parser.parse_args(argv)
    trained = {}
    torch.set_num_threads(args.train_threads)
    seeds = seed_runs(args.work_dir, args.student_seeds)
    for name, overrides in {**runs(args.work_dir), **seeds}.items():
        if args.only and name not in args.only:
            continue
        trained[name] = train_run(overrides, args.work_dir / name)
        print(f"{name}: {json.dumps(trained[name])}", file=sys.stderr)
    if args.train_only:
        return 0
    from fasterseg_latency import bench_models  # after training: torch threads

    models = {}
    for name in runs(args.work_dir):
        checkpoint = args.work_dir / name / "last.pt"
        models[name] = model_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint)).eval()
    torch.set_num_threads(args.threads)
    backends = ["torch", "onnxruntime"]
    measured = bench_models(models, (512, 1024), backends, args.runs, args.warmup)
    for name, entry in measured["models"].items():
        entry.update(miou=trained[name]["miou"], train_seconds=trained[name]["seconds"])
        entry["gmacs"] = entry["gflops"] / 2  # leanseg.flops counts 2 FLOPs per multiply-add
    report = {
        "benchmark": "fasterseg_synthetic",
        "command": " ".join(["python", "benchmarks/fasterseg.py", *sys.argv[1:]]),
        "machine": machine(),
        "recipe": {name: overrides for name, overrides in runs(args.work_dir).items()},
        "student_seeds": {name: {**trained[name], "overrides": seeds[name]} for name in seeds},
        **measured,
    }
    write_result(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
