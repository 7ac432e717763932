"""Prompt batches: per-epoch shuffles by seed, exact resume, data-parallel ranks partition every global batch."""
from __future__ import annotations

import itertools

import pytest

from megatron_vlmr1.data import BatchIterator, epoch_order, shard


def _take(it: BatchIterator, steps: int) -> list[list[int]]:
    return [next(it) for _ in range(steps)]


def test_same_seed_same_order_other_seed_other_order():
    items = list(range(50))
    assert _take(BatchIterator(items, 5, seed=1), 20) == _take(BatchIterator(items, 5, seed=1), 20)
    assert _take(BatchIterator(items, 5, seed=1), 20) != _take(BatchIterator(items, 5, seed=2), 20)


def test_each_epoch_is_a_fresh_permutation():
    items = list(range(12))
    it = BatchIterator(items, 4, seed=0)
    epochs = [sum(_take(it, 3), []) for _ in range(3)]
    assert all(sorted(e) == items for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert it.epoch == 2
    assert _take(BatchIterator(items, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_incomplete_tail_is_dropped_and_next_epoch_starts():
    it = BatchIterator(list(range(10)), 4, seed=0)
    first = _take(it, 2)
    assert it.steps_per_epoch == 2 and it.epoch == 0
    third = next(it)
    assert it.epoch == 1
    assert first == [epoch_order(10, 0, 0)[:4].tolist(), epoch_order(10, 0, 0)[4:8].tolist()]
    assert third == epoch_order(10, 1, 0)[:4].tolist()


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 5, 7])  # includes stops at and across epoch ends
def test_resume_equals_uninterrupted(stop):
    items = list(range(14))
    reference = _take(BatchIterator(items, 3, seed=7, rank=1, world_size=2), 10)
    first = BatchIterator(items, 3, seed=7, rank=1, world_size=2)
    before = _take(first, stop)
    state = first.state_dict()
    resumed = BatchIterator(items, 3, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert before + _take(resumed, 10 - stop) == reference


def test_ranks_partition_each_global_batch():
    items = list(range(30))
    world = 3
    ranks = [BatchIterator(items, 2, seed=4, rank=r, world_size=world) for r in range(world)]
    single = BatchIterator(items, 2 * world, seed=4)
    for _ in range(12):  # more than two epochs
        per_rank = [next(it) for it in ranks]
        merged = list(itertools.chain(*per_rank))
        assert len(set(merged)) == len(merged)  # disjoint across ranks
        assert merged == next(single)  # together exactly the global batch


def test_resume_at_another_data_parallel_size():
    items = list(range(24))
    two = [BatchIterator(items, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        for it in two:
            next(it)
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # every rank saves the same state
    one = BatchIterator(items, 4, seed=3)
    one.load_state_dict(state)
    reference = BatchIterator(items, 4, seed=3)
    _take(reference, 2)
    assert _take(one, 5) == _take(reference, 5)


def test_state_from_other_data_or_seed_is_rejected():
    state = BatchIterator(list(range(10)), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        BatchIterator(list(range(11)), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        BatchIterator(list(range(10)), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        BatchIterator(list(range(10)), 2, seed=0).load_state_dict({**state, "position": 11})


def test_shard_partitions_for_evaluation():
    items = list(range(11))
    shards = [shard(items, r, 4) for r in range(4)]
    assert sorted(itertools.chain(*shards)) == items
    assert [len(s) for s in shards] == [3, 3, 3, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 2, "world_size": 2}, "need 0 <= rank < world_size"),
    ({"rank": 0, "world_size": 0}, "need 0 <= rank < world_size"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_size": 4, "world_size": 3}, "cannot fill one global batch"),
])
def test_bad_arguments(kwargs, message):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        BatchIterator(list(range(10)), kwargs.pop("batch_size"), **kwargs)
