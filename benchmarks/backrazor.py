"""BackRazor memory and speed, side by side with dense training in one run.

    python benchmarks/backrazor.py [--models deeplabv3_mobilenetv2 deeplabv3_resnet50]
        [--ratios 0 0.7 0.9 0.95] [--batch 8 --size 256 --scope backbone]

For each model: a dense training step, then the same weights with BackRazor at each ratio.
Prints JSON: bytes saved for backward measured from the real saved tensors (parameters
excluded), the original's analytic estimate, peak RSS (and CUDA peak) of a step, step time,
and each as a ratio to dense. Targets at R=0.9 for deeplabv3_resnet50: saved bytes <= 1/5
of dense, step time <= 1.5x dense.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from leanseg import build_model
from leanseg.bench import train_step_report
from leanseg.engine.runtime import select_device
from leanseg.methods import backrazor


def measure(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    dense = build_model(name, num_classes=21, output_stride=16)
    shape = (args.batch, 3, args.size, args.size)
    images = torch.randn(shape, device=device)
    targets = torch.randint(21, (args.batch, args.size, args.size), device=device)
    rows = []
    for ratio in [None, *args.ratios]:
        model = copy.deepcopy(dense)
        if ratio is not None:
            backrazor.apply(model, ratio, args.scope)
        model = model.to(device)
        row = {"model": name, "ratio": ratio, **train_step_report(model, images, targets)}
        row["analytic_saved_bytes"] = backrazor.analytic_saved_bytes(model, shape)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in (
            "saved_activation_bytes",
            "step_seconds_median",
            "peak_rss_bytes",
            "cuda_peak_bytes",
            "analytic_saved_bytes",
        ):
            if row.get(key) is not None and base.get(key):
                row[f"{key}_vs_dense"] = row[key] / base[key]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["deeplabv3_mobilenetv2", "deeplabv3_resnet50"]
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.7, 0.9, 0.95])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--scope", default="backbone", choices=["backbone", "head", "all"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = select_device(args.device)
    results = [row for name in args.models for row in measure(name, args, device)]
    r50 = next(
        (r for r in results if r["model"] == "deeplabv3_resnet50" and r["ratio"] == 0.9), None
    )
    targets = None
    if r50 is not None:
        targets = {
            "resnet50_R0.9_saved_le_1/5": r50["saved_activation_bytes_vs_dense"] <= 0.2,
            "resnet50_R0.9_time_le_1.5x": r50["step_seconds_median_vs_dense"] <= 1.5,
        }
    print(
        json.dumps(
            {
                "benchmark": "backrazor",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "size": args.size,
                "scope": args.scope,
                "results": results,
                "targets_met": targets,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
