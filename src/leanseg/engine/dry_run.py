"""``leanseg train --dry-run``: check a recipe end to end without its dataset.

Validates the config, builds the model, optimizer and AMP setup exactly as training would,
runs two training iterations and one validation on generated data of the recipe's shapes
(crop size, class count) and reports the resolved recipe. Each iteration uses at most
``DRY_RUN_BATCH`` samples, so that recipes meant for a GPU (batch 16 at 713 px) fit a laptop;
the recipe's own batch size is validated and printed.

A recipe that distils from a teacher checkpoint that does not exist yet (the student recipe of a
teacher run still to train) still runs its KD loss: when ``distill.teacher`` is missing, a
randomly initialised model named by ``distill.teacher_model`` stands in for it, and the report
says so. A real run with a missing teacher is a one-line error naming ``distill.teacher``.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from leanseg.config import Config, to_yaml
from leanseg.data.palettes import voc_palette
from leanseg.errors import ConfigError

DRY_RUN_BATCH = 2  # the smallest batch BatchNorm trains with


class GeneratedDataset(Dataset):
    """Deterministic random images and labels shaped like a recipe's samples."""

    seeded_items = True  # takes the training sampler's (index, seed) items

    def __init__(
        self,
        length: int,
        *,
        size: tuple[int, int],
        num_classes: int,
        ignore_index: int = 255,
        classification: bool = False,
    ) -> None:
        self.length, self.size = length, size
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.classification = classification
        self.class_names = [f"class_{i}" for i in range(num_classes)]
        self.palette = voc_palette(256)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple) -> tuple[torch.Tensor, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, *self.size, generator=generator)
        if self.classification:
            return image, torch.randint(self.num_classes, (), generator=generator)
        mask = torch.randint(self.num_classes, self.size, generator=generator)
        mask[0, :] = self.ignore_index  # a void row, as real masks have
        return image, mask


def dry_run(cfg: Config, num_classes: int, *, classification: bool = False) -> str:
    """Two training iterations and one validation on generated data; returns a report."""
    from leanseg.data.build import train_loader
    from leanseg.engine.trainer import Trainer, model_summary

    batch = cfg.data.batch_size
    run = copy.deepcopy(cfg)  # the recipe as printed stays untouched
    run.data.batch_size, run.data.workers = min(batch, DRY_RUN_BATCH), 0
    run.train.loggers = []
    size = (cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size)
    shape = dict(
        size=size,
        num_classes=num_classes,
        ignore_index=cfg.data.ignore_index,
        classification=classification,
    )
    datasets = (GeneratedDataset(2 * run.data.batch_size, **shape), GeneratedDataset(2, **shape))
    teacher, notes = stand_in(cfg, num_classes)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(run, Path(run_dir), progress=False, datasets=datasets, teacher=teacher)
        trainer.open_log()
        loader = train_loader(
            datasets[0], run.data, seed=run.train.seed, start_iteration=0, pin_memory=False
        )
        batches = iter(loader)
        losses = []
        for _ in range(2):
            images, targets = next(batches)
            losses.append(trainer.train_step(images.to(trainer.device), targets.to(trainer.device)))
            trainer.iteration += 1
        metrics = trainer.validate()
        summary = model_summary(trainer.model)
    return "\n".join(
        [
            "resolved recipe:",
            to_yaml(cfg).rstrip(),
            f"model: {summary}",
            f"dry run: 2 iterations of {min(batch, DRY_RUN_BATCH)} samples (recipe batch {batch}) "
            f"at {size[0]}x{size[1]} px, "
            f"losses {losses[0]:.4f} {losses[1]:.4f}; validation ran (mIoU {metrics.miou:.4f} on "
            "random data); config, model, optimizer and data shapes are consistent",
            *notes,
        ]
    )


def stand_in(cfg: Config, num_classes: int) -> tuple[torch.nn.Module | None, list[str]]:
    """(the dry run's stand-in teacher or None, report lines): a random ``distill.teacher_model``
    when ``distill.teacher`` is set but its file does not exist; None (the real teacher is
    loaded, or there is none) otherwise."""
    from leanseg.engine.teacher import stand_in_teacher

    distill = cfg.distill
    if distill.teacher is None:
        return None, []
    if Path(distill.teacher).is_file():
        return None, [f"distill: teacher {distill.teacher} loaded and checked"]
    if distill.teacher_model is None:
        raise ConfigError(
            f"config key 'distill.teacher': teacher checkpoint '{distill.teacher}' not found; "
            "train the teacher first, or set distill.teacher_model to a model name so that the "
            "dry run stands in a randomly initialised teacher"
        )
    teacher = stand_in_teacher(distill.teacher_model, num_classes, "cpu")
    return teacher, [
        f"distill: teacher checkpoint '{distill.teacher}' not found: a randomly initialised "
        f"{distill.teacher_model} (distill.teacher_model) stood in for it, so the KD loss ran "
        "(its value means nothing); a real run needs the trained teacher there"
    ]
