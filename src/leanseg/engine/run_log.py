"""What a run records: metrics.jsonl (always), and the ``train.loggers`` extras: tensorboard
scalars and prediction images, and ``metrics_<kind>.csv`` spreadsheets."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from leanseg.engine.run_dir import drop_lines, truncate_metrics
from leanseg.errors import LeansegError


class LoggerMissing(LeansegError):
    """A logger named in ``train.loggers`` whose package is not installed."""


def check_loggers(loggers: list[str]) -> list[str]:
    """The loggers of ``train.loggers`` (each once; the config checked their names), and a
    one-line :class:`LoggerMissing` when tensorboard is wanted but cannot be imported (it is
    an optional extra); call it before any work."""
    active = list(dict.fromkeys(loggers))
    if "tensorboard" in active:
        try:
            import tensorboard  # noqa: F401  (the package torch.utils.tensorboard needs)
        except ImportError:
            raise LoggerMissing(
                "train.loggers: tensorboard is not installed; pip install 'leanseg[tensorboard]' "
                "or set train.loggers=[csv] (or train.loggers=[] for metrics.jsonl alone)"
            ) from None
    return active


def csv_path(run_dir: Path, kind: str) -> Path:
    """The spreadsheet of one kind of record (``train`` / ``val``)."""
    return run_dir / f"metrics_{kind}.csv"


def truncate_csv(path: Path, iteration: int) -> int:
    """Keep the header and the rows up to ``iteration`` (atomically); returns rows dropped.

    A partial last row (a write cut by ``kill -9``) is dropped too.
    """
    if not path.is_file():
        return 0
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), None)
    if header is None:  # an empty file
        return 0
    width = len(header)

    def keep(line: str) -> bool:
        row = next(csv.reader([line]), [])
        return len(row) == width and int(row[0]) <= iteration

    return drop_lines(path, keep, header=1)


class CsvLog:
    """``metrics_<kind>.csv``: a header ``iteration,<keys of the kind's first record>``, then
    one row per record with its numeric top-level values (NaN as an empty cell)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.columns: dict[str, list[str]] = {}

    def write(self, record: dict[str, Any], *, step: int, kind: str) -> None:
        path = csv_path(self.run_dir, kind)
        columns = self.columns.get(kind)
        if columns is None:
            if path.is_file() and path.stat().st_size:  # a resumed run: keep its header
                with path.open(newline="") as handle:
                    columns = next(csv.reader(handle))[1:]
            else:
                columns = [k for k, v in record.items() if _scalar(v)]
                path.write_text(_row(["iteration", *columns]))
            self.columns[kind] = columns
        cells = [_cell(record.get(key)) for key in columns]
        with path.open("a", newline="") as handle:
            handle.write(_row([step, *cells]))


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> Any:
    if not _scalar(value) or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _row(cells: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


class RunLog:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to tensorboard and / or csv
    files (optional)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool,
        csv_files: bool = False,
        enabled: bool = True,
        purge_step: int | None = None,
    ) -> None:
        """``purge_step``: a resumed run's start; tensorboard hides events logged after it (the
        caller truncates metrics.jsonl and the csv files, see :func:`truncate_csv`)."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.csv = CsvLog(run_dir) if enabled and csv_files else None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any], *, step: int, prefix: str) -> None:
        """Log one record; numeric top-level values also go to tensorboard as ``prefix/key``
        and to ``metrics_<prefix>.csv``."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"kind": prefix, "iteration": step, **record}) + "\n")
        if self.csv is not None:
            self.csv.write(record, step=step, kind=prefix)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not math.isnan(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, tag: str, panels: list[np.ndarray], step: int) -> None:
        """Add HxWx3 uint8 images (e.g. image | ground truth | prediction) to tensorboard."""
        if self.writer is None:
            return
        for i, panel in enumerate(panels):
            self.writer.add_image(f"{tag}/{i}", panel, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_run_log(run_dir: Path, loggers: list[str], *, start: int, enabled: bool) -> RunLog:
    """The run's log with ``loggers`` (see :func:`check_loggers`), after dropping what a
    previous process logged past iteration ``start`` from metrics.jsonl and the csv files
    (replayed iterations are logged once; tensorboard hides them with ``purge_step``)."""
    if enabled:
        truncate_metrics(run_dir / "metrics.jsonl", start)
        for path in sorted(run_dir.glob("metrics_*.csv")):
            truncate_csv(path, start)
    return RunLog(
        run_dir,
        tensorboard="tensorboard" in loggers,
        csv_files="csv" in loggers,
        enabled=enabled,
        purge_step=start or None,
    )
