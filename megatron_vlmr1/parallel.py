"""The parallel environment of a process: one ``ParallelConfig`` (the run's ``parallel:`` section), and one
``ParallelEnv`` (ranks, sizes, process groups, device) created once per process and passed to whoever needs it.

This is the only module of the package that initialises ``torch.distributed`` and reads megatron's global
``parallel_state``; everything else takes ranks, groups and the device from the ``ParallelEnv`` it returns: the
trainer holds it, ``VLMFamily.build_model`` receives it (and the built model keeps it as ``parallel_env`` for the
weight exporter/loader and LoRA), the log-prob kernel gets its TP group. (megatron-core's own layers still read
``parallel_state`` internally.) The device is always explicit: ``mcore_cpu``'s shims switch on only for a CPU device.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Literal

import torch
import torch.distributed as dist


@dataclasses.dataclass
class ParallelConfig:
    """Model parallel sizes; the data-parallel size is whatever world_size / (tp * pp) leaves."""

    tp: int = 1
    pp: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed_optimizer: bool = True
    # Activation recompute of the actor's decoder layers during the update: "none" keeps every activation,
    # "selective" recomputes the attention core, "full" keeps only each layer's input and recomputes the layer.
    recompute: Literal["none", "selective", "full"] = "none"

    def __post_init__(self) -> None:
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute must be none, selective or full, got {self.recompute!r}")

    def validate_world_size(self, world_size: int) -> None:
        if world_size % (self.tp * self.pp):
            raise ValueError(f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = "
                             f"{self.tp * self.pp}")


@dataclasses.dataclass(frozen=True)
class ParallelEnv:
    """This process's place in the job: ranks and sizes of the TP/PP/DP groups, the groups, and the device."""

    rank: int
    world_size: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    owns_process_group: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, key: str = "parallel.device") -> torch.device:
    """``auto`` → CUDA when visible, else CPU; ``cuda`` without a visible GPU is a ``ValueError`` naming ``key``
    (the config key the name came from: training's ``parallel.device``, evaluation's ``model.device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is 'cuda' but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


def initialize_parallel(cfg: ParallelConfig, device: torch.device, seed: int = 1234) -> ParallelEnv:
    """Create megatron's TP/PP/DP groups on an initialised ``torch.distributed`` and seed its RNG tracker.

    ``device`` is required: a CPU device switches ``mcore_cpu``'s redirects on (gloo), a CUDA one leaves torch alone.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_vlmr1.mcore_cpu import maybe_enable_cpu_mode

    if not dist.is_initialized():
        raise ValueError("torch.distributed must be initialised before initialize_parallel (use torchrun or "
                         "tests/distributed.run_distributed)")
    cfg.validate_world_size(dist.get_world_size())
    maybe_enable_cpu_mode(torch.device(device))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch.device(device), tp=cfg.tp, pp=cfg.pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def init_parallel(cfg: ParallelConfig, seed: int) -> ParallelEnv:
    """For a run: initialise (or reuse) the default process group — torchrun/Slurm environment, a group a test
    already created, or one local process — then megatron's model-parallel groups."""
    device = resolve_device(cfg.device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    env = initialize_parallel(cfg, device, seed)
    return dataclasses.replace(env, owns_process_group=owns)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def teardown_parallel(env: ParallelEnv) -> None:
    """Undo ``init_parallel``: megatron's groups, and the default group when this process created it."""
    destroy_parallel()
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
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


def free_port() -> int:
    """A free TCP port on the loopback, for a rendezvous of locally spawned ranks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
