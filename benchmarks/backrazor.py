"""BackRazor memory and speed, side by side with dense training in one run.

    python benchmarks/backrazor.py [--models deeplabv3_mobilenetv2 deeplabv3_resnet50]
        [--ratios 0 0.7 0.9 0.95] [--scopes backbone all] [--batch 8 --size 256] [--rounds 3]
        [--value-dtypes activation float16 bfloat16] [--bn sparse dense frozen]
        [--precision auto|fp32|bf16|fp16] [--channels-last auto|true|false] [--no-fused-upsampling]

For each model: the dense model and a copy with BackRazor at each scope, ratio, value dtype and
BN mode (defaults: the activation's dtype, sparse BN; the original's choices), all trained in
the precision and memory format that ``train.precision`` / ``train.channels_last`` resolve to
(default ``auto``: leanseg's defaults on this machine) and with the loss upsampling the
model's feature-resolution logits (``loss.fused_upsampling``, default on). Per variant:
bytes saved for backward measured from the real saved tensors (parameters excluded), the
original's analytic estimate, peak RSS of a step above the resident level before it (and the
CUDA peak), each as a ratio to dense. Step times are taken round-robin over all variants
(``--rounds`` rounds after a warm-up round), so that drift on a shared machine hits every
variant alike. Targets at R=0.9, scope all, for deeplabv3_resnet50 under the defaults: saved
bytes <= 0.14 of dense, step time <= 1.2x dense.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from leanseg import build_model
from leanseg.bench import interleaved_step_seconds, train_step_report
from leanseg.config import CHOICES
from leanseg.engine.precision import resolve_compute
from leanseg.engine.runtime import select_device
from leanseg.methods import backrazor

_RATIO_KEYS = (
    "saved_activation_bytes",
    "analytic_saved_bytes",
    "peak_rss_step_bytes",
    "cuda_peak_bytes",
    "step_seconds_median",
)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    dense = build_model(name, num_classes=21, output_stride=16).to(device)
    shape = (args.batch, 3, args.size, args.size)
    images = torch.randn(shape, device=device)
    compute = resolve_compute(args.precision, args.channels_last, device, dense)
    setting = {"compute": compute.to_dict(), "fused_upsampling": args.fused_upsampling}
    targets = torch.randint(21, (args.batch, args.size, args.size), device=device)
    variants = [{"scope": None, "ratio": None, "value_dtype": None, "bn": None}] + [
        {"scope": s, "ratio": r, "value_dtype": None if v == "activation" else v, "bn": b}
        for s in args.scopes
        for r in args.ratios
        for v in args.value_dtypes
        for b in args.bn
    ]
    models, rows = [], []
    for variant in variants:
        model = copy.deepcopy(dense)
        if variant["ratio"] is not None:
            backrazor.apply(model, **variant)
        report = train_step_report(
            model,
            images,
            targets,
            steps=1,
            compute=compute,
            fused_upsampling=args.fused_upsampling,
        )
        del report["step_seconds_median"]  # timed below, interleaved
        report["analytic_saved_bytes"] = backrazor.analytic_saved_bytes(model, shape)
        rows.append({"model": name, **variant, **setting, **report})
        models.append(model)
    times = interleaved_step_seconds(
        models,
        images,
        targets,
        rounds=args.rounds,
        compute=compute,
        fused_upsampling=args.fused_upsampling,
    )
    for row, seconds in zip(rows, times, strict=True):
        row["step_seconds_median"] = seconds
    base = rows[0]
    for row in rows:
        for key in _RATIO_KEYS:
            if row.get(key) is not None and base.get(key):
                row[f"{key}_vs_dense"] = row[key] / base[key]
    return rows


def _targets(results: list[dict]) -> dict[str, bool]:
    met = {}
    for row in results:
        original = row["value_dtype"] is None and row["bn"] == "sparse"
        resnet50 = row["model"] == "deeplabv3_resnet50" and row["scope"] == "all"
        if resnet50 and row["ratio"] == 0.9 and original:
            met["resnet50_all_R0.9_saved_le_0.14"] = row["saved_activation_bytes_vs_dense"] <= 0.14
            met["resnet50_all_R0.9_time_le_1.2x"] = row["step_seconds_median_vs_dense"] <= 1.2
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["deeplabv3_mobilenetv2", "deeplabv3_resnet50"]
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.7, 0.9, 0.95])
    parser.add_argument(
        "--scopes", nargs="+", default=["backbone", "all"], choices=backrazor.SCOPES
    )
    parser.add_argument(
        "--value-dtypes",
        nargs="+",
        default=["activation"],
        choices=["activation", *backrazor.VALUE_DTYPES],
    )
    parser.add_argument("--bn", nargs="+", default=["sparse"], choices=backrazor.BN_MODES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=CHOICES["train.precision"])
    parser.add_argument("--channels-last", default="auto", choices=CHOICES["train.channels_last"])
    parser.add_argument("--no-fused-upsampling", dest="fused_upsampling", action="store_false")
    args = parser.parse_args()
    device = select_device(args.device)
    results = [row for name in args.models for row in measure(name, args, device)]
    print(
        json.dumps(
            {
                "benchmark": "backrazor",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "size": args.size,
                "rounds": args.rounds,
                "results": results,
                "targets_met": _targets(results),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
