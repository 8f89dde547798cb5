"""An endless, seeded training sampler that can start at any iteration.

Each item is ``(dataset_index, [seed, epoch, position])``; the dataset seeds that sample's
augmentation from the list. The order and every augmentation are therefore a pure function of
(seed, iteration), whatever the number of workers, which makes ``--resume`` exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
