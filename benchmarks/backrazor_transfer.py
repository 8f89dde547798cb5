"""Does BackRazor fine-tune as well as dense training? Same budget, same pretrained weights.

    python benchmarks/backrazor_transfer.py [--work-dir runs/backrazor_transfer]
        [--pretrain-iters 800] [--finetune-iters 300] [--ratio 0.9]
        [--bn sparse frozen] [--value-dtypes activation bfloat16]

1. Pretrain the default recipe on the synthetic set (seed 0); the checkpoint is written once
   into the work dir and reused by later runs.
2. Fine-tune it on a second synthetic task - another generator seed (new images, layouts and
   colours) with only 300 training images - once densely and once with BackRazor at --ratio,
   with the same iterations, optimizer and seed; one BackRazor run per BN mode and value dtype
   (default: sparse BN, the activation's dtype - the original's choices).
Prints JSON with the val mIoU values and each BackRazor run's gap to dense (target: <= 2
points for the original's choices).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from synthetic_runs import train_run

from leanseg.methods.backrazor import BN_MODES, VALUE_DTYPES

FINETUNE_TASK = ["data.synthetic_seed=1", "data.synthetic_train=300", "data.synthetic_val=100"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/backrazor_transfer")
    parser.add_argument("--pretrain-iters", type=int, default=800)
    parser.add_argument("--finetune-iters", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--bn", nargs="+", default=["sparse"], choices=BN_MODES)
    parser.add_argument(
        "--value-dtypes",
        nargs="+",
        default=["activation"],
        choices=["activation", *VALUE_DTYPES],
    )
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
    runs = {"dense": []}
    for bn in args.bn:
        for dtype in args.value_dtypes:
            options = [f"backrazor.ratio={args.ratio}", f"backrazor.bn={bn}"]
            if dtype != "activation":
                options.append(f"backrazor.value_dtype={dtype}")
            original = bn == "sparse" and dtype == "activation"
            runs[f"backrazor_{args.ratio}" + ("" if original else f"_{bn}_{dtype}")] = options
    for name, extra in runs.items():
        figures = train_run([*common, *extra], work / name, reuse=False)
        result[name] = {**figures, "iterations": args.finetune_iters}
        if name != "dense":
            result[name]["miou_gap_points"] = 100 * (result["dense"]["miou"] - figures["miou"])
    original = result.get(f"backrazor_{args.ratio}")
    if original is not None:
        result["target_gap_le_2_points"] = original["miou_gap_points"] <= 2
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
