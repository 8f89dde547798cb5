"""What a run records: metrics.jsonl, tensorboard scalars and prediction images."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


class RunLog:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to tensorboard (optional)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool,
        enabled: bool = True,
        purge_step: int | None = None,
    ) -> None:
        """``purge_step``: a resumed run's start; tensorboard hides events logged after it."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict[str, Any], *, step: int, prefix: str) -> None:
        """Log one record; numeric top-level values also go to tensorboard as ``prefix/key``."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"kind": prefix, "iteration": step, **record}) + "\n")
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
