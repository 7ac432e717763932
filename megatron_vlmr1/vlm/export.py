"""Stream weights between HF checkpoints and a live, TP/PP-sharded megatron model.

``export_hf_weights`` yields full HF-named tensors out of the sharded model, with every rank cooperating: TP shards
are all-gathered over the TP group, then the owning pipeline stage broadcasts over the PP group. Work is done one
bucket at a time (one transformer layer, or the non-layer weights of one stage), so peak extra memory is one layer,
never the model. Every rank yields the same sequence, so rollout weight sync (HF engine, vLLM) and the conversion
tool can consume it anywhere.

``load_hf_weights`` goes the other way: it reads only the HF tensors this rank needs from the safetensors files
(lazily, one weight at a time) and copies this rank's TP shard of each into the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import (VLMFamily, WeightSpec, layer_index, owning_pp_rank, shift_layer_index,
                                     tp_partition_dim, tp_split)
from megatron_vlmr1.vlm.families import get_family
from megatron_vlmr1.vlm.lora import merged_parameter
from megatron_vlmr1.vlm.stages import gather_full_mcore, gather_tp, single_chunk, stage_info, unwrap_model

__all__ = ["export_hf_weights", "gather_full_mcore", "load_hf_weights", "unwrap_model"]


def _tied_head_name(model: torch.nn.Module) -> str | None:
    """With tied embeddings and PP > 1 the last stage holds its own copy of the embedding as output_layer."""
    if model.layout.tied and model.post_process and not model.pre_process:
        return "language_model.output_layer.weight"
    return None


def _owner(spec: WeightSpec, layout: Any, pp_size: int) -> int:
    return owning_pp_rank(spec.mcore_name, layout.num_layers, pp_size)


def _buckets(specs: list[WeightSpec], layout: Any, pp_size: int) -> list[list[WeightSpec]]:
    """Consecutive specs with the same (owner stage, layer): the unit of gather + broadcast."""

    buckets: list[list[WeightSpec]] = []
    key = None
    for spec in specs:
        spec_key = (_owner(spec, layout, pp_size),
                    None if spec.mcore_name.startswith("visual.") else layer_index(spec.mcore_name))
        if spec_key != key:
            buckets.append([])
            key = spec_key
        buckets[-1].append(spec)
    return buckets


@dataclasses.dataclass
class SyncTraffic:
    """Bytes this rank received over the process groups while exporting (pipeline broadcasts + TP all-gathers)."""

    received_bytes: int = 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@torch.no_grad()
def export_hf_weights(model_chunks: torch.nn.Module | list[torch.nn.Module], family: VLMFamily,
                      dtype: torch.dtype | None = None,
                      traffic: SyncTraffic | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every HF weight, on every rank, in the family's order.

    Per bucket (one layer, or one stage's non-layer weights), the owning stage's TP *shards* are broadcast over the
    pipeline group (each TP rank carries only its 1/TP slice across the pipeline), then every stage all-gathers them
    over its TP group (inside the node). ``traffic`` counts the bytes this rank received doing so.
    LoRA-adapted linears yield their merged weight ``W + scale * B @ A`` (the base stays untouched).
    A collective: all ranks of the model-parallel group must iterate it to the end together. ``dtype`` casts the
    yielded tensors (e.g. bf16 for vLLM); None keeps the model's dtype. Tensors are fresh copies (callers may keep
    them), on the CPU when the model is.
    """
    model = single_chunk(model_chunks)
    layout = model.layout
    pp_rank, pp_size, _ = stage_info(model)
    layers_per_stage = layout.num_layers // pp_size
    params = dict(model.named_parameters())
    env = model.parallel_env
    pp_group = env.pp_group
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
    for bucket in _buckets(family.weight_specs(model.hf_config, layout), layout, pp_size):
        owner = _owner(bucket[0], layout, pp_size)
        # the parameter names as the owning stage numbers its layers (what decides each one's TP split)
        names = [shift_layer_index(spec.mcore_name, -owner * layers_per_stage) for spec in bucket]
        shards: list[torch.Tensor | None] = [None] * len(bucket)
        if owner == pp_rank:
            for i, (spec, local) in enumerate(zip(bucket, names)):
                if local not in params:
                    raise ValueError(f"model has no parameter {local} (global {spec.mcore_name}); wrong family?")
                shards[i] = merged_parameter(model, local, params[local]).detach().contiguous()
        if pp_size > 1:
            meta = [[(t.shape, t.dtype) for t in shards] if owner == pp_rank else None]
            dist.broadcast_object_list(meta, src=pp_ranks[owner], group=pp_group)
            for i, (shape, tensor_dtype) in enumerate(meta[0]):
                if owner != pp_rank:
                    shards[i] = torch.empty(shape, dtype=tensor_dtype, device=_device(model))
                dist.broadcast(shards[i], src=pp_ranks[owner], group=pp_group)
                if owner != pp_rank and traffic is not None:
                    traffic.received_bytes += _nbytes(shards[i])
        for spec, local, shard in zip(bucket, names, shards):
            assert shard is not None
            tensor = gather_tp(env, local, shard)
            if traffic is not None and env.tp > 1 and tp_partition_dim(local) is not None:
                traffic.received_bytes += (env.tp - 1) * _nbytes(shard)
            for hf_name, hf_tensor in zip(spec.hf_names, spec.from_mcore(tensor)):
                out = hf_tensor.to(dtype) if dtype is not None else hf_tensor
                yield hf_name, out.clone() if out.data_ptr() == shard.data_ptr() else out.contiguous()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class SafetensorsReader:
    """Lazy access to a HF checkpoint directory's tensors by name (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | os.PathLike, normalize: Any = lambda name: name) -> None:
        from safetensors import safe_open

        self.hf_dir = str(hf_dir)
        index_path = os.path.join(self.hf_dir, "model.safetensors.index.json")
        single_path = os.path.join(self.hf_dir, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
        elif os.path.exists(single_path):
            weight_map = None
        else:
            raise ValueError(f"{self.hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._files: dict[str, Any] = {}
        self.weight_map: dict[str, str] = {}  # checkpoint name -> file
        self._raw_names: dict[str, str] = {}  # checkpoint name -> name as stored (either HF naming convention)
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for file in files:
            path = os.path.join(self.hf_dir, file)
            if not os.path.exists(path):
                raise ValueError(f"{self.hf_dir}: shard {file} listed in the index is missing")
            handle = safe_open(path, framework="pt")
            self._files[file] = handle
            for key in handle.keys():
                self.weight_map[normalize(key)] = file
                self._raw_names[normalize(key)] = key

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ValueError(f"{self.hf_dir}: checkpoint has no tensor {name!r}")
        return self._files[self.weight_map[name]].get_tensor(self._raw_names[name])

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map


@torch.no_grad()
def load_hf_weights(model_chunks: torch.nn.Module | list[torch.nn.Module], family: VLMFamily,
                    source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of a HF checkpoint (directory or in-memory state dict) into the model.

    Only the tensors this pipeline stage owns are read; each is fused/padded to the megatron layout, split for this TP
    rank and copied in place. Every parameter must be covered, and shapes must match, else ``ValueError``.
    """
    model = single_chunk(model_chunks)
    layout = model.layout
    pp_rank, pp_size, offset = stage_info(model)
    tp_rank, tp_size = model.parallel_env.tp_rank, model.parallel_env.tp
    if isinstance(source, dict):
        tensors = {family.checkpoint_name(k): v for k, v in source.items()}
        read = tensors.__getitem__
        has = tensors.__contains__
    else:
        reader = SafetensorsReader(source, family.checkpoint_name)
        read, has = reader.get, reader.__contains__
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    specs = family.weight_specs(model.hf_config, layout)
    tied_head = _tied_head_name(model)
    for spec in specs:
        targets = []
        if _owner(spec, layout, pp_size) == pp_rank:
            targets.append(shift_layer_index(spec.mcore_name, -offset))
        if tied_head and spec.mcore_name == "language_model.embedding.word_embeddings.weight":
            targets.append(tied_head)
        if not targets:
            continue
        missing = [n for n in spec.hf_names if not has(n)]
        if missing:
            raise ValueError(f"HF checkpoint is missing {missing} (needed for {spec.mcore_name})")
        full = spec.to_mcore([read(n) for n in spec.hf_names])
        for local in targets:
            if local not in params:
                raise ValueError(f"model has no parameter {local}; is the checkpoint for another architecture?")
            shard = tp_split(local, full, tp_size, tp_rank)
            if shard.shape != params[local].shape:
                raise ValueError(f"{spec.hf_names}: shape {tuple(shard.shape)} after conversion does not match "
                                 f"{local} {tuple(params[local].shape)} (config and checkpoint disagree?)")
            params[local].copy_(shard)
            loaded.add(local)
    not_loaded = sorted(set(params) - loaded)
    if not_loaded:
        raise ValueError(f"HF weights left these parameters uninitialised: {not_loaded[:5]}"
                         f"{' ...' if len(not_loaded) > 5 else ''}")


# --- megatron distributed checkpoints ----------------------------------------------------------------------------

MODEL_METADATA_FILE = "vlmr1_model.json"


def model_metadata(model: torch.nn.Module) -> dict:
    """What it takes to rebuild a model that a checkpoint fits, at any TP/PP: the HF config and the megatron layout
    choices that are not derived from TP (query groups after KV repetition, padded vocabulary)."""
    layout = model.layout
    return {"hf_config": model.hf_config.to_dict(), "num_query_groups": layout.num_query_groups,
            "padded_vocab_size": layout.padded_vocab_size, "params_dtype": str(model.config.params_dtype),
            "tensor_model_parallel_size": model.parallel_env.tp,
            "pipeline_model_parallel_size": model.parallel_env.pp}


def read_model_metadata(ckpt_dir: str | os.PathLike) -> dict:
    path = os.path.join(ckpt_dir, MODEL_METADATA_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{ckpt_dir}: no {MODEL_METADATA_FILE} (not a checkpoint written by save_mcore_checkpoint)")
    with open(path) as fh:
        return json.load(fh)


def hf_config_from_metadata(metadata: dict) -> Any:
    from transformers import AutoConfig

    config = dict(metadata["hf_config"])
    return AutoConfig.for_model(config.pop("model_type"), **config)


def save_mcore_checkpoint(model_chunks: torch.nn.Module | list[torch.nn.Module], ckpt_dir: str | os.PathLike,
                          extra_state: dict | None = None) -> None:
    """Write the model (and ``extra_state``, any sharded state dict such as an optimizer's) as a megatron
    distributed checkpoint. A collective over all ranks. Loadable at another TP/PP with ``load_mcore_checkpoint``."""
    from megatron.core import dist_checkpointing

    model = single_chunk(model_chunks)
    os.makedirs(ckpt_dir, exist_ok=True)
    state = {"model": model.sharded_state_dict(), **(extra_state or {})}
    dist_checkpointing.save(state, str(ckpt_dir))
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt_dir, MODEL_METADATA_FILE), "w") as fh:
            json.dump(model_metadata(model), fh, indent=2)
    dist.barrier()


def load_mcore_checkpoint(model_chunks: torch.nn.Module | list[torch.nn.Module],
                          ckpt_dir: str | os.PathLike) -> None:
    """Load this rank's shards of a checkpoint written by ``save_mcore_checkpoint`` (at any TP/PP) into the model."""
    from megatron.core import dist_checkpointing

    model = single_chunk(model_chunks)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(ckpt_dir)):
        raise ValueError(f"{ckpt_dir} is not a megatron distributed checkpoint")
    metadata = read_model_metadata(ckpt_dir)
    layout = model.layout
    saved = (metadata["num_query_groups"], metadata["padded_vocab_size"])
    if saved != (layout.num_query_groups, layout.padded_vocab_size):
        raise ValueError(f"{ckpt_dir}: checkpoint has (num_query_groups, padded_vocab_size)={saved}, the model "
                         f"{(layout.num_query_groups, layout.padded_vocab_size)}; build it with those values")
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    missing, _ = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks {missing[:5]}")


def build_model_from_hf(hf_dir: str | os.PathLike, env: ParallelEnv, load_weights: bool = True,
                        **build_kwargs: Any) -> tuple[torch.nn.Module, VLMFamily]:
    """``env``'s stage of the model in a HF checkpoint directory, with its weights loaded (no random init first),
    and its family.

    ``build_kwargs`` go to ``family.build_model`` (``params_dtype``, ``backend``, ``make_vocab_size_divisible_by``,
    TransformerConfig overrides such as ``recompute_granularity``).
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(hf_dir)
    family = get_family(hf_config)
    model = family.build_model(hf_config, env, **({"perform_initialization": False} if load_weights else {}),
                               **build_kwargs)
    if load_weights:
        load_hf_weights(model, family, hf_dir)
    return model, family


def build_model_for_checkpoint(ckpt_dir: str | os.PathLike, env: ParallelEnv,
                               **build_kwargs: Any) -> tuple[torch.nn.Module, VLMFamily]:
    """``env``'s stage of a model shaped to fit ``ckpt_dir`` (at ``env``'s TP/PP), and its family. Weights not
    loaded."""
    metadata = read_model_metadata(ckpt_dir)
    hf_config = hf_config_from_metadata(metadata)
    family = get_family(hf_config)
    dtype = getattr(torch, metadata["params_dtype"].replace("torch.", ""))
    model = family.build_model(hf_config, env, params_dtype=dtype, num_query_groups=metadata["num_query_groups"],
                               make_vocab_size_divisible_by=metadata["padded_vocab_size"], **build_kwargs)
    return model, family
