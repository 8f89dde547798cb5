"""``leanseg report`` and what train / eval / bench record for it; plain progress lines."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from leanseg.engine.progress_log import PlainProgress, bar_wanted
from leanseg.report import ReportError, read_run, render, write_report
from tests.test_cli import run_cli

CLASSES = ["background", "disc", "square", "triangle", "ring", "striped", "core"]
PLAIN_LINE = re.compile(
    r"^iter (\d+)/4  loss \d+\.\d{4}  lr \S+  \d+\.\d images/s  eta \d+:\d\d:\d\d$"
)


class Dom(HTMLParser):
    """Tags with their attributes, table rows by table id, and text by element id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str, int] = {}
        self.text: dict[str, str] = {}
        self._table: list[str | None] = []
        self._open: list[tuple[str, str]] = []  # (tag, id) of the open elements with an id
        self._in_body = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table.append(attributes.get("id"))
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body and self._table and self._table[-1]:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1
        if "id" in attributes:
            self._open.append((tag, attributes["id"]))
            self.text.setdefault(attributes["id"], "")

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()
        if tag == "tbody":
            self._in_body = False
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        for _, ident in self._open:
            self.text[ident] += data

    def plots(self) -> list[str]:
        return [a["data-plot"] for t, a in self.tags if t == "svg" and "data-plot" in a]


def test_train_prints_plain_lines_and_writes_the_report(finished_run):
    run, stdout = finished_run
    lines = [line for line in stdout.splitlines() if line.startswith("iter ")]
    assert [PLAIN_LINE.match(line).group(1) for line in lines] == ["2", "4"], stdout
    for name in ("report.html", "environment.json", "efficiency.json", "train_stats.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "samples").glob("*.png"))) == 3  # synthetic_val=3 < sample_images
    final = json.loads((run / "final_metrics.json").read_text())
    assert len(final["confusion_matrix"]) == len(CLASSES)
    dom = Dom((run / "report.html").read_text())
    assert dom.rows["per-class"] == len(CLASSES)
    assert {"loss", "lr", "val", "per_class", "confusion"} <= set(dom.plots())
    images = [a for t, a in dom.tags if t == "img"]
    assert len(images) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in images)
    assert not [a for t, a in dom.tags if t in ("script", "link")]  # nothing fetched
    efficiency = json.loads((run / "efficiency.json").read_text())
    assert efficiency["parameters"] == sum(p.numel() for p in _model(run).parameters())


def _model(run: Path) -> torch.nn.Module:
    from leanseg.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(run / "best.pt"), str(run / "best.pt"))


def test_plain_lines_only_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert bar_wanted(None) is True and bar_wanted(False) is False
    progress = PlainProgress(first_iteration=10, total=30, device=torch.device("cpu"))
    progress.start -= 10.0  # 10 s for 10 iterations of 8 images
    line = progress.line(20, images=80, loss=0.5, lr=0.001)
    assert line.startswith("iter 20/30  loss 0.5000  lr 1.00e-03  ")
    assert line.endswith("eta 0:00:10") and " 8.0 images/s" in line


def test_report_of_a_run_with_missing_pieces(finished_run, tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(finished_run[0], run)
    for name in ("final_metrics.json", "efficiency.json", "train_stats.json"):
        (run / name).unlink()
    shutil.rmtree(run / "samples")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(rows[0] + "\n")  # stopped after the first log row
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    dom = Dom((run / "report.html").read_text())
    missing = dom.text["missing"]
    for what in ("final metrics", "sample predictions", "efficiency", "bench model"):
        assert what in missing, what
    assert "stopped at iteration 2 of 4" in dom.text["summary"]
    assert "per-class" not in dom.rows  # no metrics: no table, and the page still builds

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(finished_run[0] / "config.yaml", bare)
    assert "no train rows" in read_run(bare).missing["training curves"]
    assert "<h1>" in render([bare])


def test_comparing_runs_of_different_classes_is_one_error(finished_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished_run[0], other)
    final = json.loads((other / "final_metrics.json").read_text())
    final["iou"] = {f"class{i}": v for i, v in enumerate(final["iou"].values())}
    (other / "final_metrics.json").write_text(json.dumps(final))
    out = tmp_path / "compare.html"
    proc = run_cli("report", str(finished_run[0]), str(other), "-o", str(out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "different classes" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_comparison_has_a_row_and_a_point_per_run(finished_run, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(finished_run[0], second)
    bench = {"input": [1, 3, 64, 64], "device": "cpu", "threads": 1}
    bench["backends"] = {"torch": {"latency_seconds_median": 0.012}}
    (second / "bench_model.json").write_text(json.dumps(bench))
    out = tmp_path / "compare.html"
    assert write_report([finished_run[0], second], out) == out
    dom = Dom(out.read_text())
    assert dom.rows["comparison"] == 2 and dom.rows["per-class"] == len(CLASSES)
    assert {"pareto_parameters", "pareto_memory", "pareto_latency"} <= set(dom.plots())
    assert f"no figure for {finished_run[0].name}" in dom.text["missing-points"]  # its latency
    html = out.read_text()
    parameters = html.split('data-plot="pareto_parameters"')[1].split("</svg>")[0]
    assert parameters.count("<circle") == 2


def test_eval_and_bench_record_in_the_run_directory(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    before = (run / "report.html").read_text()
    proc = run_cli("eval", "--checkpoint", str(run / "best.pt"), "--report", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "confusion_matrix" in json.loads((run / "eval_metrics.json").read_text())
    assert (run / "report.html").read_text() != before
    assert read_run(run).metrics_source == "leanseg eval --report"
    proc = run_cli("bench", "model", "--checkpoint", str(run / "best.pt"), "--runs", "1",
                   "--warmup", "0", "--size", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "bench_model.json").read_text())["backends"]["torch"]
    assert "latency (torch, cpu" in render([run])

    loose = tmp_path / "loose.pt"
    shutil.copy(run / "best.pt", loose)
    proc = run_cli("eval", "--checkpoint", str(loose), "--report")
    assert proc.returncode == 2 and "not in a run directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_output_must_be_an_html_file(finished_run, tmp_path):
    with pytest.raises(ReportError, match="name an .html file"):
        write_report([finished_run[0]], finished_run[0] / "config.yaml")
    proc = run_cli("report", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_an_acosp_run_records_kept_channels_and_the_shrunk_size(tmp_path, synthetic_root):
    from tests.test_cli import TINY, only_run

    work = tmp_path / "runs"
    args = [*TINY, f"data.root={synthetic_root.parent}", f"train.work_dir={work}"]
    args += ["data.synthetic_train=12", "data.synthetic_val=6", "train.iterations=2"]
    args += ["train.val_interval=2", "acosp.sparsity=0.5", "acosp.end=1"]
    proc = run_cli("train", *args)
    assert proc.returncode == 0, proc.stderr
    run = only_run(work)
    record = json.loads((run / "efficiency.json").read_text())["acosp"]
    assert record["sparsity"] == 0.5
    assert all(0 < kept < total for kept, total in record["kept_channels"].values())
    dense = json.loads((run / "efficiency.json").read_text())["parameters"]
    assert record["shrunk_parameters"] < dense and record["shrunk_macs"] > 0
    html = render([run])
    assert "parameters after leanseg shrink" in html and 'id="acosp-layers"' in html
