"""Everything ``leanseg report`` shows of one run, read from its run directory.

Only what the directory holds: ``config.yaml``, ``metrics.jsonl``, ``final_metrics.json``
(``eval_metrics.json`` from ``leanseg eval --report`` wins), ``compute.json``,
``environment.json``, ``efficiency.json``, ``train_stats.json``, ``bench_model.json``,
``bench_memory.json`` and ``samples/*.png``. Each missing piece is named in ``missing`` with the
command that makes it, and the page says so instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanseg.errors import LeansegError


class ReportError(LeansegError):
    """A run directory that cannot be reported, or runs that cannot be compared."""


@dataclass
class RunRecord:
    """One run directory's figures, as read."""

    path: Path
    name: str
    config: dict[str, Any]
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    val_rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None  # final per-class metrics (+ confusion_matrix)
    metrics_source: str | None = None
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> JSON record
    samples: list[bytes] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # what -> how to get it

    @property
    def class_names(self) -> list[str] | None:
        """Class names of the final metrics, else of the config; None if neither says."""
        if self.metrics and isinstance(self.metrics.get("iou"), dict):
            return list(self.metrics["iou"])
        names = self.config.get("data", {}).get("class_names")
        return list(names) if names else None

    @property
    def total_iterations(self) -> int | None:
        return self.config.get("train", {}).get("iterations")

    @property
    def last_iteration(self) -> int:
        rows = self.train_rows + self.val_rows
        return max((int(r["iteration"]) for r in rows), default=0)


FACTS = {
    "compute": "trained by leanseg before compute.json was recorded",
    "environment": "trained by leanseg before environment.json was recorded",
    "efficiency": "written when training finishes",
    "train_stats": "written when training finishes",
    "bench_model": "leanseg bench model --checkpoint RUN/best.pt",
    "bench_memory": "leanseg bench memory --checkpoint RUN/best.pt",
}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"'{path}' is not readable JSON ({err}); remove or fix it") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ReportError(
                f"'{path}' line {number} is not JSON; remove the line or the file"
            ) from None
    return rows


def read_run(path: Path) -> RunRecord:
    """The :class:`RunRecord` of run directory ``path`` (one line naming it if it is none)."""
    config_file = path / "config.yaml"
    if not path.is_dir() or not config_file.is_file():
        raise ReportError(
            f"'{path}' is not a run directory (no config.yaml); pass the directory "
            "`leanseg train` printed"
        )
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"'{config_file}' is not valid YAML: {err}".splitlines()[0]) from None
    record = RunRecord(path=path, name=path.name, config=config)
    metrics_file = path / "metrics.jsonl"
    if metrics_file.is_file():
        rows = _jsonl(metrics_file)
        record.train_rows = [r for r in rows if r.get("kind") == "train"]
        record.val_rows = [r for r in rows if r.get("kind") == "val"]
    if not record.train_rows:
        record.missing["training curves"] = "no train rows in metrics.jsonl yet"
    if not record.val_rows:
        record.missing["validation curves"] = "no validation yet (train.val_interval)"
    for name, source in (
        ("eval_metrics", "leanseg eval --report"),
        ("final_metrics", "the last validation of training"),
    ):
        if (path / f"{name}.json").is_file():
            record.metrics, record.metrics_source = _json(path / f"{name}.json"), source
            break
    else:
        record.missing["final metrics"] = (
            "the run has not finished; `leanseg eval --checkpoint RUN/last.pt --report`"
        )
    if record.metrics is not None and "confusion_matrix" not in record.metrics:
        record.missing["confusion matrix"] = "`leanseg eval --checkpoint RUN/best.pt --report`"
    for name, how in FACTS.items():
        if (path / f"{name}.json").is_file():
            record.facts[name] = _json(path / f"{name}.json")
        else:
            record.missing[name.replace("_", " ")] = how
    samples = sorted((path / "samples").glob("*.png"))
    record.samples = [p.read_bytes() for p in samples]
    if not record.samples:
        record.missing["sample predictions"] = "written at each validation"
    return record


def check_comparable(records: list[RunRecord]) -> None:
    """Runs on one page must share their classes: one line naming the first that differs."""
    first = records[0]
    for other in records[1:]:
        if other.class_names != first.class_names:
            raise ReportError(
                f"runs '{first.path}' and '{other.path}' have different classes "
                f"({_names(first.class_names)} vs {_names(other.class_names)}); compare runs "
                "of one dataset"
            )


def _names(names: list[str] | None) -> str:
    if names is None:
        return "unknown"
    shown = ", ".join(names[:4])
    return f"{len(names)}: {shown}{', ...' if len(names) > 4 else ''}"
