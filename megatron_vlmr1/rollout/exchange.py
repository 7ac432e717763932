"""Runs a rollout round over ``torch.distributed``: the plumbing around ``placement``'s pure plan.

``RolloutRouter.run_round`` takes this rank's data-parallel batch, learns the other replicas' batches (an object
all-gather over the DP group; every rank of a DP replica holds the same batch), generates this rank's rollout
replica's chunk, and sends each result point-to-point to the ranks that train on it and did not generate it.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from megatron_vlmr1.rollout.placement import RankCoord, RoundPlan, plan_round

T = TypeVar("T")
R = TypeVar("R")


def _to_bytes(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def exchange_objects(outgoing: dict[int, Any], sources: Sequence[int], device: torch.device) -> dict[int, Any]:
    """Send ``outgoing[dst]`` to each rank ``dst`` and receive one object from each rank in ``sources``.

    Both sides must agree on who talks to whom (``placement.plan_round`` gives each rank its half). Point-to-point:
    first the payload sizes, then the pickled payloads. ``device`` is where the byte tensors travel (CUDA for NCCL).
    """
    payloads = {dst: _to_bytes(obj, device) for dst, obj in outgoing.items()}
    sizes_in = {src: torch.zeros(1, dtype=torch.int64, device=device) for src in sources}
    requests = [dist.isend(torch.tensor([p.numel()], dtype=torch.int64, device=device), dst)
                for dst, p in payloads.items()]
    requests += [dist.irecv(size, src) for src, size in sizes_in.items()]
    for request in requests:
        request.wait()
    buffers = {src: torch.empty(int(size.item()), dtype=torch.uint8, device=device) for src, size in sizes_in.items()}
    requests = [dist.isend(p, dst) for dst, p in payloads.items()]
    requests += [dist.irecv(buffer, src) for src, buffer in buffers.items()]
    for request in requests:
        request.wait()
    return {src: pickle.loads(buffer.cpu().numpy().tobytes()) for src, buffer in buffers.items()}


class RolloutRouter:
    """One rank's view of the rollout layout (built once: an object all-gather of every rank's coordinates)."""

    def __init__(self, coord: RankCoord, rollout_tp: int, dp_group: Any, dp_size: int, device: torch.device):
        self.rank = dist.get_rank()
        coords: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(coords, coord)
        self.coords: list[RankCoord] = coords
        self.rollout_tp = rollout_tp
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.device = device
        self.last_plan: RoundPlan | None = None

    @property
    def replica(self) -> int:
        return self.rank // self.rollout_tp

    def run_round(self, batch: list[T], generate: Callable[[list[T], list[int]], list[R]]) -> list[R]:
        """This DP replica's ``batch`` in, its results out (same order); a collective over the whole world.

        ``generate(items, global_indices)`` runs on every rank of a rollout replica with that replica's chunk
        (identical on its ranks; never called with an empty chunk). ``last_plan.total`` is the round's job-wide
        prompt count.
        """
        batches = [batch]
        if self.dp_size > 1:
            batches = [None] * self.dp_size
            dist.all_gather_object(batches, batch, group=self.dp_group)
        items = [item for b in batches for item in b]
        plan = plan_round(self.coords, self.rollout_tp, [len(b) for b in batches], self.rank)
        self.last_plan = plan
        produced: dict[int, R] = {}
        if plan.generate:
            results = generate([items[i] for i in plan.generate], plan.generate)
            if len(results) != len(plan.generate):
                raise AssertionError(f"generate returned {len(results)} results for {len(plan.generate)} prompts")
            produced = dict(zip(plan.generate, results))
        received = exchange_objects({dst: [produced[i] for i in indices] for dst, indices in plan.send.items()},
                                    sorted(plan.recv), self.device)
        for src, results in received.items():
            produced.update(zip(plan.recv[src], results))
        return [produced[i] for i in plan.train]
