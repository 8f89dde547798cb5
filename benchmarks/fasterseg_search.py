"""FasterSeg search on this CPU: LUT, search with and without the latency loss, derive, train.

    python benchmarks/fasterseg_search.py [--work-dir /tmp/fasterseg_search_bench]
        [--runs 10] [--threads 1] [--lut PATH]

1. **LUT** (``--lut`` reuses one): onnxruntime, 1 thread, batch 1, fp32 at 512x1024, every
   entry of the original's search space (16 layers, fch 12: the reference student and teacher)
   and of this benchmark's (configs/fasterseg_search_synthetic.yaml), 7 and 19 classes.
   Kept in ``benchmarks/results/fasterseg_lut_cpu_onnxruntime_512x1024.json``.
2. **Search** with the synthetic recipe: pretrain, then search with lambda > 0 (the recipe's);
   then, from the same ``pretrain.pt`` (weights, data position, random state), the same search
   with ``search.latency_weight=0``. Each run's last epoch is derived (``search derive``).
3. **Train** both derived students and the reference student (``fasterseg_student``) with the
   same recipe and budget as benchmarks/fasterseg.py (800 iterations, batch 16, 112 px, OHEM,
   aux heads 0.2): val mIoU.
4. **LUT vs reality** for the reference student and teacher (19 classes) and both derived
   students (7): predicted latency (the LUT sum, :func:`spec_latency`) against the measured
   whole-network onnxruntime latency at 512x1024, same threads, all timed round-robin in one run;
   ratio measured / predicted; the ranking by prediction against the measured ranking.

Prints JSON; writes it to ``benchmarks/results/fasterseg_search.json`` and a plot of lambda,
the student's predicted latency and val mIoU over the search epochs (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fasterseg import FASTERSEG_LOSS
from fasterseg_latency import bench_models
from result_file import machine, write_result
from synthetic_runs import RECORDED_RECIPE, train_run

from leanseg.config import load_config
from leanseg.engine.search import search_space
from leanseg.engine.search_run import derive_run, start_search
from leanseg.methods.fasterseg.latency import load_lut, spec_latency
from leanseg.methods.fasterseg.lut_measure import lut_metadata, measure_entries, write_lut
from leanseg.methods.fasterseg.supernet import SearchSpace
from leanseg.methods.fasterseg.supernet_latency import lut_keys
from leanseg.models.fasterseg import FasterSeg, load_spec, packaged_spec

RESULTS = Path(__file__).parent / "results"
RECIPE = Path(__file__).parent.parent / "configs" / "fasterseg_search_synthetic.yaml"
LUT = RESULTS / "fasterseg_lut_cpu_onnxruntime_512x1024.json"
SIZE = (512, 1024)
TIMING = {"warmup": 5, "target_seconds": 0.05, "repeats": 3}
SYNTHETIC_CLASSES = 7


def measure_lut(path: Path, threads: int) -> dict[str, Any]:
    """The LUT of both search spaces (original and benchmark) at 512x1024."""
    bench_space = search_space(load_config(RECIPE))
    keys: list[str] = []
    for space in (SearchSpace(), bench_space):
        for classes in (19, SYNTHETIC_CLASSES):
            keys += lut_keys(space, SIZE, classes)
    keys = list(dict.fromkeys(keys))
    start = time.perf_counter()
    entries = measure_entries(
        keys, backend="onnxruntime", device=torch.device("cpu"), threads=threads, **TIMING
    )
    seconds = time.perf_counter() - start
    meta = lut_metadata(
        backend="onnxruntime",
        device="cpu",
        threads=threads,
        size=SIZE,
        num_classes=19,
        extra={
            "note": "the original's space and configs/fasterseg_search_synthetic.yaml's, "
            "heads for 7 and 19 classes",
            "measure_seconds": seconds,
        },
        **TIMING,
    )
    write_lut(path, entries, meta, overwrite=True)
    return {"entries": len(entries), "seconds": seconds}


def search(work: Path, name: str, overrides: list[str]) -> Path:
    """One search run of the recipe (reused when finished); its run directory."""
    run_dir = work / name
    done = run_dir / "benchmark_search.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["run_dir"])
    cfg = load_config(
        RECIPE,
        [f"train.work_dir={work}", f"train.name={name}", *RECORDED_RECIPE, *overrides],
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout stays pure JSON
        real_dir, _, _ = start_search(cfg, progress=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"run_dir": str(real_dir), "seconds": time.perf_counter() - start}))
    return real_dir


def search_history(run_dir: Path) -> list[dict[str, Any]]:
    """Per search epoch: lambda, the chosen student's predicted latency and its val mIoU."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] != "val" or row.get("phase") != "search":
            continue
        record = json.loads((run_dir / "arch" / f"epoch_{row['epoch']:03d}.json").read_text())
        student = record["archs"]["student"]
        pair = "02" if student["branches"] == [32, 8] else "12"
        rows.append(
            {
                "epoch": row["epoch"],
                "lambda": row["lambda"],
                "student_branches": student["branches"],
                "student_predicted_ms": student["recorded"][f"latency{pair}"],
                "student_val_miou": student["recorded"][f"mIoU{pair}"],
                "supernet_latency_ms": row.get("supernet_latency_ms/student"),
            }
        )
    return rows


def check_lut(table_path: Path, specs: dict[str, tuple[Any, int]], runs: int) -> dict[str, Any]:
    """Predicted vs measured onnxruntime latency of each (spec, classes), round-robin."""
    table = load_lut(table_path)
    models = {name: FasterSeg(spec, classes).eval() for name, (spec, classes) in specs.items()}
    measured = bench_models(models, SIZE, ["onnxruntime"], runs, warmup=2)
    report: dict[str, Any] = {"networks": {}}
    for name, (spec, classes) in specs.items():
        predicted = spec_latency(spec, table, size=SIZE, num_classes=classes).total
        ms = measured["models"][name]["onnxruntime"]
        report["networks"][name] = {
            "num_classes": classes,
            "predicted_ms": predicted,
            "measured_ms": ms["median_ms"],
            "measured_p10_ms": ms["p10_ms"],
            "measured_p90_ms": ms["p90_ms"],
            "ratio_measured_to_predicted": ms["median_ms"] / predicted,
            "parameters": measured["models"][name]["parameters"],
        }
    nets = report["networks"]
    report["rank_predicted"] = sorted(nets, key=lambda n: nets[n]["predicted_ms"])
    report["rank_measured"] = sorted(nets, key=lambda n: nets[n]["measured_ms"])
    report["ranking_matches"] = report["rank_predicted"] == report["rank_measured"]
    report["backend"] = measured["models"][next(iter(nets))]["onnxruntime"]["backend"]
    return report


def plot(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """lambda, predicted student latency and val mIoU per search epoch, both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    keys = [
        ("lambda", "lambda"),
        ("student_predicted_ms", "student LUT latency (ms)"),
        ("student_val_miou", "student val mIoU (supernet)"),
    ]
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name, rows in histories.items():
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xlabel("search epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("FasterSeg search on the synthetic set (LUT: onnxruntime, this CPU, 512x1024)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fasterseg_search_bench"))
    parser.add_argument("--lut", type=Path, help="reuse this LUT instead of measuring one")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds per network")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "fasterseg_search.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lut_path, lut_info = args.lut or LUT, {"reused": str(args.lut)}
    if args.lut is None:
        lut_info = measure_lut(LUT, args.threads)
    print(f"lut: {lut_info}", file=sys.stderr)
    table = [f"search.latency_table={lut_path}"]
    searched = search(args.work_dir, "search_lambda", table)
    pretrained = f"search.pretrained={searched / 'pretrain.pt'}"
    flat = search(args.work_dir, "search_lambda0", [*table, pretrained, "search.latency_weight=0"])
    students = {}
    for name, run_dir in (("derived_lambda", searched), ("derived_lambda0", flat)):
        students[name] = derive_run(run_dir, args.work_dir / f"{name}_specs")["student"]
    trained = {
        name: train_run(
            ["model.name=fasterseg", f"model.options.arch={path}", *FASTERSEG_LOSS],
            args.work_dir / f"train_{name}",
        )
        for name, path in students.items()
    }
    trained["reference_student"] = train_run(
        ["model.name=fasterseg_student", *FASTERSEG_LOSS], args.work_dir / "train_reference"
    )
    specs = {
        "reference_student": (packaged_spec("student"), 19),
        "reference_teacher": (packaged_spec("teacher"), 19),
        **{name: (load_spec(path), SYNTHETIC_CLASSES) for name, path in students.items()},
    }
    check = check_lut(lut_path, specs, args.runs)
    for name, entry in trained.items():
        check["networks"][name]["val_miou"] = entry["miou"]
        check["networks"][name]["train_seconds"] = entry["seconds"]
    histories = {"lambda > 0": search_history(searched), "lambda = 0": search_history(flat)}
    nets = check["networks"]
    report = {
        "benchmark": "fasterseg_search",
        "command": " ".join(["python", "benchmarks/fasterseg_search.py", *sys.argv[1:]]),
        "machine": machine(threads=args.threads),
        "lut": {"path": str(lut_path), **lut_info},
        "recipe": str(RECIPE.relative_to(RECIPE.parent.parent)),
        "search_runs": {"lambda > 0": str(searched), "lambda = 0": str(flat)},
        "derived_specs": {name: str(path) for name, path in students.items()},
        "lambda_student_faster": {
            "predicted": nets["derived_lambda"]["predicted_ms"]
            < nets["derived_lambda0"]["predicted_ms"],
            "measured": nets["derived_lambda"]["measured_ms"]
            < nets["derived_lambda0"]["measured_ms"],
        },
        **check,
        "search_history": histories,
        "total_seconds": time.perf_counter() - start,
    }
    write_result(report, args.out)
    plot(histories, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
