"""Process groups for a run: torchrun/Slurm env, one local process, or a group a test already created.

The only place the trainer touches ``torch.distributed`` initialisation and megatron's ``parallel_state``;
everything downstream receives a ``ParallelEnv``.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megatron_vlmr1.trainer.config import ParallelConfig


@dataclasses.dataclass(frozen=True)
class ParallelEnv:
    rank: int
    world_size: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    owns_process_group: bool

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu")
    return torch.device(name)


def init_parallel(cfg: ParallelConfig, seed: int) -> ParallelEnv:
    """Initialise (or reuse) the default process group, then megatron's model-parallel groups."""
    from megatron.core import parallel_state

    from megatron_vlmr1 import parallel

    device = resolve_device(cfg.device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{parallel.free_port()}", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    parallel.initialize_parallel(parallel.ParallelConfig(cfg.tp, cfg.pp, seed), device)
    return ParallelEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, tp=cfg.tp, pp=cfg.pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(), owns_process_group=owns,
    )


def teardown_parallel(env: ParallelEnv) -> None:
    from megatron_vlmr1.parallel import destroy_parallel

    destroy_parallel()
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    """Sum a few floats over a group (metrics); float64 so counts stay exact."""
    if not dist.is_initialized():
        return list(values)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (e.g. a SIGTERM seen by one rank)."""
    return all_reduce_sum([float(flag)])[0] > 0
