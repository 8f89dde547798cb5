"""torchrun with 2 CPU processes (gloo): training works, and evaluating its checkpoint with 2
processes gives exactly the single-process confusion matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from leanseg.engine.distributed import sync_batchnorm
from leanseg.methods import backrazor
from leanseg.models import build_model
from tests.test_cli import TINY, only_run


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "leanseg",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def single(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leanseg", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_two_process_training_and_sharded_eval_match_single_process(tmp_path):
    work, cache = tmp_path / "runs", tmp_path / "cache"
    args = [
        *TINY,
        f"data.root={cache}",
        f"train.work_dir={work}",
        "train.iterations=4",
        "train.val_interval=2",
        "data.synthetic_val=5",
    ]
    result = torchrun("train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(work)  # one run directory: rank 0 made it, rank 1 used the same
    assert result.stdout.count("best val mIoU") == 1  # only rank 0 reports
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["iteration"] == 4

    two, one = tmp_path / "two.json", tmp_path / "one.json"
    result = torchrun("eval", "--checkpoint", str(run / "last.pt"), "--out", str(two), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = single("eval", "--checkpoint", str(run / "last.pt"), "--out", str(one), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    matrix_two = json.loads(two.read_text())["confusion_matrix"]
    matrix_one = json.loads(one.read_text())["confusion_matrix"]
    assert matrix_two == matrix_one
    assert sum(map(sum, matrix_one)) > 0


def test_sync_batchnorm_converts_every_batchnorm_but_backrazor_frozen_ones():
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25)
    backrazor.apply(model, 0.9, scope="backbone", bn="frozen")
    frozen_type = backrazor.FrozenStatsBatchNorm2d
    frozen = {name for name, m in model.named_modules() if type(m) is frozen_type}
    bns = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert frozen and len(bns) > len(frozen)  # the head's BNs are not frozen
    converted = sync_batchnorm(model)
    for name, module in converted.named_modules():
        if name in frozen:
            assert type(module) is frozen_type, name
        elif name in bns:
            assert type(module) is torch.nn.SyncBatchNorm, name


def test_two_process_training_with_coupled_acosp_scores_and_frozen_backrazor_bn(tmp_path):
    """DDP with a Parameter shared by several convs and BN parameters that need no grad."""
    work, cache = tmp_path / "runs", tmp_path / "cache"
    methods = [
        "acosp.sparsity=0.5",
        "acosp.coupled_residual=true",
        "acosp.end=2",
        "backrazor.ratio=0.9",
        "backrazor.bn=frozen",
    ]
    args = [*TINY, f"data.root={cache}", f"train.work_dir={work}", *methods]
    result = torchrun("train", *args, "train.iterations=3", "train.val_interval=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(only_run(work) / "last.pt", weights_only=True)["state_dict"]
    stream = ["backbone.conv1", "backbone.layer1.0.conv2", "backbone.layer1.1.conv2"]
    scores = [state[f"{name}.acosp_score"] for name in stream]
    assert all(torch.equal(s, scores[0]) for s in scores)
    assert all(bool(state[f"{name}.acosp_hard"]) for name in stream)
