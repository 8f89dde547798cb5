"""The HTML of ``leanseg report``: one run in detail, or several compared.

One self-contained file: inline CSS, charts as inline SVG (:mod:`leanseg.report.svg`), sample
predictions as PNG data URIs; no script, font or anything else fetched.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

import yaml

from leanseg.report import svg
from leanseg.report.run_record import RunRecord

_STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; border-bottom: 1px solid #ddd; padding-bottom: 4px;
  margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
.missing { background: #fff8e1; border: 1px solid #f0d98c; padding: 6px 12px; font-size: 13px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 8px 0; } figcaption { font-size: 12px; color: #555; }
img.sample { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _table(headers: list[str], rows: list[list[Any]], table_id: str | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    lines = ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows]
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))


def _pct(value: Any) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def _mb(value: Any) -> str | None:
    return None if value is None else f"{value / 2**20:,.1f} MB"


def _missing(record: RunRecord) -> str:
    if not record.missing:
        return ""
    items = "".join(
        f"<li><b>{escape(what)}</b>: {escape(how)}</li>" for what, how in record.missing.items()
    )
    return (
        f'<div class="missing" id="missing"><p>Not in this run directory:</p><ul>{items}</ul></div>'
    )


# -- figures of one run ------------------------------------------------------------------------
def latency(record: RunRecord) -> tuple[float, str] | None:
    """Median forward latency in ms of the first benched backend, and what ran it."""
    bench = record.facts.get("bench_model")
    if not bench or not bench.get("backends"):
        return None
    name, entry = next(iter(bench["backends"].items()))
    shape = "x".join(str(s) for s in bench.get("input", []))
    where = f"{name}, {bench.get('device', '?')}, {bench.get('threads', '?')} threads, {shape}"
    return 1000 * entry["latency_seconds_median"], where


def training_memory(record: RunRecord) -> tuple[float, str] | None:
    """Training memory in bytes and where it comes from (bench memory first, then the run)."""
    bench = record.facts.get("bench_memory", {})
    stats = record.facts.get("train_stats", {})
    for value, source in (
        (bench.get("cuda_peak_bytes"), "bench memory: CUDA peak"),
        (bench.get("peak_rss_step_bytes"), "bench memory: RSS rise of a step"),
        (stats.get("cuda_max_memory_allocated_bytes"), "training: CUDA peak"),
        (stats.get("peak_rss_bytes"), "training: peak RSS of the process"),
    ):
        if value is not None:
            return float(value), source
    return None


def parameters(record: RunRecord) -> int | None:
    """Parameters of the run's model; of its shrunk model for an ACoSP run."""
    eff = record.facts.get("efficiency", {})
    return eff.get("acosp", {}).get("shrunk_parameters") or eff.get("parameters")


def macs(record: RunRecord) -> int | None:
    """MACs of one forward; of the shrunk model for an ACoSP run."""
    eff = record.facts.get("efficiency", {})
    return eff.get("acosp", {}).get("shrunk_macs") or eff.get("macs")


def _miou(record: RunRecord) -> float | None:
    return record.metrics.get("miou") if record.metrics else None


def _status(record: RunRecord) -> str:
    total, last = record.total_iterations, record.last_iteration
    if total and last < total:
        return f"stopped at iteration {last} of {total}"
    return f"finished, {last} iterations" if last else "not started"


def _curves(record: RunRecord) -> list[str]:
    plots = []
    for key, title in (("loss", "Training loss"), ("lr", "Learning rate")):
        points = [(r["iteration"], _num(r.get(key))) for r in record.train_rows]
        if points:
            chart = svg.line_chart(
                key, {key: points}, title=title, x_label="iteration", y_label=key
            )
            plots.append(chart)
    if record.val_rows:
        series = {
            key: [(r["iteration"], _num(r.get(key))) for r in record.val_rows]
            for key in ("mIoU", "mAcc", "allAcc")
        }
        plots.append(
            svg.line_chart("val", series, title="Validation", x_label="iteration", y_label="score")
        )
    return plots


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _per_class(record: RunRecord) -> list[str]:
    metrics = record.metrics
    if not metrics or not isinstance(metrics.get("iou"), dict):
        return []
    names = list(metrics["iou"])
    iou = [metrics["iou"][n] for n in names]
    acc = [metrics.get("acc", {}).get(n) for n in names]
    rows = [[n, _pct(i), _pct(a)] for n, i, a in zip(names, iou, acc, strict=True)]
    chart = svg.bar_chart(
        "per_class", names, {"IoU": iou, "Acc": acc}, title="Per class", y_label="score"
    )
    return [
        f"<h2>Per class ({escape(record.metrics_source or '')})</h2>",
        _table(["class", "IoU %", "Acc %"], rows, "per-class"),
        f'<div class="plots">{chart}</div>',
    ]


def _confusion(record: RunRecord) -> list[str]:
    matrix = (record.metrics or {}).get("confusion_matrix")
    names = record.class_names
    if not matrix or not names:
        return []
    normalised = []
    for row in matrix:
        total = sum(row)
        normalised.append([v / total if total else 0.0 for v in row])
    chart = svg.heatmap("confusion", normalised, names, title="Confusion matrix (row-normalised)")
    return ["<h2>Confusion matrix</h2>", f'<div class="plots">{chart}</div>']


def _samples(record: RunRecord) -> list[str]:
    if not record.samples:
        return []
    figures = []
    for i, data in enumerate(record.samples):
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        figures.append(
            f'<figure><img class="sample" src="{uri}" alt="sample {i}">'
            f"<figcaption>val image {i}: image | truth | prediction | overlay</figcaption>"
            "</figure>"
        )
    return ["<h2>Sample predictions</h2>", *figures]


def _efficiency(record: RunRecord) -> list[str]:
    eff, stats = record.facts.get("efficiency", {}), record.facts.get("train_stats", {})
    rows: list[list[Any]] = []
    if eff:
        rows.append(["parameters", eff.get("parameters")])
        shrunk = eff.get("acosp", {})
        if shrunk.get("shrunk_parameters"):
            rows.append(["parameters after leanseg shrink", shrunk["shrunk_parameters"]])
            rows.append(["MACs after leanseg shrink", shrunk.get("shrunk_macs")])
        size = "x".join(str(s) for s in eff.get("macs_input_size", []))
        rows.append([f"MACs (one forward, {size})", eff.get("macs")])
        ratio = eff.get("backrazor_ratio")
        rows.append(
            [
                "BackRazor",
                f"R = {ratio}, scope {eff.get('backrazor_scope')}" if ratio is not None else "off",
            ]
        )
    lat = latency(record)
    if lat:
        rows.append([f"latency ({lat[1]})", f"{lat[0]:.2f} ms"])
    bench = record.facts.get("bench_memory", {})
    if bench.get("saved_activation_bytes") is not None:
        rows.append(
            ["saved activations of a step (bench memory)", _mb(bench["saved_activation_bytes"])]
        )
    mem = training_memory(record)
    if mem:
        rows.append([f"training memory ({mem[1]})", _mb(mem[0])])
    if stats.get("images_per_second") is not None:
        rows.append(["training images/s", stats["images_per_second"]])
        rows.append(["training wall clock (s)", stats.get("seconds")])
    parts = ["<h2>Efficiency</h2>", _table(["figure", "value"], rows, "efficiency")] if rows else []
    acosp = eff.get("acosp")
    if acosp:
        layers = [
            [name, kept, total, f"{kept / total:.2f}"]
            for name, (kept, total) in acosp["kept_channels"].items()
        ]
        parts += [
            f"<h2>ACoSP: sparsity {acosp.get('sparsity')}, kept channels per layer</h2>",
            _table(["layer", "kept", "channels", "fraction"], layers, "acosp-layers"),
        ]
    return parts


def _environment(record: RunRecord) -> list[str]:
    rows = [[k, v] for k, v in record.facts.get("environment", {}).items()]
    rows += [[f"compute: {k}", v] for k, v in record.facts.get("compute", {}).items()]
    if not rows:
        return []
    return ["<h2>Environment</h2>", _table(["", "value"], rows, "environment")]


def run_page(record: RunRecord) -> str:
    """The report of one run."""
    cfg = record.config
    metrics = record.metrics or {}
    summary = [
        ["model", cfg.get("model", {}).get("name")],
        ["dataset", cfg.get("data", {}).get("dataset")],
        ["status", _status(record)],
        ["val mIoU %", _pct(metrics.get("miou"))],
        ["val mAcc %", _pct(metrics.get("mean_acc"))],
        ["val allAcc %", _pct(metrics.get("all_acc"))],
    ]
    curves = _curves(record)
    body = [
        f"<h1>leanseg run {escape(record.name)}</h1>",
        f"<p>{escape(str(record.path))}</p>",
        _missing(record),
        _table(["", "value"], summary, "summary"),
        *(["<h2>Curves</h2>", f'<div class="plots">{"".join(curves)}</div>'] if curves else []),
        *_per_class(record),
        *_confusion(record),
        *_samples(record),
        *_efficiency(record),
        "<h2>Config</h2>",
        "<details><summary>the resolved config (config.yaml)</summary>"
        f"<pre>{escape(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>",
        *_environment(record),
    ]
    return _page(f"leanseg run {record.name}", body)


# -- several runs --------------------------------------------------------------------------------
def compare_page(records: list[RunRecord]) -> str:
    """One table and the Pareto plots of several runs."""
    rows, missing = [], []
    for r in records:
        eff, lat, mem = r.facts.get("efficiency", {}), latency(r), training_memory(r)
        acosp = eff.get("acosp", {}).get("sparsity") if eff.get("acosp") else None
        rows.append(
            [
                r.name,
                r.config.get("model", {}).get("name"),
                _status(r),
                _pct(_miou(r)),
                _pct((r.metrics or {}).get("mean_acc")),
                parameters(r),
                macs(r),
                f"{lat[0]:.2f}" if lat else None,
                _mb(mem[0]) if mem else None,
                eff.get("backrazor_ratio"),
                acosp,
            ]
        )
        for what in r.missing:
            missing.append(
                f"<li><b>{escape(r.name)}</b>: {escape(what)} ({escape(r.missing[what])})</li>"
            )
    headers = [
        "run",
        "model",
        "status",
        "mIoU %",
        "mAcc %",
        "parameters*",
        "MACs*",
        "latency ms",
        "training memory",
        "BackRazor R",
        "ACoSP sparsity",
    ]
    body = [
        f"<h1>leanseg: {len(records)} runs compared</h1>",
        _table(headers, rows, "comparison"),
        "<p>* ACoSP runs: of the model <code>leanseg shrink</code> makes (latency: of the "
        "checkpoint as benched).</p>",
    ]
    if missing:
        items = "".join(missing)
        body.append(
            f'<div class="missing" id="missing"><p>Missing figures:</p><ul>{items}</ul></div>'
        )
    plots, absent = [], []
    for name, title, x_label, value in (
        ("pareto_latency", "mIoU vs latency", "latency (ms)", lambda r: (latency(r) or (None,))[0]),
        (
            "pareto_parameters",
            "mIoU vs parameters",
            "parameters (M)",
            lambda r: _millions(parameters(r)),
        ),
        (
            "pareto_memory",
            "mIoU vs training memory",
            "training memory (MB)",
            lambda r: _megabytes(training_memory(r)),
        ),
    ):
        points = [(r.name, value(r), _miou(r)) for r in records]
        shown = [(n, x, 100 * y) for n, x, y in points if x is not None and y is not None]
        left_out = [n for n, x, y in points if x is None or y is None]
        if shown:
            plots.append(
                svg.scatter(name, shown, title=title, x_label=x_label, y_label="val mIoU %")
            )
        if left_out:
            absent.append(f"<li>{escape(title)}: no figure for {escape(', '.join(left_out))}</li>")
    body += ["<h2>Accuracy against cost</h2>", f'<div class="plots">{"".join(plots)}</div>']
    if absent:
        body.append(f'<div class="missing" id="missing-points"><ul>{"".join(absent)}</ul></div>')
    names = records[0].class_names
    if names and all(r.metrics for r in records):
        per_class = [[n, *(_pct(r.metrics["iou"].get(n)) for r in records)] for n in names]
        body += [
            "<h2>IoU % per class</h2>",
            _table(["class", *(r.name for r in records)], per_class, "per-class"),
        ]
    return _page("leanseg comparison", body)


def _millions(value: Any) -> float | None:
    return None if value is None else value / 1e6


def _megabytes(memory: tuple[float, str] | None) -> float | None:
    return None if memory is None else memory[0] / 2**20
