"""Where a rank's model chunk sits in the TP/PP layout, and gathering its TP shards: the helpers the weight
exporter/loader (``export.py``) and LoRA (``lora.py``) share. Ranks and groups come from the ``ParallelEnv`` the
model was built with (``model.parallel_env``)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import tp_merge, tp_partition_dim


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (they hold the real model as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def parallel_env(model: torch.nn.Module) -> ParallelEnv:
    """The ``ParallelEnv`` a (possibly wrapped) model was built with."""
    return unwrap_model(model).parallel_env


def stage_info(model: torch.nn.Module) -> tuple[int, int, int]:
    """(pp_rank, pp_size, global layer offset of this stage)."""
    env = parallel_env(model)
    pp_rank, pp_size = env.pp_rank, env.pp
    num_layers = model.layout.num_layers
    if num_layers % pp_size:
        raise ValueError(f"{num_layers} layers do not split evenly over PP size {pp_size}")
    return pp_rank, pp_size, pp_rank * (num_layers // pp_size)


def single_chunk(model_chunks: torch.nn.Module | list[torch.nn.Module]) -> torch.nn.Module:
    """The one (unwrapped) model chunk of this rank; virtual pipeline stages are not supported."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ValueError("virtual pipeline stages (several model chunks per rank) are not supported yet")
    return unwrap_model(chunks[0])


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give megatron's parallel linears and embeddings the TP attributes its weight init would have set.

    megatron-core 0.16.1 sets ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on a parallel
    weight only inside its random-init functions. A model built with ``perform_initialization=False`` (its weights
    are loaded next) would lack them, and gradient-norm clipping would then count TP shards as replicas (only TP
    rank 0's shard). SwiGLU's fc1 holds [gate; up] interleaved per rank: stride 2, as megatron's MLP declares.
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            gated = name.endswith("linear_fc1") and module.config.gated_linear_unit
            set_tensor_model_parallel_attributes(weight, True, 0, 2 if gated else 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def gather_tp(env: ParallelEnv, name: str, shard: torch.Tensor, gated: bool = True) -> torch.Tensor:
    """The full (TP=1 layout) tensor of megatron parameter ``name`` from this rank's shard (a collective over TP)."""
    if env.tp == 1 or tp_partition_dim(name) is None:
        return shard.detach()
    shards = [torch.empty_like(shard) for _ in range(env.tp)]
    dist.all_gather(shards, shard.detach().contiguous(), group=env.tp_group)
    return tp_merge(name, shards, gated)


def gather_full_mcore(model: torch.nn.Module, local_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Full (TP=1 layout) tensor from this TP rank's shard of parameter ``local_name`` (a collective over TP)."""
    return gather_tp(parallel_env(model), local_name, tensor)
