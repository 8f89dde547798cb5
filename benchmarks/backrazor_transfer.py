"""Does BackRazor fine-tune as well as dense training? Same budget, same pretrained weights.

    python benchmarks/backrazor_transfer.py [--work-dir runs/backrazor_transfer]
        [--pretrain-iters 800] [--finetune-iters 300] [--ratio 0.9]

1. Pretrain the default recipe on the synthetic set (seed 0); the checkpoint is written once
   into the work dir and reused by later runs.
2. Fine-tune it on a second synthetic task - another generator seed (new images, layouts and
   colours) with only 300 training images - once densely and once with BackRazor at --ratio,
   with the same iterations, optimizer and seed.
Prints JSON with both val mIoU values and the gap (target: <= 2 points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from synthetic_runs import train_run

FINETUNE_TASK = ["data.synthetic_seed=1", "data.synthetic_train=300", "data.synthetic_val=100"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/backrazor_transfer")
    parser.add_argument("--pretrain-iters", type=int, default=800)
    parser.add_argument("--finetune-iters", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.9)
    args = parser.parse_args()
    work = Path(args.work_dir)
    pretrained = work / "pretrain" / "last.pt"
    result: dict = {"benchmark": "backrazor_transfer", "threads": torch.get_num_threads()}
    if not pretrained.is_file():
        budget = [
            f"train.iterations={args.pretrain_iters}",
            f"train.val_interval={args.pretrain_iters}",
        ]
        figures = train_run(budget, work / "pretrain", reuse=False)
        result["pretrain"] = {**figures, "iterations": args.pretrain_iters}
    common = [
        *FINETUNE_TASK,
        f"model.pretrained={pretrained}",
        "optim.lr=0.0005",
        "optim.warmup_iters=0",
        f"train.iterations={args.finetune_iters}",
        f"train.val_interval={args.finetune_iters}",
    ]
    runs = {"dense": [], f"backrazor_{args.ratio}": [f"backrazor.ratio={args.ratio}"]}
    for name, extra in runs.items():
        figures = train_run([*common, *extra], work / name, reuse=False)
        result[name] = {**figures, "iterations": args.finetune_iters}
    gap = result["dense"]["miou"] - result[f"backrazor_{args.ratio}"]["miou"]
    result["miou_gap_points"] = 100 * gap
    result["target_gap_le_2_points"] = 100 * gap <= 2
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
