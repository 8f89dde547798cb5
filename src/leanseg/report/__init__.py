"""``leanseg report``: one self-contained HTML page of a run, or of several runs compared.

write_report([Path("runs/a")])                      # runs/a/report.html
write_report([Path("runs/a"), Path("runs/b")], Path("compare.html"))
"""

from __future__ import annotations

from pathlib import Path

from leanseg.report.page import compare_page, run_page
from leanseg.report.run_record import ReportError, RunRecord, check_comparable, read_run

REPORT_NAME = "report.html"


def render(run_dirs: list[Path]) -> str:
    """The page's HTML: one run in detail, or a comparison of several."""
    if not run_dirs:
        raise ReportError("no run directory given; pass one or more")
    records = [read_run(Path(d)) for d in run_dirs]
    if len(records) == 1:
        return run_page(records[0])
    check_comparable(records)
    return compare_page(records)


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of ``run_dirs`` to ``out`` (default: one run's ``report.html``);
    returns the path. Nothing is written if a run cannot be read."""
    from leanseg.engine.run_dir import check_output_file, write_text_atomic

    if out is None:
        if len(run_dirs) != 1:
            raise ReportError("several runs: name the comparison's file with -o FILE.html")
        out = Path(run_dirs[0]) / REPORT_NAME
    if out.suffix.lower() not in (".html", ".htm"):  # never over a run's other files
        raise ReportError(f"-o '{out}': name an .html file")
    html = render(run_dirs)  # a run that cannot be read is named before the output
    check_output_file(out, "-o")
    write_text_atomic(out, html)
    return out


__all__ = ["REPORT_NAME", "ReportError", "RunRecord", "read_run", "render", "write_report"]
