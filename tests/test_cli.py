"""End-to-end CLI: train / eval / predict on a tiny synthetic set, resume, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from leanseg.cli import main
from leanseg.data.synthetic import ensure_synthetic

TINY = [
    "model.name=deeplabv3plus_resnet18",
    "model.options.channels=16",
    "model.options.width_mult=0.25",
    "data.crop_size=64",
    "data.batch_size=4",
    "data.synthetic_train=16",
    "data.synthetic_val=3",
    "data.workers=0",
    "train.loggers=[]",
    "train.log_interval=1",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    ensure_synthetic(path, num_train=16, num_val=3)
    return path


def tiny(cache: Path, work: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={cache}", f"train.work_dir={work}", *extra]


def only_run(work: Path) -> Path:
    runs = sorted(p for p in work.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "leanseg", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_train_eval_predict_end_to_end(cache, tmp_path, capsys):
    work = tmp_path / "runs"
    assert main(["train", *tiny(cache, work, "train.iterations=4", "train.val_interval=2")]) == 0
    out = capsys.readouterr().out
    run = only_run(work)
    assert out.count(f"run directory: {run}") == 2
    assert "mIoU" in out and "background" in out  # the per-class table
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.jsonl", "final_metrics.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")), "a temporary checkpoint was left behind"
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["iteration"] == 4

    assert (
        main(["eval", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "m.json")]) == 0
    )
    assert "mIoU" in capsys.readouterr().out
    assert (tmp_path / "m.json").is_file()

    images = Path(cache).glob("synthetic-*/JPEGImages/*.jpg")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for src in sorted(images)[:2]:
        shutil.copy(src, inputs / src.name)
    out_dir = tmp_path / "pred"
    assert (
        main(["predict", "--checkpoint", str(run / "last.pt"), str(inputs), "-o", str(out_dir)])
        == 0
    )
    stems = [p.stem for p in sorted(inputs.iterdir())]
    for stem in stems:
        index = Image.open(out_dir / f"{stem}.png")
        assert index.mode == "P"
        assert index.size == Image.open(inputs / f"{stem}.jpg").size
        assert np.asarray(index).max() < 7
        assert (out_dir / f"{stem}_color.png").is_file()
        assert (out_dir / f"{stem}_overlay.png").is_file()

    # the saved config alone relaunches the run
    relaunch = tmp_path / "again"
    assert (
        main(
            [
                "train",
                "-c",
                str(run / "config.yaml"),
                f"train.work_dir={relaunch}",
                "train.iterations=1",
            ]
        )
        == 0
    )
    assert (only_run(relaunch) / "last.pt").is_file()


def test_resume_gives_identical_weights(cache, tmp_path):
    steps = ["train.iterations=6", "train.val_interval=3", "data.workers=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *tiny(cache, straight, *steps)]) == 0
    assert main(["train", *tiny(cache, split, *steps), "--stop-at", "3"]) == 0
    run = only_run(split)
    halfway = torch.load(run / "last.pt", weights_only=True)
    assert halfway["iteration"] == 3
    assert main(["train", "--resume", str(run)]) == 0
    a = torch.load(only_run(straight) / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert b["iteration"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # and the second half did train
    assert any(not torch.equal(halfway["state_dict"][k], v) for k, v in a["state_dict"].items())


def make_voc_copy(cache: Path, dest: Path) -> Path:
    src = next(Path(cache).glob("synthetic-*"))
    shutil.copytree(src, dest)
    return dest


def first_id(root: Path) -> str:
    return (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]


def corrupt_jpeg(root: Path) -> str:
    path = root / "JPEGImages" / f"{first_id(root)}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return path.name


def wrong_size_mask(root: Path) -> str:
    path = root / "SegmentationClass" / f"{first_id(root)}.png"
    img = Image.open(path)
    img.resize((img.width + 3, img.height)).save(path)
    return path.name


def bad_label(root: Path) -> str:
    path = root / "SegmentationClass" / f"{first_id(root)}.png"
    img = Image.open(path)
    arr = np.asarray(img).copy()
    arr[0, 0] = 9
    out = Image.fromarray(arr, mode="P")
    out.putpalette(img.getpalette())
    out.save(path)
    return path.name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train.iteratons=3"], "unknown config key 'train.iteratons'"),
        (["train.iterations=many"], "config key 'train.iterations': expected int"),
        (["data.dataset=voc", "data.root=/no/such/VOC2012"], "/no/such/VOC2012"),
    ],
)
def test_config_and_path_errors_are_one_line(cache, tmp_path, args, expected):
    result = run_cli("train", *tiny(cache, tmp_path / "runs"), *args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("damage", "expected", "workers"),
    [
        (corrupt_jpeg, "cannot decode", "0"),
        (wrong_size_mask, "size", "1"),  # raised inside a DataLoader worker
        (bad_label, "9", "0"),
    ],
)
def test_bad_data_is_one_line(cache, tmp_path, damage, expected, workers):
    root = make_voc_copy(cache, tmp_path / "VOC2012")
    name = damage(root)
    result = run_cli(
        "train",
        *tiny(cache, tmp_path / "runs"),
        "data.dataset=voc",
        f"data.root={root}",
        "data.num_classes=7",
        f"data.workers={workers}",
        "train.iterations=50",
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "Traceback" not in line
    assert name in line and expected in line, line


def test_bad_checkpoint_is_one_line(tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a checkpoint")
    result = run_cli("eval", "--checkpoint", str(fake))
    assert result.returncode == 2
    assert "fake.pt" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("predict", "--checkpoint", str(tmp_path / "none.pt"), str(tmp_path))
    assert missing.returncode == 2 and "none.pt" in missing.stderr


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "predict"):
        assert command in result.stdout


def test_amp_bf16_training_on_cpu(cache, tmp_path):
    work = tmp_path / "runs"
    args = tiny(cache, work, "train.iterations=2", "train.val_interval=2", "train.precision=bf16")
    assert main(["train", *args]) == 0
    payload = torch.load(only_run(work) / "last.pt", weights_only=True)
    assert payload["iteration"] == 2
    assert all(
        torch.isfinite(v).all() for v in payload["state_dict"].values() if v.is_floating_point()
    )
    assert payload["config"]["train"]["precision"] == "bf16"
    compute = json.loads((only_run(work) / "compute.json").read_text())
    assert compute["precision"] == "bf16" and compute["channels_last"] is True


def test_pretrained_weights_load_through_the_config(cache, tmp_path, capsys):
    from leanseg import build_model

    donor = build_model("deeplabv3plus_resnet18", 7, width_mult=0.25, channels=16)
    weights = tmp_path / "imagenet.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in donor.backbone.state_dict().items()}}, weights
    )
    work = tmp_path / "runs"
    args = tiny(
        cache,
        work,
        "train.iterations=2",
        "train.val_interval=2",
        f"model.pretrained={weights}",
        "optim.lr=1e-12",
        "optim.min_lr=0",
    )
    assert main(["train", *args]) == 0
    assert "pretrained weights:" in capsys.readouterr().out
    trained = torch.load(only_run(work) / "last.pt", weights_only=True)["state_dict"]
    key = "backbone.conv1.weight"
    assert torch.allclose(trained[key], donor.backbone.state_dict()["conv1.weight"], atol=1e-6)

    missing = run_cli("train", *tiny(cache, tmp_path / "r2"), "model.pretrained=/no/such.pth")
    assert missing.returncode == 2 and "/no/such.pth" in missing.stderr


def test_data_check_cli_finds_planted_defects(cache, tmp_path):
    root = make_voc_copy(cache, tmp_path / "VOC2012")
    clean = ["data.dataset=voc", f"data.root={root}", "data.num_classes=7", "--no-progress"]
    assert run_cli("data", "check", *clean).returncode == 0
    name = bad_label(root)
    result = run_cli("data", "check", *clean)
    assert result.returncode == 1
    assert name in result.stdout


def test_backrazor_is_a_config_switch(cache, tmp_path, capsys):
    work = tmp_path / "runs"
    options = ["backrazor.ratio=0.9", "backrazor.bn=frozen", "backrazor.value_dtype=bfloat16"]
    args = tiny(cache, work, "train.iterations=2", "train.val_interval=2", *options)
    assert main(["train", *args]) == 0
    run = only_run(work)
    saved = yaml.safe_load((run / "config.yaml").read_text())["backrazor"]
    assert (saved["bn"], saved["value_dtype"]) == ("frozen", "bfloat16")
    # the checkpoint is a plain model's: leanseg eval rebuilds it without BackRazor
    assert main(["eval", "--checkpoint", str(run / "last.pt")]) == 0
    assert "mIoU" in capsys.readouterr().out
    bad = run_cli("train", *tiny(cache, tmp_path / "r2"), "backrazor.ratio=1.5")
    assert bad.returncode == 2 and "backrazor.ratio" in bad.stderr
    bad = run_cli(
        "train", *tiny(cache, tmp_path / "r3"), "backrazor.ratio=0.9", "backrazor.bn=sync"
    )
    assert bad.returncode == 2 and "backrazor.bn" in bad.stderr
