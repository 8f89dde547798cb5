"""Start or resume a training run without ever damaging its run directory.

Everything that can fail on bad input (config, model, data, the resumed checkpoint) runs before
anything is written: a new run directory is made only once the trainer is built, and a resumed
run's ``config.yaml`` is rewritten only after its checkpoint has loaded. One lock per run
directory keeps a second process out.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leanseg.config import Config, to_yaml
from leanseg.engine.distributed import broadcast, current
from leanseg.engine.metrics import SegMetrics
from leanseg.engine.run_dir import (
    RunLock,
    check_work_dir,
    claim,
    new_run_dir,
    remove_stale_temporaries,
    write_text_atomic,
)
from leanseg.engine.run_facts import efficiency, environment, train_stats, write_json
from leanseg.engine.trainer import Trainer, model_summary
from leanseg.errors import CheckpointError, ConfigError

Say = Callable[[str], None]


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves: its directory, trainer and last metrics."""

    run_dir: Path
    trainer: Trainer
    metrics: SegMetrics | None


def resume_paths(path: Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint) of ``--resume PATH``: a run directory or a checkpoint in it.

    A run directory without ``last.pt`` (killed before its first checkpoint) starts again from
    iteration 0; its ``config.yaml`` is still required.
    """
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"cannot resume: '{run_dir / 'config.yaml'}' not found; pass a run directory"
        )
    if path.is_file():
        return run_dir, path
    if not path.is_dir():
        raise CheckpointError(f"cannot resume: '{path}' not found; pass a run directory")
    last = run_dir / "last.pt"
    return run_dir, last if last.is_file() else None


def start_training(
    cfg: Config,
    *,
    resume: Path | None = None,
    stop_at: int | None = None,
    progress: bool | None = None,
    say: Say = print,
) -> RunResult:
    """Train ``cfg`` in a new run directory, or continue ``resume`` (see :func:`resume_paths`)."""
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"--stop-at {stop_at}: must be a positive iteration")
    info = current()
    if resume is not None:
        return _resume(cfg, resume, stop_at, progress, say)
    check_work_dir(cfg.train.work_dir)
    trainer = Trainer(cfg, None, progress=progress)
    run_dir = broadcast(_create(cfg) if info.is_main else None, info)
    lock = None
    try:
        if info.is_main:
            lock = claim(run_dir)
            write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)  # a start that failed leaves nothing
        raise
    return _fit(trainer, run_dir, lock, stop_at, say)


def _create(cfg: Config) -> Path:
    return new_run_dir(cfg.train.work_dir, cfg.train.name or f"{cfg.model.name}_{cfg.data.dataset}")


def _resume(
    cfg: Config, path: Path, stop_at: int | None, progress: bool | None, say: Say
) -> RunResult:
    run_dir, checkpoint = resume_paths(path)
    info = current()
    lock = claim(run_dir) if info.is_main else None
    try:
        trainer = Trainer(cfg, run_dir, progress=progress)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if stop_at is not None and stop_at <= trainer.iteration:
            raise ConfigError(
                f"--stop-at {stop_at}: the run is already at iteration {trainer.iteration}; "
                "pass a later iteration"
            )
        if info.is_main:
            tidy_resumed(run_dir, cfg, say)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    where = f"iteration {trainer.iteration} from {checkpoint}" if checkpoint else "iteration 0"
    say(f"run directory: {run_dir}")
    say(f"resumed at {where}")
    return _fit(trainer, run_dir, lock, stop_at, say, announced=True)


def tidy_resumed(run_dir: Path, cfg: Config, say: Say) -> None:
    """A resumed run, once its checkpoint loaded: remove the temporaries of interrupted writes
    and record overrides given with ``--resume`` in its config.yaml."""
    count, size = remove_stale_temporaries(run_dir)
    if count:
        say(f"removed {count} temporary file(s) of interrupted writes ({size / 1e6:.1f} MB)")
    if to_yaml(cfg) != (run_dir / "config.yaml").read_text():
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))


def _fit(
    trainer: Trainer,
    run_dir: Path,
    lock: RunLock | None,
    stop_at: int | None,
    say: Say,
    *,
    announced: bool = False,
) -> RunResult:
    trainer.run_dir = run_dir
    if not announced:
        say(f"run directory: {run_dir}")
    say(model_summary(trainer.model))
    say(f"compute: {trainer.compute.describe()}")
    main = current().is_main
    if main:
        record = {**trainer.compute.to_dict(), "device": str(trainer.device)}
        write_json(run_dir / "compute.json", record)
        write_json(run_dir / "environment.json", environment(trainer.device))
    first, start = trainer.iteration, time.perf_counter()
    try:
        metrics = trainer.fit(stop_at=stop_at)
        if main:
            seconds = time.perf_counter() - start
            images = (trainer.iteration - first) * trainer.images_per_iteration
            write_json(run_dir / "train_stats.json", train_stats(seconds, images, trainer.device))
            write_json(run_dir / "efficiency.json", efficiency(trainer.model, trainer.cfg))
    finally:
        if lock is not None:
            lock.release()
    return RunResult(run_dir, trainer, metrics)
