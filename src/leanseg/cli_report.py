"""``leanseg report``, and what ``train``, ``eval --report`` and ``bench`` record for it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command to the CLI's sub-parsers."""
    report = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run, or of several runs compared",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument(
        "-o",
        "--output",
        help="the .html file (default: RUN_DIR/report.html for one run; required for several)",
    )
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from leanseg.report import write_report

    out = write_report([Path(d) for d in args.run_dirs], Path(args.output) if args.output else None)
    print(f"report: {out}")
    return 0


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory holding ``checkpoint`` (its folder has a config.yaml), or None."""
    folder = Path(checkpoint).resolve().parent
    return folder if (folder / "config.yaml").is_file() else None


def record_in_run(checkpoint: str | Path, name: str, record: dict[str, Any]) -> Path | None:
    """Keep ``record`` as ``<run dir>/<name>.json`` when ``checkpoint`` is in a run directory
    (for ``leanseg report``); returns the file written, or None."""
    from leanseg.engine.run_facts import write_json

    run_dir = run_dir_of(checkpoint)
    if run_dir is None:
        return None
    path = run_dir / f"{name}.json"
    write_json(path, record)
    return path


def refresh_report(run_dir: Path) -> None:
    """Rewrite ``run_dir/report.html``; a failure is one warning line, never the command's.

    The run's own results are already written when this runs, so a report that cannot be
    built must not turn a finished training or evaluation into an error.
    """
    from leanseg.report import write_report

    try:
        out = write_report([run_dir])
    except Exception as err:  # noqa: BLE001 - the reason goes to the user in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"leanseg: warning: report.html not written: {reason}", file=sys.stderr)
        return
    print(f"report: {out}")
