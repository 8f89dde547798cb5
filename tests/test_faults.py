"""Fault injection through the CLI: signals, kill -9, full disks, concurrent and failed resumes,
divergence and bad output paths. Every case checks the exit code, a one-line message without a
traceback, and that nothing the user had is lost or changed (docs/faults.md lists the cases).

Faults are injected by tests/fault_inject.py (the process signals itself at a chosen point) or
sent from outside at random times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leanseg.data.synthetic import ensure_synthetic

INJECT = Path(__file__).with_name("fault_inject.py")
TINY = [
    "model.options.channels=16",
    "model.options.width_mult=0.25",
    "data.crop_size=32",
    "data.batch_size=2",
    "data.synthetic_train=8",
    "data.synthetic_val=2",
    "data.workers=0",
    "train.loggers=[]",
    "train.log_interval=1",
    "train.sample_images=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    ensure_synthetic(path, num_train=8, num_val=2)
    return path


def args(cache: Path, work: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={cache}", f"train.work_dir={work}", *extra]


def leanseg(
    *cli: str, fault: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``leanseg cli...`` (with an injected fault ``POINT:N:SIGNAL[:REPEAT]``)."""
    prefix = [str(INJECT), fault, "--"] if fault else ["-m", "leanseg"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *prefix, *cli], capture_output=True, text=True, env=env, timeout=timeout
    )


def wait_for_training(child: subprocess.Popen) -> None:
    """Read the child's stdout up to its model summary: training starts right after it."""
    for line in child.stdout:
        if "parameters" in line:
            return


def popen(*cli: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "leanseg", *cli],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, and exactly one ``leanseg: error:`` line naming ``words``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("leanseg: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def only_run(work: Path) -> Path:
    runs = [p for p in work.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def temporaries(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> Path:
    """The uninterrupted 48-iteration run every interrupted one must equal bit for bit."""
    work = tmp_path_factory.mktemp("straight")
    proc = leanseg("train", *args(cache, work, *LONG))
    assert proc.returncode == 0, proc.stderr
    return only_run(work)


LONG = ["train.iterations=48", "train.val_interval=8"]
POINTS = {"loss": 3, "save": 2, "validate": 1, "sample": 6}  # point -> largest N drawn


def random_fault(rng: random.Random, signals: tuple[str, ...]) -> str:
    point = rng.choice(sorted(POINTS))
    repeat = rng.choice((1, 1, 2))  # sometimes a second Ctrl-C right behind the first
    return f"{point}:{rng.randint(1, POINTS[point])}:{rng.choice(signals)}:{repeat}"


def test_sigint_at_random_points_resumes_bit_for_bit(cache, tmp_path, straight):
    """>= 10 interruptions (SIGINT / SIGTERM, inside steps, saves, validation and data loading,
    some doubled, two sent from outside at random times); the resumed run equals the straight
    one bit for bit, metrics.jsonl row for row, with no temporary file left."""
    rng = random.Random(11)
    work = tmp_path / "runs"
    proc = leanseg("train", *args(cache, work, *LONG), fault="loss:2:INT")
    assert proc.returncode == 130, proc.stderr
    run = only_run(work)
    interrupts, outside, launches = 1, 0, 0
    while launches < 30:
        launches += 1
        if outside < 2 and interrupts in (4, 8):  # a real signal at a random moment
            child = popen("train", "--resume", str(run))
            wait_for_training(child)
            time.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=120)
            proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
            outside += 1
        else:
            proc = leanseg("train", "--resume", str(run), fault=random_fault(rng, ("INT", "TERM")))
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in (0, 130), proc.stderr
        assert (run / "last.pt").is_file() and not temporaries(run)
        if proc.returncode == 0:
            break
        interrupts += 1
        said = [line for line in proc.stdout.splitlines() if "written; continue with" in line]
        assert len(said) == 1 or "nothing was written" in proc.stderr, proc.stdout + proc.stderr
    if proc.returncode == 130:
        proc = leanseg("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    assert interrupts >= 10, interrupts
    assert_same_weights(straight / "last.pt", run / "last.pt")
    assert_same_weights(straight / "best.pt", run / "best.pt")
    assert rows(run) == rows(straight)


def test_sigkill_at_random_points_always_resumes(cache, tmp_path, straight):
    """kill -9 anywhere (before the first checkpoint, inside a save, in a step): the next start
    removes the temporary files (and says how much), the run resumes, and it ends bit for bit
    equal to the straight run."""
    rng = random.Random(5)
    work = tmp_path / "runs"
    proc = leanseg("train", *args(cache, work, *LONG), fault="loss:2:KILL")
    assert proc.returncode == -signal.SIGKILL
    run = only_run(work)
    assert not (run / "last.pt").exists()  # killed before its first checkpoint
    kills, stale, cleaned = 1, [], False
    for fault in ["save:1:KILL", "save:2:KILL"] + [random_fault(rng, ("KILL",)) for _ in range(4)]:
        proc = leanseg("train", "--resume", str(run), fault=fault)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert all(not path.exists() for path in stale), "a stale temporary survived a start"
        cleaned |= "temporary file(s) of interrupted writes" in proc.stdout
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
        stale = temporaries(run)
    proc = leanseg("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    assert kills >= 4 and cleaned
    assert not temporaries(run)
    assert_same_weights(straight / "last.pt", run / "last.pt")
    assert rows(run) == rows(straight)


def test_ctrl_c_to_the_process_group_with_loader_workers(cache, tmp_path, straight):
    """A terminal's Ctrl-C reaches the loader workers too: they ignore it, the main process
    stops cleanly, and the resumed run is still exact."""
    work = tmp_path / "runs"
    child = popen("train", *args(cache, work, *LONG, "data.workers=1"), start_new_session=True)
    wait_for_training(child)
    # signal once the first validation (iteration 8 of 48) has logged: a fixed sleep let a
    # quiet machine finish all 48 iterations first, and the late SIGINT hit the interpreter's
    # exit instead of the loop
    deadline = time.monotonic() + 120
    while not list(work.glob("*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err, err
    assert "written; continue with" in out
    run = only_run(work)
    proc = leanseg("train", "--resume", str(run), "data.workers=1")
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(straight / "last.pt", run / "last.pt")


def test_failed_resume_changes_nothing(cache, tmp_path):
    """#3: a resume that fails (another model) leaves config.yaml and last.pt as they were."""
    work = tmp_path / "runs"
    assert (
        leanseg("train", *args(cache, work, "train.iterations=6"), "--stop-at", "2").returncode == 0
    )
    run = only_run(work)
    before = digest(run / "config.yaml", run / "last.pt", run / "metrics.jsonl")
    proc = leanseg("train", "--resume", str(run), "model.name=deeplabv3_mobilenetv2")
    assert_one_line_error(proc, "does not fit the model")
    assert digest(run / "config.yaml", run / "last.pt", run / "metrics.jsonl") == before
    assert leanseg("train", "--resume", str(run)).returncode == 0


def test_concurrent_resume_is_refused(cache, tmp_path):
    """#7: a second process on a run directory is refused while the first one runs."""
    work = tmp_path / "runs"
    assert (
        leanseg("train", *args(cache, work, "train.iterations=400"), "--stop-at", "1").returncode
        == 0
    )
    run = only_run(work)
    first = popen("train", "--resume", str(run))
    try:
        wait_for_training(first)
        second = leanseg("train", "--resume", str(run))
        assert_one_line_error(second, "in use by process", str(first.pid))
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert leanseg("train", "--resume", str(run), "--stop-at", "400").returncode in (0,)


def test_sigint_during_a_save_then_a_second_one(cache, tmp_path):
    """#2: Ctrl-C twice while a checkpoint is written: the write completes, last.pt loads, and
    the message is true."""
    work = tmp_path / "runs"
    proc = leanseg(
        "train",
        *args(cache, work, "train.iterations=6", "train.val_interval=3"),
        fault="save:1:INT:2",
    )
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert "again: still finishing" in proc.stderr
    run = only_run(work)
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["iteration"] == 3 and not temporaries(run)
    assert f"{run / 'last.pt'} written" in proc.stdout


def test_divergence_saves_nothing(cache, tmp_path):
    """#8: lr=1e30 stops with one line naming the iteration; no checkpoint of the diverged
    state exists; a good last.pt from before stays byte for byte."""
    work = tmp_path / "runs"
    proc = leanseg("train", *args(cache, work, "optim.lr=1e30", "train.val_interval=1"))
    assert_one_line_error(proc, "diverged", "optim.lr")
    run = only_run(work)
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()

    good = tmp_path / "good"
    assert (
        leanseg("train", *args(cache, good, "train.iterations=8"), "--stop-at", "2").returncode == 0
    )
    run = only_run(good)
    before = digest(run / "last.pt", run / "config.yaml")
    proc = leanseg("train", "--resume", str(run), "optim.lr=1e30", "optim.warmup_iters=0")
    assert_one_line_error(proc, "diverged", "at iteration")
    assert digest(run / "last.pt") == {str(run / "last.pt"): before[str(run / "last.pt")]}


def test_nonfinite_loss_stop_or_skip(cache, tmp_path):
    """A NaN loss at iteration 3: ``stop`` (default) names the iteration; ``skip`` drops that
    batch and finishes with finite weights."""
    work = tmp_path / "stop"
    proc = leanseg("train", *args(cache, work, "train.iterations=5"), fault="nanloss:3:INT")
    assert_one_line_error(proc, "loss is nan at iteration 3", "train.on_nonfinite=skip")
    work = tmp_path / "skip"
    proc = leanseg(
        "train",
        *args(cache, work, "train.iterations=5", "train.on_nonfinite=skip"),
        fault="nanloss:3:INT",
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped batch of iteration 3" in proc.stdout + proc.stderr
    state = weights(only_run(work) / "last.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_full_disk_simulated covers ENOSPC")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_tmpfs(cache, tmp_path):
    """#10: a run directory on a tiny tmpfs: one line naming the file and 'No space', the last
    good checkpoint intact, no temporary left, and the run resumes once there is space."""
    with small_tmpfs(tmp_path / "disk", "14m") as disk:
        work = disk / "runs"
        proc = leanseg("train", *args(cache, work, "train.iterations=6", "train.val_interval=2"))
        line = assert_one_line_error(proc, "No space left on device", ".pt")
        run = only_run(work)
        assert "the previous file is unchanged" in line or "nothing was written" in line
        assert not temporaries(run)
        if (run / "last.pt").exists():
            assert torch.load(run / "last.pt", weights_only=True)["iteration"] >= 1
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert leanseg("train", "--resume", str(run)).returncode == 0


def test_full_disk_simulated(cache, tmp_path):
    """#10 without a tmpfs: every checkpoint write raises ENOSPC the way torch does."""
    work = tmp_path / "runs"
    proc = leanseg("train", *args(cache, work, "train.iterations=4"), fault="nospace:1:INT")
    assert_one_line_error(proc, "No space left on device", "cannot write checkpoint")
    assert not temporaries(only_run(work))


def test_bad_output_paths_fail_before_the_work(cache, tmp_path):
    """#12: eval --out in a missing folder fails before evaluating; work_dir that is a file;
    --stop-at -3."""
    work = tmp_path / "runs"
    assert leanseg("train", *args(cache, work, "train.iterations=2")).returncode == 0
    best = only_run(work) / "best.pt"
    proc = leanseg("eval", "--checkpoint", str(best), "--out", "/nonexistent/m.json")
    assert_one_line_error(proc, "/nonexistent", "--out")
    assert "mIoU" not in proc.stdout  # refused before the evaluation ran

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    proc = leanseg("train", *args(cache, a_file, "train.iterations=2"))
    assert_one_line_error(proc, "train.work_dir", str(a_file))
    assert a_file.read_text() == "keep me"

    proc = leanseg("train", *args(cache, tmp_path / "other"), "--stop-at", "-3")
    assert_one_line_error(proc, "--stop-at")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.options.width_mult=-1", "width_mult"),
        ("model.options.colour=1", "model.options.colour"),
        ("model.name=unet", "model.name"),
        ("data.dataset=voc", "train.txt"),
    ],
)
def test_failed_start_leaves_no_run_directory(cache, tmp_path, override, key):
    """#13: a start that fails on bad input writes nothing: no run directory, no data."""
    work = tmp_path / "runs"
    started = time.perf_counter()
    proc = leanseg("train", *args(cache, work), override)
    assert_one_line_error(proc, key)
    assert time.perf_counter() - started < 30
    assert not work.exists() or not any(work.iterdir())
