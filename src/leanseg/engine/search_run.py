"""Start or resume a search run, and derive its networks, without damaging its directory.

As for training (:mod:`.train_run`): the config, the latency table, the data and a resumed
checkpoint are all loaded before anything is written; a new run directory is created only once
the searcher exists; one lock per run directory keeps a second process out.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from leanseg.config import Config, to_yaml
from leanseg.engine.run_dir import check_work_dir, claim, new_run_dir, write_text_atomic
from leanseg.engine.search import ARCH_FORMAT, Searcher
from leanseg.engine.train_run import Say, resume_paths, tidy_resumed
from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.handover import derive_branches
from leanseg.methods.fasterseg.supernet import SearchSpace
from leanseg.models.fasterseg.spec import dumps_spec


def start_search(
    cfg: Config,
    *,
    resume: Path | None = None,
    stop_at: int | None = None,
    progress: bool | None = None,
    say: Say = print,
) -> tuple[Path, Searcher, dict[str, Any]]:
    """Search ``cfg`` in a new run directory, or continue ``resume``; returns (run directory,
    searcher, the last epoch's validation summary)."""
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"--stop-at {stop_at}: must be a positive step")
    if resume is not None:
        run_dir, checkpoint = resume_paths(resume)
        lock = claim(run_dir)
        try:
            searcher = Searcher(cfg, run_dir, progress=progress)
            if checkpoint is not None:
                searcher.resume(checkpoint)
            if stop_at is not None and stop_at <= searcher.step:
                raise ConfigError(
                    f"--stop-at {stop_at}: the search is already at step {searcher.step}; "
                    "pass a later step"
                )
            tidy_resumed(run_dir, cfg, say)
        except BaseException:
            lock.release()
            raise
        say(f"run directory: {run_dir}")
        say(f"resumed at step {searcher.step}")
    else:
        check_work_dir(cfg.train.work_dir)
        searcher = Searcher(cfg, None, progress=progress)
        run_dir = new_run_dir(cfg.train.work_dir, cfg.train.name or f"search_{cfg.data.dataset}")
        lock = None
        try:
            lock = claim(run_dir)
            write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        except BaseException:
            if lock is not None:
                lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        say(f"run directory: {run_dir}")
    searcher.run_dir = run_dir
    params = sum(p.numel() for p in searcher.supernet.weight_parameters())
    say(f"supernet: {params / 1e6:.2f}M weights, {searcher.total_steps()} steps")
    try:
        summary = searcher.fit(stop_at=stop_at)
    finally:
        lock.release()
    return run_dir, searcher, summary


def arch_record(run_dir: Path, epoch: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The ``arch/epoch_NNN.json`` of ``run_dir`` (the last one when ``epoch`` is None)."""
    folder = run_dir / "arch"
    files = sorted(folder.glob("epoch_*.json")) if folder.is_dir() else []
    if not files:
        raise ConfigError(
            f"'{run_dir}': no arch/epoch_*.json; give a search run directory that finished at "
            "least one search epoch"
        )
    path = files[-1] if epoch is None else folder / f"epoch_{epoch:03d}.json"
    if not path.is_file():
        epochs = [int(f.stem.split("_")[1]) for f in files]
        raise ConfigError(f"--epoch {epoch}: not saved in '{folder}'; saved epochs: {epochs}")
    record = json.loads(path.read_text())
    if record.get("format") != ARCH_FORMAT:
        raise ConfigError(f"'{path}': not a leanseg search architecture file")
    return path, record


def derive_run(
    run_dir: Path, output_dir: Path | None = None, epoch: int | None = None
) -> dict[str, Path]:
    """Write ``teacher.json`` and ``student.json`` (part 1's spec files) derived from a search
    epoch's architecture parameters, with the branches chosen at that epoch; never replaces a
    different file."""
    path, record = arch_record(run_dir, epoch)
    space = SearchSpace.from_dict(record["space"])
    out = output_dir or run_dir / "derived" / path.stem
    written = {}
    texts = {}
    for name, arch in record["archs"].items():
        spec = derive_branches(space, name, arch["tensors"], tuple(arch["branches"]))
        meta = {**spec.meta, "epoch": record["epoch"], "derived_from": str(path)}
        texts[name] = dumps_spec(replace(spec, meta=meta)) + "\n"
    for name, text in texts.items():
        target = out / f"{name}.json"
        if target.exists() and target.read_text() != text:
            raise ConfigError(f"'{target}' exists and differs; choose another -o directory")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_text_atomic(out / f"{name}.json", text)
        written[name] = out / f"{name}.json"
    return written
