"""Progress without a terminal: one plain line every ``log_interval`` iterations.

On a terminal the tqdm bar shows progress; with stdout redirected (a cluster job, ``nohup``,
CI) a bar prints nothing useful, so a run prints lines like mmseg's text logger instead::

    iter 20/800  loss 1.6149  lr 1.33e-03  106.2 images/s  eta 0:02:01
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch


def bar_wanted(progress: bool | None) -> bool:
    """``--progress`` / ``--no-progress`` as given; None: a bar only when stderr is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class PlainProgress:
    """Formats the plain progress lines of one process, from its first iteration on."""

    def __init__(self, first_iteration: int, total: int, device: torch.device) -> None:
        self.first, self.total, self.device = first_iteration, total, device
        self.start = time.perf_counter()

    def line(self, iteration: int, images: int, **values: float) -> str:
        """The line at ``iteration`` (1-based) after ``images`` images in this process;
        ``values`` (e.g. ``loss``, ``lr``) are printed in order."""
        elapsed = time.perf_counter() - self.start
        done = iteration - self.first
        parts = [f"iter {iteration}/{self.total}"]
        parts += [f"{key} {_number(value)}" for key, value in values.items()]
        if done > 0 and elapsed > 0:
            remaining = elapsed / done * (self.total - iteration)
            parts.append(f"{images / elapsed:.1f} images/s")
            parts.append(f"eta {timedelta(seconds=round(remaining))}")
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            parts.append(f"mem {peak:.0f} MB")
        return "  ".join(parts)


def _number(value: float) -> str:
    if value != value:  # NaN: no finite loss in the window
        return "nan"
    return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.4f}"
