"""RolloutRouter over 4 gloo ranks: each prompt generated once, every training rank gets its replica's results."""
from __future__ import annotations

from tests.distributed import run_distributed
from tests.rollout.test_placement import TP2_DP2, TP2_PP2


def _rounds(rank, world_size, rollout_tp):
    return [_round(rank, world_size, layout, rollout_tp) for layout in (TP2_PP2, TP2_DP2)]


def _round(rank, world_size, layout, rollout_tp):
    import torch
    import torch.distributed as dist

    from megatron_vlmr1.rollout.exchange import RolloutRouter, exchange_objects

    coord = layout[rank]
    dp_size = max(c.dp for c in layout) + 1
    groups = {}
    for key in sorted({(c.pp, c.tp) for c in layout}):  # every rank creates every group, in the same order
        groups[key] = dist.new_group([r for r, c in enumerate(layout) if (c.pp, c.tp) == key])
    router = RolloutRouter(coord, rollout_tp, groups[(coord.pp, coord.tp)], dp_size, torch.device("cpu"))
    calls = []

    def generate(items, indices):
        calls.append(list(indices))
        return [f"completion of {item}" for item in items]

    out = []
    for round_index, counts in enumerate([[4 // dp_size] * dp_size, [0] * (dp_size - 1) + [1]]):
        batch = [f"r{round_index}d{coord.dp}p{i}" for i in range(counts[coord.dp])]
        out.append((router.run_round(batch, generate), router.last_plan.total))
    direct = exchange_objects({(rank + 1) % world_size: {"from": rank}}, [(rank - 1) % world_size],
                              torch.device("cpu"))
    return out, calls, direct


def test_router_over_tp2_pp2_and_tp2_dp2():
    per_rank = run_distributed(_rounds, 4, 2)
    for which, layout in enumerate((TP2_PP2, TP2_DP2)):
        results = [r[which] for r in per_rank]
        generated = []
        for rank, (rounds, calls, direct) in enumerate(results):
            coord = layout[rank]
            dp_size = max(c.dp for c in layout) + 1
            first, second = rounds
            assert first == ([f"completion of r0d{coord.dp}p{i}" for i in range(4 // dp_size)], 4)
            expected_second = [f"completion of r1d{dp_size - 1}p0"] if coord.dp == dp_size - 1 else []
            assert second == (expected_second, 1)
            assert direct == {(rank - 1) % 4: {"from": (rank - 1) % 4}}
            if coord.tp == 0:  # one rank per rollout replica counts its calls
                generated += [len(c) for c in calls]
        assert sum(generated) == 4 + 1  # every prompt of both rounds generated exactly once in the job
