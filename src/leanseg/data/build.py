"""Datasets and loaders from the ``data`` section of a config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from leanseg.config import DataConfig
from leanseg.data.sampler import ResumableSampler
from leanseg.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic
from leanseg.data.transforms import build_eval_transform, build_train_transform
from leanseg.data.voc import VOC_CLASSES, VOCSegmentation
from leanseg.errors import ConfigError


def dataset_root(cfg: DataConfig) -> tuple[Path, list[str]]:
    """The dataset directory (generating the synthetic set on first use) and its class names."""
    if cfg.dataset == "synthetic":
        cache = Path(cfg.root) if cfg.root else None
        root = ensure_synthetic(
            cache, seed=cfg.synthetic_seed, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val
        )
        return root, list(SYNTHETIC_CLASSES)
    if not cfg.root:
        raise ConfigError("config key 'data.root': required for dataset voc (a VOC2012 directory)")
    return Path(cfg.root), list(VOC_CLASSES)


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> VOCSegmentation:
    """One split, with the recipe's training augmentation or the evaluation transform."""
    root, class_names = dataset_root(cfg)
    num_classes = cfg.num_classes or len(class_names)
    if num_classes != len(class_names):
        class_names = [f"class_{i}" for i in range(num_classes)]
    if train:
        transform = build_train_transform(
            cfg.crop_size,
            scale=(cfg.scale_min, cfg.scale_max),
            rotate=cfg.rotate,
            blur=cfg.blur,
            flip=cfg.flip,
        )
    else:
        transform = build_eval_transform(cfg.crop_val)
    return VOCSegmentation(
        root,
        split,
        num_classes=num_classes,
        ignore_index=cfg.ignore_index,
        transform=transform,
        class_names=class_names,
    )


def build_datasets(cfg: DataConfig) -> tuple[VOCSegmentation, VOCSegmentation]:
    """(train, val) datasets of a config."""
    return build_dataset(cfg, cfg.train_split, train=True), build_dataset(
        cfg, cfg.val_split, train=False
    )


def train_loader(
    dataset: Dataset, cfg: DataConfig, *, seed: int, start_iteration: int, pin_memory: bool
) -> DataLoader:
    """An endless loader whose batches depend only on (seed, iteration)."""
    sampler = ResumableSampler(
        len(dataset), batch_size=cfg.batch_size, seed=seed, start_iteration=start_iteration
    )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )


def val_loader(dataset: Dataset, cfg: DataConfig, *, pin_memory: bool) -> DataLoader:
    """Validation in dataset order; whole images of varying size need batch 1 unless cropped."""
    return DataLoader(
        dataset,
        batch_size=cfg.val_batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
