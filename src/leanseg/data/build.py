"""Datasets and loaders from the ``data`` section of a config.

``DATASETS`` maps each ``data.dataset`` name to its builder and default class count; a builder
takes ``(cfg, split, train, check_files)`` and returns a dataset that follows the contract of
:class:`~leanseg.data.pairs.SegmentationDataset` (CIFAR-10: a 0-d class target).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from leanseg.config import DataConfig, check_data_keys
from leanseg.data.ade20k import ADE20K_CLASSES, ADE20KSegmentation
from leanseg.data.camvid import CAMVID_CLASSES, CamVidSegmentation
from leanseg.data.cifar10 import CIFAR10, CIFAR10_CLASSES
from leanseg.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation
from leanseg.data.folder import FolderSegmentation, read_palette_file
from leanseg.data.normalization import data_normalization
from leanseg.data.sampler import ResumableSampler, ShardSampler, seeded
from leanseg.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic
from leanseg.data.transforms import build_eval_transform, build_train_transform
from leanseg.data.voc import VOC_CLASSES, VOCSegmentation
from leanseg.errors import ConfigError, DataError

Builder = Callable[[DataConfig, str, bool, bool], Dataset]  # (cfg, split, train, check_files)


class SyntheticSegmentation(VOCSegmentation):
    """The generated synthetic set: VOC layout, seven classes."""

    CLASSES = SYNTHETIC_CLASSES


def _transform(cfg: DataConfig, train: bool) -> Callable:
    """The training augmentation or the evaluation transform, normalised with
    :func:`~leanseg.data.normalization.data_normalization` (``data.mean`` / ``data.std``)."""
    mean, std = data_normalization(cfg)
    if train:
        return build_train_transform(
            (cfg.crop_size, cfg.crop_width or cfg.crop_size),
            scale=(cfg.scale_min, cfg.scale_max),
            rotate=cfg.rotate,
            blur=cfg.blur,
            flip=cfg.flip,
            mean=mean,
            std=std,
            jitter=(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
        )
    return build_eval_transform(cfg.crop_val, mean=mean, std=std)


def require_root(cfg: DataConfig) -> Path:
    """``data.root`` as a Path (a ConfigError when it is not set)."""
    if not cfg.root:
        raise ConfigError(f"config key 'data.root': required for dataset {cfg.dataset}")
    return Path(cfg.root)


def _list_file(cfg: DataConfig, split: str) -> str | None:
    return None if cfg.list_file is None else cfg.list_file.replace("{split}", split)


def _options(cfg: DataConfig, split: str, train: bool, check_files: bool) -> dict[str, Any]:
    """Keyword arguments every segmentation dataset takes."""
    return dict(
        list_file=_list_file(cfg, split),
        num_classes=cfg.num_classes,
        ignore_index=cfg.ignore_index,
        class_names=cfg.class_names,
        transform=_transform(cfg, train),
        check_files=check_files,
    )


def _from_root(dataset_class: type, **extra: Any) -> Builder:
    """A builder of ``dataset_class(data.root, split, ...)``."""

    def build(cfg: DataConfig, split: str, train: bool, check_files: bool) -> Dataset:
        options = _options(cfg, split, train, check_files)
        return dataset_class(require_root(cfg), split, **extra, **options)

    return build


def _synthetic(cfg: DataConfig, split: str, train: bool, check_files: bool) -> Dataset:
    cache = Path(cfg.root) if cfg.root else None
    root = ensure_synthetic(
        cache, seed=cfg.synthetic_seed, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val
    )
    return SyntheticSegmentation(root, split, **_options(cfg, split, train, check_files))


def _folder(cfg: DataConfig, split: str, train: bool, check_files: bool) -> Dataset:
    options = _options(cfg, split, train, check_files)
    colours = None
    if cfg.palette_file:
        colours, names = read_palette_file(cfg.palette_file)
        options["class_names"] = cfg.class_names or names
    return FolderSegmentation(
        require_root(cfg),
        split,
        colours=colours,
        val_fraction=cfg.val_fraction,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
        **options,
    )


def _cifar10(cfg: DataConfig, split: str, train: bool, check_files: bool) -> Dataset:
    mean, std = data_normalization(cfg)
    return CIFAR10(
        require_root(cfg), split, augment=train, ignore_index=cfg.ignore_index, mean=mean, std=std
    )


class DatasetSpec(NamedTuple):
    """How to build a dataset and how many classes it has by default."""

    build: Builder
    num_classes: int | None


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(_synthetic, len(SYNTHETIC_CLASSES)),
    "voc": DatasetSpec(_from_root(VOCSegmentation), len(VOC_CLASSES)),
    "voc_aug": DatasetSpec(_from_root(VOCSegmentation, aug=True), len(VOC_CLASSES)),
    "cityscapes": DatasetSpec(_from_root(CityscapesSegmentation), len(CITYSCAPES_CLASSES)),
    "ade20k": DatasetSpec(_from_root(ADE20KSegmentation), len(ADE20K_CLASSES)),
    "camvid": DatasetSpec(_from_root(CamVidSegmentation), len(CAMVID_CLASSES)),
    "folder": DatasetSpec(_folder, None),
    "cifar10": DatasetSpec(_cifar10, len(CIFAR10_CLASSES)),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"config key 'data.dataset': {name!r} is not one of {list(DATASETS)}")
    return DATASETS[name]


def dataset_num_classes(cfg: DataConfig | str) -> int:
    """The class count of a dataset (``data.num_classes`` wins when a config is given)."""
    if isinstance(cfg, str):
        cfg = DataConfig(dataset=cfg)
    if cfg.num_classes:
        return cfg.num_classes
    if cfg.dataset == "folder" and cfg.palette_file:
        return len(read_palette_file(cfg.palette_file)[0])
    n = _spec(cfg.dataset).num_classes
    if n is None:
        raise ConfigError(f"config key 'data.num_classes': required for dataset {cfg.dataset}")
    return n


def build_dataset(cfg: DataConfig, split: str, *, train: bool, check_files: bool = True) -> Dataset:
    """One split, with the recipe's training augmentation or the evaluation transform.

    ``check_files=False`` skips the existence check of listed files (``check_dataset``)."""
    spec = _spec(cfg.dataset)
    check_data_keys(cfg)
    dataset = spec.build(cfg, split, train, check_files)
    pairs = getattr(dataset, "pairs", ())
    if train and any(mask is None for _, mask in pairs):
        raise DataError(
            f"split '{split}' of '{dataset.root}' lists images without labels (a test list); "
            "training needs 'image label' pairs"
        )
    return dataset


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of a config."""
    return build_dataset(cfg, cfg.train_split, train=True), build_dataset(
        cfg, cfg.val_split, train=False
    )


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group; the workers
    ignore it, and the main process stops at an iteration boundary and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(
    dataset: Dataset,
    cfg: DataConfig,
    *,
    seed: int,
    start_iteration: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """An endless loader whose batches depend only on (seed, iteration); ``cfg.batch_size`` is
    per process, each rank gets its own share of every global batch."""
    sampler = ResumableSampler(
        len(dataset),
        batch_size=cfg.batch_size,
        seed=seed,
        start_iteration=start_iteration,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        seeded(dataset),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        worker_init_fn=ignore_interrupts_in_worker,  # the main process stops them cleanly
    )


def val_loader(
    dataset: Dataset, cfg: DataConfig, *, pin_memory: bool, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Validation in dataset order, sharded over ranks without padding (see ShardSampler);
    whole images of varying size need batch 1 unless cropped."""
    return DataLoader(
        dataset,
        batch_size=cfg.val_batch_size,
        sampler=ShardSampler(len(dataset), rank=rank, world_size=world_size),
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_interrupts_in_worker,
    )
