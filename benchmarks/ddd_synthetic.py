"""Does the DDD CRF help? The same model with and without it, same budget and seed.

    python benchmarks/ddd_synthetic.py [--work-dir runs/ddd_synthetic] [--iterations 800]
        [--crf-iters 5 --crf-gamma 2.0] [key.sub=value ...]

Trains the default recipe on the synthetic dataset twice with the same iterations, optimizer,
data order and seed: once as is, once with ``model.crf=ddd`` (the CRF on the decoder features).
Extra ``key.sub=value`` overrides go to both runs. A finished run is reused
(``synthetic_runs.train_run``). Prints JSON with both val mIoU values, the gain in points
(target: >= 1) and each run's wall-clock time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from synthetic_runs import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/ddd_synthetic")
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--crf-iters", type=int, default=5)
    parser.add_argument("--crf-gamma", type=float, default=2.0)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for both runs")
    args = parser.parse_args()
    work = Path(args.work_dir)
    common = [
        f"train.iterations={args.iterations}",
        f"train.val_interval={args.iterations}",
        *args.overrides,
    ]
    crf = [
        "model.crf=ddd",
        f"model.crf_iters={args.crf_iters}",
        f"model.crf_gamma={args.crf_gamma}",
    ]
    result: dict = {"benchmark": "ddd_synthetic", "threads": torch.get_num_threads()}
    result["baseline"] = train_run(common, work / "baseline")
    result["ddd"] = train_run([*common, *crf], work / "ddd")
    gain = 100 * (result["ddd"]["miou"] - result["baseline"]["miou"])
    result.update(iterations=args.iterations, overrides=args.overrides, miou_gain_points=gain)
    result["target_gain_ge_1_point"] = gain >= 1
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
