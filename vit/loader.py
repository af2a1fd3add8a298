"""Data loaders whose every random choice is a function of (seed, epoch, position).

The training order is a seeded permutation per epoch, cut into global batches that the
processes share out; each sample's augmentation draws from a generator seeded by
(seed, epoch, index). So a run is reproducible whatever the number of workers, a resumed run
can start in the middle of an epoch, and N processes see exactly the batches one process
would (the same global batch, split N ways).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class AugmentedDataset(Dataset):
    """A source of uint8 images with a transform; items are addressed as (epoch, index).

    ``collate`` is the loader's ``collate_fn`` for the transform's output (None: torch's
    default), e.g. a :class:`vit.transforms.BatchNormalize` after a transform that stops
    at uint8.
    """

    def __init__(self, source, transform, seed: int = 0, collate=None):
        self.source = source
        self.transform = transform
        self.seed = seed
        self.collate = collate

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.source.get(index)
        # a fresh generator per sample: the augmentation depends on nothing but its key
        rng = np.random.default_rng([self.seed, epoch, index])
        self.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        return self.transform(image=image)["image"], label


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled global batches of ``batch_size * world_size``; this rank's slice of each.

    Incomplete last batches are dropped so that every process takes the same number of steps.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        if len(self) == 0:
            raise ValueError(
                f"{num_samples} training samples cannot fill one global batch of "
                f"{batch_size} x {world_size} processes; lower data.batch_size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's permutation and the batch to start from (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            start = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[start : start + self.batch_size]]


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of an evaluation set: disjoint, together covering every sample once."""
    return list(range(rank, num_samples, world_size))


def _own_generator(seed: int) -> torch.Generator:
    """A generator for the loader's worker base seed.

    Without one, every ``iter(loader)`` draws from the global torch generator, so a run
    resumed mid-epoch (one more ``iter`` than the uninterrupted run at that point) would
    shift every later dropout and drop-path mask.
    """
    return torch.Generator().manual_seed(seed)


def train_loader(
    dataset: AugmentedDataset,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> DataLoader:
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=dataset.collate,
        pin_memory=torch.cuda.is_available(),
        generator=_own_generator(seed),
    )


def eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int
) -> DataLoader:
    subset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), rank, world_size))
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=_own_generator(0),
    )
