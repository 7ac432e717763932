"""Rollout placement: which replica generates which prompt, who sends what to whom (hand-computed layouts)."""
from __future__ import annotations

import pytest

from megatron_vlmr1.rollout.placement import (
    RankCoord,
    chunk_owners,
    plan_round,
    prompt_seed,
    rollout_replicas,
    split_evenly,
    validate_rollout_tp,
)

# megatron's rank order is tp fastest, then dp, then pp
TP2_PP2 = [RankCoord(0, 0, 0), RankCoord(0, 0, 1), RankCoord(0, 1, 0), RankCoord(0, 1, 1)]
TP2_DP2 = [RankCoord(0, 0, 0), RankCoord(0, 0, 1), RankCoord(1, 0, 0), RankCoord(1, 0, 1)]
PP2_DP2 = [RankCoord(0, 0, 0), RankCoord(1, 0, 0), RankCoord(0, 1, 0), RankCoord(1, 1, 0)]


def test_split_evenly_and_replicas():
    assert split_evenly(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_evenly(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]
    assert rollout_replicas(4, 2) == [[0, 1], [2, 3]]
    assert rollout_replicas(4, 1) == [[0], [1], [2], [3]]


def test_trainer_tp2_pp2_vllm_tp2_generates_each_prompt_once_and_fills_both_stages():
    plans = [plan_round(TP2_PP2, 2, [4], rank) for rank in range(4)]
    assert [p.generate for p in plans] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(p.train == [0, 1, 2, 3] and p.total == 4 for p in plans)
    # each rank receives the other stage's half from the rank at its own tensor position
    assert [p.send for p in plans] == [{2: [0, 1]}, {3: [0, 1]}, {0: [2, 3]}, {1: [2, 3]}]
    assert [p.recv for p in plans] == [{2: [2, 3]}, {3: [2, 3]}, {0: [0, 1]}, {1: [0, 1]}]


def test_trainer_tp2_dp2_vllm_tp2_generates_its_own_shard_and_moves_nothing():
    plans = [plan_round(TP2_DP2, 2, [2, 2], rank) for rank in range(4)]
    assert [p.generate for p in plans] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [p.train for p in plans] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(not p.send and not p.recv for p in plans)


def test_dynamic_sampling_round_where_one_replica_is_satisfied_shares_the_work():
    plans = [plan_round(TP2_DP2, 2, [0, 2], rank) for rank in range(4)]
    assert [p.generate for p in plans] == [[0], [0], [1], [1]]
    assert [p.train for p in plans] == [[], [], [0, 1], [0, 1]]
    assert [p.send for p in plans] == [{2: [0]}, {3: [0]}, {}, {}]
    assert [p.recv for p in plans] == [{}, {}, {0: [0]}, {1: [0]}]


def test_transformers_engine_splits_a_dp_replica_over_its_own_ranks():
    # world 4 = PP2 x DP2, one rank per replica; replicas ordered by (dp, pp): ranks 0, 2 (dp 0), then 1, 3 (dp 1)
    assert chunk_owners(PP2_DP2, 1, 4) == [0, 2, 1, 3]
    plans = [plan_round(PP2_DP2, 1, [2, 2], rank) for rank in range(4)]
    assert [p.generate for p in plans] == [[0], [2], [1], [3]]
    assert [p.train for p in plans] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert [p.send for p in plans] == [{2: [0]}, {3: [2]}, {0: [1]}, {1: [3]}]
    assert [p.recv for p in plans] == [{2: [1]}, {3: [3]}, {0: [0]}, {1: [2]}]


def test_more_replicas_than_prompts_leaves_some_idle():
    plans = [plan_round([RankCoord(0, 0, 0), RankCoord(0, 0, 1)], 1, [1], rank) for rank in range(2)]
    assert [p.generate for p in plans] == [[0], []]
    assert plans[0].send == {1: [0]} and plans[1].recv == {0: [0]}


def test_prompt_seed_is_fixed_by_run_step_round_and_prompt():
    assert prompt_seed(1234, 2, 1, 3) == (1234 * 1_000_003 + 2 * 10_007 + 101 + 3 * 7_919) == 1234047574
    seeds = {prompt_seed(0, step, r, i) for step in range(20) for r in range(3) for i in range(64)}
    assert len(seeds) == 20 * 3 * 64


def test_rollout_tp_must_divide_the_world_and_nest_with_trainer_tp():
    validate_rollout_tp(2, 4, 2)
    validate_rollout_tp(4, 8, 2)
    validate_rollout_tp(1, 4, 2)
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        validate_rollout_tp(3, 4, 1)
    with pytest.raises(ValueError, match="one must divide the other"):
        validate_rollout_tp(2, 6, 3)
    with pytest.raises(ValueError, match="rollout.tp must be >= 1"):
        validate_rollout_tp(0, 4, 1)
