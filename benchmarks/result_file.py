"""What every benchmark script shares: the machine it ran on, size arguments, latency summaries
and writing its JSON result."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from leanseg.bench_model import latency_summary


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """The ``machine`` entry of a result: CPU name and count, plus ``extra``."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), **extra}


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> ``(512, 1024)`` (height, width), for ``--sizes`` arguments."""
    height, _, width = text.partition("x")
    return int(height), int(width)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median / p10 / p90 of timed runs, in milliseconds."""
    summary = latency_summary(seconds)
    return {
        "median_ms": 1000 * summary["latency_seconds_median"],
        "p10_ms": 1000 * summary["latency_seconds_p10"],
        "p90_ms": 1000 * summary["latency_seconds_p90"],
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """Print ``result`` as JSON and write it to ``out`` (its folder made if needed)."""
    text = json.dumps(result, indent=2)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
