"""Dataset-level segmentation metrics from a K x K confusion matrix (deeplab.md section 7).

Rows are ground truth, columns are predictions. Only pixels with ``0 <= target < K`` count, so
the ignore id (255 by default) and any other out-of-range label are skipped. Per-class values
are NaN where undefined and the means are NaN-means, as in semseg and mmsegmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leanseg.errors import ConfigError

__all__ = ["ConfusionMatrix", "SegMetrics"]


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.2f}"


def _box(headers: Sequence[str], rows: Sequence[Sequence[str]], label: bool = True) -> list[str]:
    """Render a boxed text table, right-aligned except a left-aligned first (label) column."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        parts = [
            f" {c:<{w}} " if label and i == 0 else f" {c:>{w}} "
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "|" + "|".join(parts) + "|"

    return [rule, line(headers), rule, *(line(r) for r in rows), rule]


@dataclass
class SegMetrics:
    """Metrics of one confusion matrix; fractions in [0, 1], NaN where undefined."""

    all_acc: float
    mean_acc: float
    miou: float
    fwiou: float
    iou: list[float]
    acc: list[float]

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [str(i) for i in range(len(self.iou))]
        if len(class_names) != len(self.iou):
            raise ValueError(f"got {len(class_names)} class names for {len(self.iou)} classes")
        return [str(n) for n in class_names]

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-friendly dict (NaN -> None); per-class values keyed by name when names are given."""

        names = None if class_names is None else self._names(class_names)

        def per_class(values: list[float]) -> list | dict:
            clean = [_none_if_nan(v) for v in values]
            return clean if names is None else dict(zip(names, clean, strict=True))

        return {
            "all_acc": _none_if_nan(self.all_acc),
            "mean_acc": _none_if_nan(self.mean_acc),
            "miou": _none_if_nan(self.miou),
            "fwiou": _none_if_nan(self.fwiou),
            "iou": per_class(self.iou),
            "acc": per_class(self.acc),
        }

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class IoU/Acc table in percent ("-" for NaN), then a summary table."""
        names = self._names(class_names)
        rows = [[n, _pct(i), _pct(a)] for n, i, a in zip(names, self.iou, self.acc, strict=True)]
        summary = [_pct(v) for v in (self.all_acc, self.mean_acc, self.miou, self.fwiou)]
        lines = [
            "per-class results:",
            *_box(["Class", "IoU", "Acc"], rows),
            "Summary:",
            *_box(["allAcc", "mAcc", "mIoU", "FreqW IoU"], [summary], label=False),
        ]
        return "\n".join(lines)


class ConfusionMatrix:
    """A K x K int64 confusion matrix accumulated over a whole dataset."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of integer predictions and targets of the same shape (any device)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class indices (argmax the logits)")
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).to(target.device).long()
        # ignore_index is normally outside [0, K); a label inside it is still skipped.
        keep = (target >= 0) & (target < k) & (target != self.ignore_index)
        target, pred = target[keep], pred[keep]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"predictions must lie in [0, {k}), got values outside")
        counts = torch.bincount(k * target + pred, minlength=k * k).reshape(k, k)
        self.matrix += counts.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over processes when torch.distributed is initialised; else no-op."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> SegMetrics:
        """Overall/mean accuracy, per-class and mean IoU, frequency-weighted IoU."""
        h = self.matrix.detach().cpu().double()
        tp, row, col = h.diag(), h.sum(1), h.sum(0)
        total = h.sum()
        acc = tp / row  # 0/0 = NaN for classes without ground-truth pixels
        iou = tp / (row + col - tp)  # NaN when the class is neither in gt nor predicted
        freq = row / total
        present = row > 0
        fwiou = (freq[present] * iou[present]).sum() if total > 0 else torch.tensor(math.nan)
        return SegMetrics(
            all_acc=float(tp.sum() / total),
            mean_acc=float(acc.nanmean()),
            miou=float(iou.nanmean()),
            fwiou=float(fwiou),
            iou=iou.tolist(),
            acc=acc.tolist(),
        )
