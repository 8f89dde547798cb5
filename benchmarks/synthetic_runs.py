"""Training runs for the benchmarks: one config per run directory, a finished run is reused."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from leanseg.config import load_config
from leanseg.engine.trainer import Trainer

# The recipe the recorded synthetic-training results were measured with, before issue 15 made
# bf16 autocast, the fused loss and AdamW lr 4e-3 the defaults: pinned so that a re-run trains
# the recorded recipe (a benchmark's own overrides come after these).
RECORDED_RECIPE = ["optim.lr=0.002", "train.precision=fp32", "loss.fused_upsampling=false"]


def train_run(overrides: list[str], run_dir: Path, *, reuse: bool = True) -> dict:
    """Train ``overrides`` (on the defaults and :data:`RECORDED_RECIPE`) in ``run_dir``; returns
    final val mIoU and seconds.

    The figures are kept in ``run_dir/benchmark_run.json``; with ``reuse``, a run that has one
    is not repeated. Training output goes to stderr, so a benchmark's stdout stays pure JSON.
    """
    done = run_dir / "benchmark_run.json"
    if not (reuse and done.is_file()):
        cfg = load_config(None, ["train.loggers=[]", *RECORDED_RECIPE, *overrides])
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            metrics = Trainer(cfg, run_dir, progress=False).fit()
        done.write_text(json.dumps({"miou": metrics.miou, "seconds": time.perf_counter() - start}))
    return json.loads(done.read_text())
