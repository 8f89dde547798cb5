"""ACoSP quality against compression on the synthetic dataset, same budget for every run.

    python benchmarks/acosp_synthetic.py [--work-dir runs/acosp_synthetic] [--iterations 800]
        [--harden-at 0.4] [--sparsities 0.5 0.75 0.875 0.9375] [--plot acosp_synthetic.png]
        [--coupled-residual]

Trains the default recipe (deeplabv3plus_resnet18, width 0.5, synthetic data) once without
masks and once per sparsity with ACoSP (soft masks annealed from the start, hard from
``--harden-at`` of the run on), all with the same iterations, optimizer and seed; with
``--coupled-residual`` also once per sparsity with ``acosp.coupled_residual=true`` ("ACoSP-4c").
Each run's final val mIoU is measured on the hard-masked model, which is then shrunk
physically and its parameters counted. A finished run is reused (``synthetic_runs.train_run``).
Prints JSON and writes a PNG of mIoU against the compression ratio (needs matplotlib:
``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from synthetic_runs import train_run

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
from leanseg.methods import acosp


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "acosp_" not in name)


def train(name: str, overrides: list[str], work: Path) -> dict:
    """Train one run into ``work/name`` (or reuse it); returns its figures."""
    run_dir = work / name
    figures = train_run(overrides, run_dir)
    model = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"), str(run_dir))
    figures["parameters"] = _parameters(model)
    if any(True for _ in acosp.masked_convs(model)):
        figures["shrunk_parameters"] = _parameters(acosp.shrink(model))
    return figures


def plot(rows: list[dict], path: Path) -> None:
    """mIoU against the nominal compression ratio (log2 axis), dense at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({row["nominal_cr"] for row in rows})
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    dense = [row for row in rows if row["sparsity"] == 0]
    for coupled, label in ((False, "independent masks"), (True, "coupled residual")):
        series = dense + [r for r in rows if r["sparsity"] and r["coupled_residual"] == coupled]
        if len(series) > len(dense):
            x = [row["nominal_cr"] for row in series]
            ax.plot(x, [100 * row["miou"] for row in series], "o-", label=label)
    if any(row["coupled_residual"] for row in rows):
        ax.legend(fontsize=7)
    for row in rows:
        ax.annotate(
            row["name"],
            (row["nominal_cr"], 100 * row["miou"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("compression ratio 1/(1-s)")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("ACoSP on the synthetic dataset, same budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/acosp_synthetic")
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--harden-at", type=float, default=0.4)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.875, 0.9375])
    parser.add_argument("--plot", default="acosp_synthetic.png")
    parser.add_argument("--coupled-residual", action="store_true", help="add coupled runs")
    args = parser.parse_args()
    work = Path(args.work_dir)
    budget = [f"train.iterations={args.iterations}", f"train.val_interval={args.iterations}"]
    harden = round(args.harden_at * args.iterations)
    runs = {"dense": (0.0, False, budget)}
    for s in args.sparsities:
        name = f"ACoSP-{1 / (1 - s):g}"
        masks = [*budget, f"acosp.sparsity={s}", f"acosp.end={harden}"]
        runs[name] = (s, False, masks)
        if args.coupled_residual:
            runs[f"{name}c"] = (s, True, [*masks, "acosp.coupled_residual=true"])
    rows = []
    for name, (sparsity, coupled, overrides) in runs.items():
        row = {"name": name, "sparsity": sparsity, "nominal_cr": 1 / (1 - sparsity)}
        row["coupled_residual"] = coupled
        rows.append({**row, **train(name, overrides, work)})
    dense = rows[0]["parameters"]
    for row in rows:
        kept = row.get("shrunk_parameters", row["parameters"])
        row["parameter_cr"] = dense / kept
    plot(rows, Path(args.plot))
    result = {
        "benchmark": "acosp_synthetic",
        "threads": torch.get_num_threads(),
        "iterations": args.iterations,
        "harden_at_iteration": harden,
        "plot": args.plot,
        "results": rows,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
