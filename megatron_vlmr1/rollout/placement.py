"""Which rollout replica generates which prompt, and which ranks receive each result: pure functions of the layout.

A job of ``world`` ranks runs ``world / rollout_tp`` rollout replicas, each a group of ``rollout_tp`` consecutive
ranks (vLLM's ``external_launcher`` tensor-parallel groups; the transformers engine has ``rollout_tp`` 1, so every rank
is a replica). A round's prompts are the data-parallel replicas' batches concatenated in DP order ("global prompt
index"); they are cut into contiguous, balanced chunks, one per rollout replica, with the replicas taken in the order
of their first rank's trainer coordinates (dp, pp, tp). So each prompt is generated exactly once in the job, and when
the layouts line up (``rollout_tp`` = trainer TP, PP = 1) every replica generates exactly its own DP shard and no
result moves. Every rank of a data-parallel replica trains on that replica's prompts; a result it did not generate
comes from one rank of the replica that did (all of that replica's ranks hold the same results), the senders spread
over the producer's ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class RankCoord:
    """A rank's trainer coordinates: data-parallel replica, pipeline stage, tensor-parallel rank."""

    dp: int
    pp: int
    tp: int


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One rank's part of a rollout round (global prompt indices throughout).

    ``generate``: what this rank's rollout replica generates (identical on all its ranks), in order.
    ``train``: the prompts this rank trains on (its data-parallel replica's), in order.
    ``send``: destination rank -> prompts whose results this rank sends there.
    ``recv``: source rank -> prompts whose results this rank receives from there.
    ``total``: the round's prompt count over the whole job (each generated once).
    """

    generate: list[int]
    train: list[int]
    send: dict[int, list[int]]
    recv: dict[int, list[int]]
    total: int


def validate_rollout_tp(rollout_tp: int, world_size: int, trainer_tp: int) -> None:
    """``rollout.tp`` must divide the world and nest with the trainer's TP groups (one divides the other), so a
    vLLM tensor-parallel group stays inside the nodes the trainer's TP groups were placed on."""
    if rollout_tp < 1:
        raise ValueError(f"rollout.tp must be >= 1, got {rollout_tp}")
    if world_size % rollout_tp:
        raise ValueError(f"rollout.tp={rollout_tp} does not divide the world size {world_size}")
    if trainer_tp % rollout_tp and rollout_tp % trainer_tp:
        raise ValueError(f"rollout.tp={rollout_tp} and parallel.tp={trainer_tp}: one must divide the other "
                         f"(rollout TP groups are consecutive ranks, like the trainer's)")


def rollout_replicas(world_size: int, rollout_tp: int) -> list[list[int]]:
    """The ranks of each rollout replica: consecutive groups of ``rollout_tp`` (replica k = ranks k*tp ... )."""
    return [list(range(start, start + rollout_tp)) for start in range(0, world_size, rollout_tp)]


def replica_of(rank: int, rollout_tp: int) -> int:
    return rank // rollout_tp


def split_evenly(total: int, parts: int) -> list[range]:
    """``range(total)`` cut into ``parts`` contiguous chunks whose sizes differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    chunks, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        chunks.append(range(start, start + size))
        start += size
    return chunks


def chunk_owners(coords: Sequence[RankCoord], rollout_tp: int, total: int) -> list[int]:
    """For each global prompt index, the rollout replica that generates it."""
    replicas = rollout_replicas(len(coords), rollout_tp)
    order = sorted(range(len(replicas)), key=lambda k: dataclasses.astuple(coords[replicas[k][0]]))
    owners = [0] * total
    for replica, chunk in zip(order, split_evenly(total, len(replicas))):
        for index in chunk:
            owners[index] = replica
    return owners


def plan_round(coords: Sequence[RankCoord], rollout_tp: int, counts: Sequence[int], rank: int) -> RoundPlan:
    """``rank``'s plan for a round in which data-parallel replica d contributes ``counts[d]`` prompts.

    ``coords[r]`` are rank r's trainer coordinates (``len(coords)`` is the world size).
    """
    world = len(coords)
    if world % rollout_tp:
        raise ValueError(f"rollout tp {rollout_tp} does not divide the world size {world}")
    total = sum(counts)
    owners = chunk_owners(coords, rollout_tp, total)
    dp_of_prompt = [d for d, count in enumerate(counts) for _ in range(count)]
    replicas = rollout_replicas(world, rollout_tp)
    mine = replica_of(rank, rollout_tp)
    send: dict[int, list[int]] = {}
    recv: dict[int, list[int]] = {}
    for index in range(total):
        producers = replicas[owners[index]]
        for dst in range(world):
            if coords[dst].dp != dp_of_prompt[index] or dst in producers:
                continue
            src = producers[dst % rollout_tp]
            if src == rank:
                send.setdefault(dst, []).append(index)
            if dst == rank:
                recv.setdefault(src, []).append(index)
    return RoundPlan(generate=[i for i in range(total) if owners[i] == mine],
                     train=[i for i in range(total) if dp_of_prompt[i] == coords[rank].dp],
                     send=send, recv=recv, total=total)


def prompt_seed(run_seed: int, step: int, round_index: int, prompt_index: int) -> int:
    """The sampling seed of one prompt: fixed by (run seed, step, dynamic-sampling round, global prompt index).

    Not by the replica that generates it, so the samples do not depend on how prompts are split over replicas, and a
    resumed run samples what an uninterrupted one would. Every rank of a vLLM TP group derives the same seed.
    """
    return (run_seed * 1_000_003 + step * 10_007 + round_index * 101 + prompt_index * 7_919) % (2**31 - 1)
