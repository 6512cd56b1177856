"""The order training sees its items in: a function of (seed, position), so a stopped run resumes exactly.

`ResumableSampler` gives item indices (a fresh permutation each epoch), `BucketBatchSampler` whole batches of one
aspect-ratio bucket each; `training.streaming.ShardStream` is the order of streamed shards. All are `DataOrder`s,
which `training.loop.ExactResume` positions from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ldm.errors import InputError


def rank_and_world() -> tuple[int, int]:
    """This process's data-parallel rank and the number of ranks (0, 1 outside distributed training)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s order of `size` things: the one permutation every data order here draws."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


class DataOrder:
    """What `ExactResume` needs of a data order: continue after a number of steps, and (for streams, whose position
    is not a function of the step alone) a state that travels in the checkpoint and is updated from each batch."""

    def resume_at(self, steps: int, samples_per_step: int) -> None:
        """Continue after `steps` optimizer steps of `samples_per_step` samples (all ranks together)."""
        raise NotImplementedError

    def observe(self, batch: Any) -> None:
        """Note a batch that training consumed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the position a checkpoint's `state_dict()` recorded."""


class ResumableSampler(DataOrder, Sampler[int]):
    """An endless stream of dataset indices: epoch e is a permutation drawn from (seed, e).

    The stream is split across data-parallel ranks by interleaving (rank r takes positions r, r + W, ...),
    and `start` (samples already consumed by all ranks together) skips what a resumed run has seen. With
    `with_epochs`, index i of epoch e is given as `e * N + i`, for data sets whose items vary by epoch (random
    crops; see `training.dataset`).
    """

    def __init__(self, dataset_size: int, seed: int = 0, shuffle: bool = True, with_epochs: bool = False) -> None:
        if dataset_size <= 0:
            raise ValueError("the dataset is empty")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.with_epochs = with_epochs
        self.start = 0

    def resume_at(self, steps: int, samples_per_step: int) -> None:
        self.start = steps * samples_per_step

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        return epoch_permutation(self.dataset_size, self.seed, epoch)

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_and_world()
        position = self.start + rank
        epoch, order = -1, []
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self._order(epoch)
            index = order[position % self.dataset_size]
            yield epoch * self.dataset_size + index if self.with_epochs else index
            position += world


class BucketBatchSampler(DataOrder, Sampler[list[int]]):
    """An endless stream of batches, each from one bucket: epoch e shuffles every bucket's items and the order of
    the batches from (seed, e). Ranks interleave batches (rank r takes r, r + W, ...); `start` (batches taken by all
    ranks together) skips what a resumed run has seen. Endless, like `ResumableSampler` (no `__len__`: Lightning would
    restart it at every epoch end); `max_steps` ends training. Indices are `epoch * N + item`, as `ResumableSampler(...,
    with_epochs=True)` gives them, so per-epoch randomness (random crops) stays reproducible."""

    def __init__(self, item_buckets: Sequence[tuple[int, int]], batch_size: int, seed: int = 0) -> None:
        if not item_buckets:
            raise InputError("the dataset is empty")
        self.size = len(item_buckets)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.start = 0

    def resume_at(self, steps: int, samples_per_step: int) -> None:
        self.start = steps * (samples_per_step // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.groups):
            members = self.groups[bucket]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [[epoch * self.size + i for i in batches[k]] for k in shuffled]

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = rank_and_world()
        position, epoch, batches = self.start + rank, 0, self.epoch_batches(0)
        consumed = 0  # batches of the epochs before `epoch`
        while True:
            while position - consumed >= len(batches):
                consumed += len(batches)
                epoch += 1
                batches = self.epoch_batches(epoch)
            yield batches[position - consumed]
            position += world
