"""ACoSP size and speed: dense models against physically shrunk ones, in one run.

    python benchmarks/acosp.py [--models deeplabv3_mobilenetv2 deeplabv3_resnet50 pspnet50]
        [--sparsities 0.5 0.75 0.875 0.9375] [--size 512] [--batch 1] [--runs 5 --warmup 2]
        [--threads N] [--device cpu] [--coupled-residual]

For each model (21 classes for all of them; DeepLab at output stride 16, PSPNet at its own OS8,
without the training-only aux head, which eval skips and shrink drops; other options at their
defaults): the dense model and,
per sparsity, a copy with ACoSP masks (``acosp.apply``; the N(0, 1) scores are left as they
are, which is fine for size and speed), hardened and then physically shrunk with
``acosp.shrink``. Per row: nominal compression ratio 1/(1-s), output-filter ratio (output
filters of the masked convs / kept ones), parameters and FLOPs of one eval forward and their
ratios dense / row, the largest output difference shrunk vs masked (at <= 128 px), and the
median forward latency. Latencies are timed round-robin: ``--warmup`` untimed rounds, then
``--runs`` rounds of one forward of every variant of a model, so drift on a shared machine hits
them alike. ``--coupled-residual`` adds, per sparsity, a row with ``coupled_residual=True``
(one score vector per residual group). Targets at s=0.75 for pspnet50 (published, independent
masks): >= 3.5x fewer parameters, >= 2.5x lower latency.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from leanseg import build_model
from leanseg.bench_model import (
    forward_flops,
    interleaved_forward_seconds,
    num_threads,
    parameter_counts,
)
from leanseg.engine.runtime import select_device
from leanseg.methods import acosp
from leanseg.models import model_options

NUM_CLASSES = 21
CHECK_SIZE = 128


def _dense(name: str, device: torch.device) -> nn.Module:
    accepted = model_options(name)
    options = {"output_stride": 16} if "output_stride" in accepted else {}
    if "aux" in accepted:
        options["aux"] = False
    return build_model(name, num_classes=NUM_CLASSES, **options).to(device).eval()


@torch.inference_mode()
def _out(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)["out"]


def _pruned(
    dense: nn.Module, sparsity: float, coupled: bool, check: torch.Tensor
) -> tuple[nn.Module, dict]:
    """A hardened ACoSP copy of ``dense``, physically shrunk, and its row."""
    model = acosp.apply(copy.deepcopy(dense), sparsity, coupled_residual=coupled)
    acosp.harden(model)
    convs = [conv for _, conv in acosp.masked_convs(model)]
    total = sum(conv.out_channels for conv in convs)
    kept = sum(int(conv.acosp_mask.sum()) for conv in convs)
    row = {
        "sparsity": sparsity,
        "coupled_residual": coupled,
        "nominal_cr": 1 / (1 - sparsity),
        "filter_cr": total / kept,
        "filters_total": total,
        "filters_kept": kept,
    }
    reference = _out(model, check)
    model = acosp.shrink(model)
    row["max_abs_diff_vs_masked"] = float((_out(model, check) - reference).abs().max())
    return model.eval(), row


def measure(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    dense = _dense(name, device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    check = images[:1, :, :CHECK_SIZE, :CHECK_SIZE]
    models = [dense]
    rows = [{"sparsity": None, "nominal_cr": 1.0, "filter_cr": 1.0}]
    couplings = [False, True] if args.coupled_residual else [False]
    for sparsity in args.sparsities:
        for coupled in couplings:
            model, row = _pruned(dense, sparsity, coupled, check)
            models.append(model)
            rows.append(row)
    for model, row in zip(models, rows, strict=True):
        row.update(parameter_counts(model))
        row["flops"] = forward_flops(model, images)
    times = interleaved_forward_seconds(models, images, runs=args.runs, warmup=args.warmup)
    base = rows[0]
    for row, seconds in zip(rows, times, strict=True):
        row["latency_seconds_median"] = seconds[len(seconds) // 2]
        row["params_ratio"] = base["parameters"] / row["parameters"]
        row["flops_ratio"] = base["flops"] / row["flops"]
        row["speedup"] = base["latency_seconds_median"] / row["latency_seconds_median"]
    return [{"model": name, **row} for row in rows]


def _targets(results: list[dict]) -> dict[str, bool]:
    met = {}
    for row in results:
        if row["model"] == "pspnet50" and row["sparsity"] == 0.75 and not row["coupled_residual"]:
            met["pspnet50_s0.75_params_ge_3.5x"] = row["params_ratio"] >= 3.5
            met["pspnet50_s0.75_latency_ge_2.5x"] = row["speedup"] >= 2.5
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["deeplabv3_mobilenetv2", "deeplabv3_resnet50", "pspnet50"]
    )
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.875, 0.9375])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (raise for less noise)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch threads (default: the current number)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--coupled-residual", action="store_true", help="add coupled rows")
    args = parser.parse_args()
    device = select_device(args.device)
    with num_threads(args.threads) as threads:
        results = [row for name in args.models for row in measure(name, args, device)]
    print(
        json.dumps(
            {
                "benchmark": "acosp",
                "device": str(device),
                "threads": threads,
                "num_classes": NUM_CLASSES,
                "batch": args.batch,
                "size": args.size,
                "runs": args.runs,
                "warmup": args.warmup,
                "results": results,
                "targets_met": _targets(results),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
