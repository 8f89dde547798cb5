"""The input normalisation of a run: ``x = (pixel / 255 - mean) / std`` per RGB channel.

``data.mean`` / ``data.std`` (3 values each, in [0, 1] RGB units) set it; null keeps the
dataset's default (CIFAR-10 statistics for ``cifar10``, ImageNet's for every other dataset).
Training transforms, eval, predict, the Predictor, export and a distillation teacher all read
it from here, so a checkpoint is always fed inputs normalised as it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from leanseg.data.cifar10 import CIFAR_MEAN, CIFAR_STD
from leanseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

Stats = tuple[tuple[float, ...], tuple[float, ...]]

__all__ = ["Stats", "data_normalization", "dataset_normalization", "recorded_normalization"]


def dataset_normalization(dataset: str | None) -> Stats:
    """The default ``(mean, std)`` of a ``data.dataset`` (CIFAR-10's or ImageNet's)."""
    if dataset == "cifar10":
        return tuple(CIFAR_MEAN), tuple(CIFAR_STD)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def data_normalization(data: Any) -> Stats:
    """``(mean, std)`` of a ``data`` section (a :class:`~leanseg.config.DataConfig` or its
    plain-dict form): ``data.mean`` / ``data.std`` where set, else the dataset's default."""
    if is_dataclass(data):
        data = asdict(data)
    data = data if isinstance(data, Mapping) else {}
    mean, std = dataset_normalization(data.get("dataset"))
    if data.get("mean") is not None:
        mean = tuple(float(v) for v in data["mean"])
    if data.get("std") is not None:
        std = tuple(float(v) for v in data["std"])
    return mean, std


def recorded_normalization(payload: Mapping[str, Any]) -> Stats:
    """The ``(mean, std)`` a checkpoint's model was trained on, from its recorded config
    (:func:`data_normalization` of ``config.data``); a checkpoint without a config (not
    written by the trainer) is taken to use the ImageNet default."""
    config = payload.get("config")
    data = config.get("data", {}) if isinstance(config, Mapping) else {}
    return data_normalization(data)
