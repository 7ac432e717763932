"""Model-parallel layout (TP/PP) and its initialisation on top of an already initialised ``torch.distributed``."""
from __future__ import annotations

import dataclasses
import socket

import torch
import torch.distributed as dist


@dataclasses.dataclass
class ParallelConfig:
    """How the model is split. DP is whatever is left of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")

    def validate_world_size(self, world_size: int) -> None:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not a multiple of parallel.tensor_model_parallel_size x "
                             f"parallel.pipeline_model_parallel_size = {model_parallel}")


def initialize_parallel(config: ParallelConfig, device: str | torch.device = "cpu") -> None:
    """Create megatron's TP/PP/DP groups and seed its RNG tracker.

    On CPU this switches on ``mcore_cpu`` first (gloo backend); a CUDA run is left alone.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_vlmr1.mcore_cpu import maybe_enable_cpu_mode

    if not dist.is_initialized():
        raise ValueError("torch.distributed must be initialised before initialize_parallel (use torchrun or "
                         "tests/distributed.run_distributed)")
    config.validate_world_size(dist.get_world_size())
    maybe_enable_cpu_mode(device)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def free_port() -> int:
    """A free TCP port on the loopback, for a rendezvous of locally spawned ranks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
