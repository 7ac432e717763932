"""Deterministic, resumable, data-parallel batches of prompts.

The order is a pure function of (seed, epoch): each epoch is a fresh permutation of all items, cut into global
batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th slice of each global batch, so the ranks of one
step see disjoint prompts and together see the whole global batch. The incomplete tail of an epoch is dropped (every
rank must run the same number of steps); the next epoch reshuffles, so a different tail is dropped each time.

The state is (epoch, position) with position counted in *global* items consumed, so a checkpoint taken at one
data-parallel size resumes at another without repeating or skipping prompts within the epoch. Ranks and world
size are plain ints: this module never imports ``torch.distributed``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_order(num_items: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Index order ``[num_items]`` of one epoch; the same (seed, epoch) always gives the same order."""
    if not shuffle:
        return np.arange(num_items)
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` for evaluation: every item exactly once over all ranks, nothing dropped."""
    _check_rank(rank, world_size)
    return list(items[rank::world_size])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class BatchIterator(Generic[T]):
    """Endless per-rank batches over ``items``; ``state_dict`` / ``load_state_dict`` resume exactly."""

    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(items) < batch_size * world_size:
            raise ValueError(f"{len(items)} prompts cannot fill one global batch of batch_size={batch_size} x "
                             f"world_size={world_size}")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order = epoch_order(len(items), 0, seed, shuffle)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.items) // self.global_batch_size

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        if self.position + self.global_batch_size > len(self.items):
            self._start_epoch(self.epoch + 1)
        start = self.position + self.rank * self.batch_size
        batch = [self.items[int(i)] for i in self._order[start:start + self.batch_size]]
        self.position += self.global_batch_size
        return batch

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._order = epoch_order(len(self.items), epoch, self.seed, self.shuffle)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_items": len(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the data and the seed must be the ones the state was taken with."""
        expected = {"seed": self.seed, "shuffle": self.shuffle, "num_items": len(self.items)}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            raise ValueError(f"data iterator state does not match this data (saved, now): {changed}")
        position = int(state["position"])
        if not 0 <= position <= len(self.items):
            raise ValueError(f"data iterator state position {position} is outside 0..{len(self.items)}")
        self._start_epoch(int(state["epoch"]))
        self.position = position
