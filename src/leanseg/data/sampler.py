"""An endless, seeded training sampler that can start at any iteration.

Each item is ``(dataset_index, [seed, epoch, position])``; the dataset seeds that sample's
augmentation from the list. The order and every augmentation are therefore a pure function of
(seed, iteration), whatever the number of workers, which makes ``--resume`` exact. A dataset
that takes plain indices (a user's own) is wrapped in :class:`SeededItems`, which seeds the
global generators per sample instead.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    """Yields samples of consecutive shuffled epochs (drop_last), sharded over ranks.

    ``batch_size`` is the per-process batch; an epoch holds ``len(dataset) // (batch_size *
    world_size)`` iterations. ``start_iteration`` skips what a resumed run already trained on.
    """

    def __init__(
        self,
        length: int,
        *,
        batch_size: int,
        seed: int,
        start_iteration: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.rank = rank
        self.world_size = world_size
        self.iterations_per_epoch = length // (batch_size * world_size)
        if self.iterations_per_epoch == 0:
            raise ValueError(
                f"{length} samples are fewer than one batch ({batch_size} x {world_size} processes)"
            )

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch, skip = divmod(self.start_iteration, self.iterations_per_epoch)
        global_batch = self.batch_size * self.world_size
        while True:
            order = torch.randperm(
                self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            for step in range(skip, self.iterations_per_epoch):
                for slot in range(self.batch_size):
                    position = step * global_batch + self.rank * self.batch_size + slot
                    yield int(order[position]), [self.seed, epoch, position]
            epoch, skip = epoch + 1, 0


class ShardSampler(Sampler):
    """Evaluation order split over ranks without padding: rank r gets r, r + W, r + 2W, ...

    Unlike DistributedSampler it never repeats a sample, so a confusion matrix summed over
    ranks equals the single-process one exactly.
    """

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededItems(Dataset):
    """A dataset that takes plain indices (a user's own), fed by :class:`ResumableSampler`.

    Each ``(index, seed)`` item becomes ``dataset[index]`` called with Python's, NumPy's and
    torch's global generators seeded from ``seed`` (and put back afterwards), so augmentations
    drawn from them are a pure function of (seed, iteration) too, and ``--resume`` stays exact.
    Other attributes (``num_classes``, ``class_names``, ``palette``) are the dataset's.
    """

    seeded_items = True

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item: tuple[int, list[int]] | int) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        words = np.random.SeedSequence(seed).generate_state(4)
        random.seed(int(words[0]))
        np.random.seed(words[1:2])
        torch.manual_seed(int(words[2]) << 32 | int(words[3]))
        try:
            return self.dataset[index]
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.random.set_rng_state(state[2])


def seeded(dataset: Dataset) -> Dataset:
    """``dataset`` itself when it takes ``(index, seed)`` items (``seeded_items = True``, as
    leanseg's datasets), else wrapped in :class:`SeededItems`."""
    return dataset if getattr(dataset, "seeded_items", False) else SeededItems(dataset)
