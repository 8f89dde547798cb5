"""``leanseg data check``: scan a split without augmentation and collect every problem.

Unlike the datasets, which stop at the first bad file, the scan reads each file on its own and
records what is wrong with it: missing or corrupt files, colour masks where index masks are
expected, masks whose size differs from their image, and labels outside ``[0, num_classes)``
that are not the ignore index. It also counts samples, image sizes and label values.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanseg.config import DataConfig
from leanseg.data.build import build_dataset, require_root
from leanseg.data.cifar10 import CIFAR10_CLASSES, batch_files, read_batch
from leanseg.data.image_io import (
    ColourMaskError,
    MissingFileError,
    UnreadableFileError,
    read_image,
)
from leanseg.data.pairs import SegmentationDataset, label_error, out_of_range, size_error
from leanseg.errors import DataError

KINDS = {  # problem kind -> heading in the report
    "fatal": "cannot load the split",
    "missing": "missing files",
    "corrupt": "corrupt or unreadable files",
    "colour_mask": "colour (palette-RGB) masks where index masks are expected",
    "size_mismatch": "masks whose size differs from the image",
    "bad_labels": "labels outside [0, num_classes) that are not the ignore index",
}


def _kind(err: DataError) -> str:
    if isinstance(err, MissingFileError):
        return "missing"
    if isinstance(err, ColourMaskError):
        return "colour_mask"
    if isinstance(err, UnreadableFileError):
        return "corrupt"
    return "bad_labels"  # e.g. a colour that is not in the palette


@dataclass
class CheckReport:
    """What a scan of one split found; ``ok`` is False when training on it would fail."""

    dataset: str
    split: str
    root: str = ""
    samples: int = 0
    num_classes: int = 0
    ignore_index: int = 255
    class_names: list[str] = field(default_factory=list)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    unlabelled: int = 0
    needs_labels: bool = True
    problems: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, message: str) -> None:
        """Record one problem (a one-line message naming the file)."""
        self.problems[kind].append(message)

    @property
    def num_problems(self) -> int:
        """How many problems were found, of all kinds."""
        return sum(len(v) for v in self.problems.values())

    @property
    def ok(self) -> bool:
        """True when the split loads and every sample is valid."""
        unlabelled = self.needs_labels and self.unlabelled > 0
        return self.samples > 0 and self.num_problems == 0 and not unlabelled

    def label_values(self) -> list[int]:
        """The label values that occur, in increasing order."""
        return np.flatnonzero(self.histogram).tolist()

    def format(self, max_listed: int = 5) -> str:
        """A readable multi-line summary."""
        lines = [
            f"dataset {self.dataset}, split {self.split}: {self.samples} samples in "
            f"{self.root} ({self.num_classes} classes, ignore index {self.ignore_index})"
        ]
        if self.image_sizes:
            sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.image_sizes.most_common(4))
            more = len(self.image_sizes) - 4
            lines.append(f"image sizes (WxH): {sizes}" + (f" and {more} more" if more > 0 else ""))
        if self.unlabelled:
            lines.append(f"unlabelled images (test list): {self.unlabelled}")
        lines += self._label_lines()
        for kind, messages in self.problems.items():
            if messages:
                lines.append(f"{KINDS[kind]}: {len(messages)}")
                lines += [f"  {m}" for m in messages[:max_listed]]
                if len(messages) > max_listed:
                    lines.append(f"  ... and {len(messages) - max_listed} more")
        if self.ok:
            lines.append("OK: the split is ready for training")
        else:
            n = self.num_problems
            why = f"{n} problem{'s' if n != 1 else ''}" if n else "no valid samples"
            if self.needs_labels and self.unlabelled:
                why = f"{self.unlabelled} images without labels"
            lines.append(f"NOT OK: training would fail ({why})")
        return "\n".join(lines)

    def _label_lines(self) -> list[str]:
        total = int(self.histogram.sum())
        if not total:
            return []

        def name(v: int) -> str:
            if v == self.ignore_index:
                return "ignore"
            return self.class_names[v] if v < len(self.class_names) else "OUT OF RANGE"

        entries = [
            f"{v} {name(v)}: {self.histogram[v]} ({100 * self.histogram[v] / total:.1f}%)"
            for v in self.label_values()
        ]
        lines = [f"label values ({total} pixels or targets):"]
        lines += textwrap.wrap(
            "; ".join(entries),
            98,
            initial_indent="  ",
            subsequent_indent="  ",
            break_on_hyphens=False,
        )
        unseen = [n for v, n in enumerate(self.class_names) if not self.histogram[v]]
        if unseen:
            shown = ", ".join(unseen[:8]) + (", ..." if len(unseen) > 8 else "")
            lines.append(f"classes never seen: {len(unseen)} ({shown})")
        return lines


def _try(report: CheckReport, read: Callable, path: Path) -> np.ndarray | None:
    """``read(path)``, or None after recording the DataError it raised."""
    try:
        return read(path)
    except DataError as err:
        report.add(_kind(err), str(err))
        return None


def scan_dataset(
    dataset: SegmentationDataset,
    report: CheckReport,
    on_sample: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Read every ``(image, mask)`` pair of ``dataset`` and fill ``report``."""
    report.root, report.samples = str(dataset.root), len(dataset)
    k, ignore = dataset.num_classes, dataset.ignore_index
    report.num_classes, report.ignore_index = k, ignore
    report.class_names = list(dataset.class_names)
    for index in range(len(dataset)):
        if on_sample is not None:
            on_sample(index, len(dataset))
        image_path, mask_path = dataset.paths(index)
        image = _try(report, read_image, image_path)
        if image is not None:
            report.image_sizes[(image.shape[1], image.shape[0])] += 1
        if mask_path is None:
            report.unlabelled += 1
            continue
        mask = _try(report, dataset.read_target, mask_path)
        if mask is None:
            continue
        counts = np.bincount(mask.ravel(), minlength=256)
        report.histogram += counts
        bad = out_of_range(counts, k, ignore)
        if bad.size:
            report.add("bad_labels", str(label_error(mask_path, bad, k, ignore)))
        if image is not None and image.shape[:2] != mask.shape:
            report.add("size_mismatch", str(size_error(image_path, image, mask_path, mask)))
    return report


def _scan_cifar(cfg: DataConfig, split: str, report: CheckReport) -> CheckReport:
    report.root, report.num_classes = str(require_root(cfg)), len(CIFAR10_CLASSES)
    report.ignore_index, report.class_names = cfg.ignore_index, list(CIFAR10_CLASSES)
    for path in batch_files(report.root, split):
        batch = _try(report, read_batch, path)
        if batch is not None:
            report.samples += len(batch[1])
            report.image_sizes[(32, 32)] += len(batch[1])
            report.histogram += np.bincount(batch[1], minlength=256)
    return report


def check_dataset(
    cfg: DataConfig,
    split: str | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Scan ``split`` (default: the training split) of the dataset ``cfg`` describes.

    ``on_sample(index, total)`` is called before each sample (for a progress bar)."""
    split = split or cfg.train_split
    report = CheckReport(cfg.dataset, split, needs_labels=split == cfg.train_split)
    try:
        if cfg.dataset == "cifar10":
            return _scan_cifar(cfg, split, report)
        dataset = build_dataset(cfg, split, train=False, check_files=False)
    except DataError as err:
        report.add("fatal", str(err))
        return report
    return scan_dataset(dataset, report, on_sample)
