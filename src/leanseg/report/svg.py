"""Small self-contained SVG charts: lines, grouped bars, a heat map and labelled points.

Each function returns one ``<svg>`` element (a string) with ``data-plot`` naming the chart, no
script and no external reference, so a page that inlines them needs no network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 44, 46


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:  # one value: centre it
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.1e}"
    return f"{value:g}"


class _Frame:
    """Plot area of a ``width`` x ``height`` chart mapping data to pixels."""

    def __init__(self, width: int, height: int, xs: Sequence[float], ys: Sequence[float]):
        self.width, self.height = width, height
        self.xticks = nice_ticks(min(xs), max(xs))
        self.yticks = nice_ticks(min(ys), max(ys))

    def x(self, value: float) -> float:
        low, high = self.xticks[0], self.xticks[-1]
        return _LEFT + (value - low) / (high - low) * (self.width - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        low, high = self.yticks[0], self.yticks[-1]
        return self.height - _BOTTOM - (value - low) / (high - low) * (self.height - _TOP - _BOTTOM)

    def axes(self, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        parts = []
        for tick in self.yticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{self.width - _RIGHT}" y2="{y:.1f}" '
                'stroke="#e5e5e5"/>'
                f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>'
            )
        for tick in self.xticks if x_ticks else []:
            x = self.x(tick)
            parts.append(
                f'<text x="{x:.1f}" y="{self.height - _BOTTOM + 16}" text-anchor="middle">'
                f"{_label(tick)}</text>"
            )
        bottom = self.height - _BOTTOM
        parts.append(
            f'<line x1="{_LEFT}" y1="{bottom}" x2="{self.width - _RIGHT}" y2="{bottom}" '
            'stroke="#333"/>'
            f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#333"/>'
            f'<text x="{(self.width + _LEFT) / 2:.1f}" y="{self.height - 8}" '
            f'text-anchor="middle">{escape(x_label)}</text>'
            f'<text transform="translate(14 {(self.height - _BOTTOM + _TOP) / 2:.1f}) '
            f'rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
        )
        return parts


def _svg(name: str, width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" data-plot="{escape(name)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">'
        f"<title>{escape(title)}</title>"
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{escape(title)}</text>' + "".join(body) + "</svg>"
    )


def _legend(names: Sequence[str], width: int) -> list[str]:
    """One row of colour keys under the title."""
    parts = []
    for i, name in enumerate(names):
        x, y, colour = _LEFT + 80 * i, 26, COLOURS[i % len(COLOURS)]
        parts.append(
            f'<rect x="{x}" y="{y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{y + 9}">{escape(name)}</text>'
        )
    return parts


def line_chart(
    name: str,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 520,
    height: int = 260,
) -> str:
    """One polyline (and a dot per point) per named series of ``(x, y)`` points."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    frame = _Frame(width, height, [p[0] for p in points], [p[1] for p in points])
    body = frame.axes(x_label, y_label)
    for i, values in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        finite = [(frame.x(x), frame.y(y)) for x, y in values if math.isfinite(y)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in finite)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(finite) <= 40:
            body += [
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in finite
            ]
    if len(series) > 1:
        body += _legend(list(series), width)
    return _svg(name, width, height, title, body)


def bar_chart(
    name: str,
    categories: Sequence[str],
    groups: dict[str, Sequence[float | None]],
    *,
    title: str,
    y_label: str,
    width: int = 640,
    height: int = 280,
) -> str:
    """Grouped vertical bars, one group per category (None: no bar), values from 0."""
    values = [v for vs in groups.values() for v in vs if v is not None]
    frame = _Frame(width, height, [0, 1], [0.0, max(values, default=1.0)])
    body = frame.axes("", y_label, x_ticks=False)  # the categories label the x axis
    bottom = height - _BOTTOM
    slot = (width - _LEFT - _RIGHT) / max(len(categories), 1)
    bar = slot * 0.8 / max(len(groups), 1)
    for c, category in enumerate(categories):
        left = _LEFT + c * slot + slot * 0.1
        for g, (group, vs) in enumerate(groups.items()):
            value = vs[c]
            if value is None:
                continue
            top = frame.y(value)
            body.append(
                f'<rect x="{left + g * bar:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                f'height="{bottom - top:.1f}" fill="{COLOURS[g % len(COLOURS)]}">'
                f"<title>{escape(category)} {escape(group)}: {value:.4f}</title></rect>"
            )
        body.append(
            f'<text x="{left + slot * 0.4:.1f}" y="{bottom + 14}" text-anchor="middle">'
            f"{escape(category)}</text>"
        )
    body += _legend(list(groups), width)
    return _svg(name, width, height, title, body)


def heatmap(
    name: str, matrix: Sequence[Sequence[float]], labels: Sequence[str], *, title: str
) -> str:
    """A square heat map of values in [0, 1] (rows: truth, columns: prediction)."""
    n = len(labels)
    cell = max(18, min(48, 420 // max(n, 1)))
    left, top = 110, 40
    width, height = left + n * cell + 20, top + n * cell + 90
    body = []
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            shade = round(255 * (1 - min(max(value, 0.0), 1.0)))
            fill = f"rgb({shade},{shade},255)"
            x, y = left + c * cell, top + r * cell
            text = "#fff" if value > 0.5 else "#222"
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" '
                f'stroke="#fff"><title>{escape(labels[r])} as {escape(labels[c])}: '
                f"{value:.3f}</title></rect>"
            )
            if cell >= 28:
                body.append(
                    f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" '
                    f'fill="{text}" font-size="9">{value:.2f}</text>'
                )
        body.append(
            f'<text x="{left - 6}" y="{top + r * cell + cell / 2 + 4}" text-anchor="end">'
            f"{escape(labels[r])}</text>"
        )
    for c, label in enumerate(labels):
        x = left + c * cell + cell / 2
        body.append(
            f'<text transform="translate({x} {top + n * cell + 8}) rotate(45)">'
            f"{escape(label)}</text>"
        )
    body.append(
        f'<text x="{left - 6}" y="{top - 8}" text-anchor="end" font-style="italic">'
        "truth \\ predicted</text>"
    )
    return _svg(name, width, height, title, body)


def scatter(
    name: str,
    points: Sequence[tuple[str, float, float]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 420,
    height: int = 300,
) -> str:
    """One labelled dot per ``(label, x, y)``."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    pad_x = (max(xs) - min(xs)) * 0.1 or abs(xs[0]) * 0.1 or 1.0
    pad_y = (max(ys) - min(ys)) * 0.1 or abs(ys[0]) * 0.1 or 0.05
    frame = _Frame(
        width, height, [min(xs) - pad_x, max(xs) + pad_x], [min(ys) - pad_y, max(ys) + pad_y]
    )
    body = frame.axes(x_label, y_label)
    for i, (label, x, y) in enumerate(points):
        cx, cy = frame.x(x), frame.y(y)
        right = cx > width / 2  # label on the inner side, so it stays inside the chart
        anchor, dx = ("end", -7) if right else ("start", 7)
        body.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{COLOURS[i % len(COLOURS)]}">'
            f"<title>{escape(label)}: {x:g}, {y:.4f}</title></circle>"
            f'<text x="{cx + dx:.1f}" y="{cy - 6:.1f}" text-anchor="{anchor}">'
            f"{escape(label)}</text>"
        )
    return _svg(name, width, height, title, body)
