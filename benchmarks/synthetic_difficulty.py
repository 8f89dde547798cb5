"""How hard is the built-in synthetic dataset? Colour alone vs the default model.

    python benchmarks/synthetic_difficulty.py [--colour-iters 600] [--model-iters 2000]

Trains (1) a colour-only per-pixel classifier - a stack of 1x1 convolutions on RGB, so it
sees no shape, texture or context - and (2) the default leanseg model with the default recipe
but a longer schedule, on the same default synthetic dataset, and prints their val mIoU and
wall-clock times as one JSON object. Target: colour-only <= 0.25, default model >= 0.60
within 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from synthetic_runs import RECORDED_RECIPE
from torch import nn

from leanseg.config import load_config
from leanseg.data.build import build_datasets, train_loader, val_loader
from leanseg.engine.evaluate import evaluate
from leanseg.engine.trainer import Trainer


class ColourOnly(nn.Module):
    """Per-pixel MLP on RGB (1x1 convolutions): colour is all it can use."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


def colour_only(iterations: int) -> dict:
    cfg = load_config()
    train_set, val_set = build_datasets(cfg.data)
    model = ColourOnly(train_set.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    batches = iter(train_loader(train_set, cfg.data, seed=0, start_iteration=0, pin_memory=False))
    for _ in range(iterations):
        images, masks = next(batches)
        loss = F.cross_entropy(model(images)["out"], masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    matrix = evaluate(
        model,
        val_loader(val_set, cfg.data, pin_memory=False),
        num_classes=train_set.num_classes,
        device=torch.device("cpu"),
        progress=False,
    )
    metrics = matrix.compute()
    return {
        "miou": metrics.miou,
        "iterations": iterations,
        "seconds": time.perf_counter() - start,
        "metrics": metrics.to_dict(train_set.class_names),
    }


def default_model(iterations: int) -> dict:
    overrides = [
        *RECORDED_RECIPE,
        f"train.iterations={iterations}",
        f"train.val_interval={iterations}",
        "train.loggers=[]",
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(cfg, Path(run_dir), progress=False)
        metrics = trainer.fit()  # its progress lines go to stderr: stdout stays pure JSON
    return {
        "model": cfg.model.name,
        "options": cfg.model.options,
        "miou": metrics.miou,
        "iterations": iterations,
        "seconds": time.perf_counter() - start,
        "metrics": metrics.to_dict(trainer.class_names),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--colour-iters", type=int, default=600)
    parser.add_argument("--model-iters", type=int, default=2000)
    args = parser.parse_args()
    result = {
        "benchmark": "synthetic_difficulty",
        "threads": torch.get_num_threads(),
        "colour_only": colour_only(args.colour_iters),
        "default_model": default_model(args.model_iters),
    }
    result["targets_met"] = {
        "colour_only_le_0.25": result["colour_only"]["miou"] <= 0.25,
        "default_model_ge_0.60": result["default_model"]["miou"] >= 0.60,
        "default_model_le_30min": result["default_model"]["seconds"] <= 1800,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
