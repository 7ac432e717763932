"""LoRA adapters on the megatron language model's parallel linears, tensor-parallel aware.

Each adapted linear (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``) gets a child module ``lora``
holding ``A`` [r, in_local] and ``B`` [out_local, r], and a forward hook that adds ``scale * B(A(x))`` to the
linear's output, ``scale = alpha / r``. Hook + child (rather than a wrapper module) keeps every base parameter at its
megatron name (``...linear_qkv.weight``), which the HF loader, the exporter and dist checkpoints look up.

Tensor parallelism follows the base weight's sharding:

- column-parallel (qkv, fc1): ``A`` is replicated, ``B`` is sharded on its output dim like the weight (fc1's rows
  are [gate_shard; up_shard] like the weight's). ``x`` is replicated, so the rank-``r`` activation ``A x`` is the
  same everywhere; only its gradient is partial (each rank sees its own ``B`` shard), hence
  ``copy_to_tensor_model_parallel_region`` on ``A x``: identity forward, all-reduce backward. This keeps ``A``'s
  gradient identical on every TP rank, as a replicated parameter needs (DDP does not reduce over TP).
- row-parallel (proj, fc2): ``A`` is sharded on its input dim like the weight, so ``A_local x_local`` is a partial
  sum, completed by ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward); ``B`` is
  replicated.

At TP=1 both regions are identities. ``B`` starts at zero (the adapted model starts equal to the base); ``A`` is
drawn uniform(±1/sqrt(fan_in)) (PEFT's kaiming default) from a generator seeded by the *global* parameter name, the
full matrix generated and then sharded, so every TP/PP layout starts from the same adapters.

Known limits: the hook needs the linear's own input, so LayerNorm-fused Transformer Engine linears (``te`` backend's
qkv/fc1) and sequence parallelism are rejected; LoRA runs on GPU use the ``te_split`` backend (``vlm.layer_specs``:
``TENorm`` apart from ``TEColumnParallelLinear`` / ``TERowParallelLinear``, attention still ``TEDotProductAttention``). Dropout on a replicated input (column) draws from the default
generator, which megatron keeps identical over TP ranks, so every rank drops the same features; on a sharded input
(row) it draws from megatron's TP-rank-specific RNG tracker stream, as megatron's own dropout on sharded heads does.
"""
from __future__ import annotations

import math
import re
import types
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_vlmr1.vlm.base import shift_layer_index
from megatron_vlmr1.vlm.stages import gather_full_mcore, parallel_env, single_chunk, stage_info, unwrap_model

LORA_TARGETS = {"linear_qkv": "column", "linear_fc1": "column", "linear_proj": "row", "linear_fc2": "row"}
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one parallel linear: ``scale * B @ A``, local shards A [r, in_local], B [out_local, r]."""

    def __init__(self, kind: str, rank: int, alpha: float, dropout: float, out_local: int, in_local: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        assert kind in ("column", "row")
        self.kind = kind
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.enabled = True
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.A = torch.nn.Parameter(torch.empty(rank, in_local, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=dtype, device=device))

    def tp_axes(self) -> dict[str, int | None]:
        """Which dim of A / B is split over TP (None: replicated)."""
        return {"A": None, "B": 0} if self.kind == "column" else {"A": 1, "B": None}

    def delta(self) -> torch.Tensor:
        """``scale * B @ A``: this rank's shard of the weight update, same shape as the local weight."""
        return (self.B.float() @ self.A.float() * self.scale).to(self.B.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, in_local] -> update [s, b, out_local] to add to the linear's output."""
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region, get_cuda_rng_tracker,
                                                   reduce_from_tensor_model_parallel_region)

        if self.kind == "column" or not self.training:
            x = self.dropout(x)
        else:
            with get_cuda_rng_tracker().fork():  # a sharded input takes a different mask on each TP rank
                x = self.dropout(x)
        low = torch.nn.functional.linear(x.to(self.A.dtype), self.A)  # [s, b, r]
        if self.kind == "column":
            low = copy_to_tensor_model_parallel_region(low)
        else:
            low = reduce_from_tensor_model_parallel_region(low)
        return torch.nn.functional.linear(low, self.B) * self.scale


def _adapter_hook(linear: torch.nn.Module, args: tuple, output: Any) -> Any:
    adapter: LoRAAdapter = linear.lora
    if not adapter.enabled:
        return output
    out, bias = output
    return out + adapter(args[0]).to(out.dtype), bias


def _adapter_sharded_state_dict(linear: torch.nn.Module, prefix: str = "", sharded_offsets: tuple = (),
                                metadata: dict | None = None) -> dict:
    """The linear's own sharded state dict (which marks every extra tensor replicated) with A/B sharded correctly."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

    state = linear._lora_base_sharded_state_dict(prefix, sharded_offsets, metadata)
    adapter: LoRAAdapter = linear.lora
    dp_cp_group = (metadata or {}).get("dp_cp_group") or adapter.dp_group  # no context parallelism
    for name, axis in adapter.tp_axes().items():
        if axis is None:
            continue
        key = f"{prefix}lora.{name}"
        state[key] = make_tp_sharded_tensor_for_checkpoint(getattr(adapter, name), key, axis,
                                                           prepend_offsets=sharded_offsets,
                                                           tp_group=linear.tp_group, dp_cp_group=dp_cp_group)
        if prefix.endswith("linear_fc1.") and linear.config.gated_linear_unit:
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets,
                                                      (metadata or {}).get("singleton_local_shards", False))
    return state


def _init_a(adapter: LoRAAdapter, global_name: str, seed: int, tp_size: int, tp_rank: int) -> None:
    """Uniform(±1/sqrt(fan_in)) over the full (TP=1) A, seeded by name, then this rank's shard."""
    in_local = adapter.A.shape[1]
    fan_in = in_local * tp_size if adapter.kind == "row" else in_local
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_name}".encode()))
    bound = 1.0 / math.sqrt(fan_in)
    full = torch.empty(adapter.rank, fan_in).uniform_(-bound, bound, generator=generator)
    if adapter.kind == "row":
        full = full.chunk(tp_size, dim=1)[tp_rank]
    with torch.no_grad():
        adapter.A.copy_(full)


def _adapted_linears(model: torch.nn.Module, targets: list[str]) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """(name, kind, module) of the language model's linears named in ``targets``."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and ".decoder.layers." in f".{name}":
            yield name, LORA_TARGETS[leaf], module


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] = tuple(LORA_TARGETS), seed: int = 0) -> list[str]:
    """Attach adapters to ``model``'s language-model linears and freeze everything else; returns the adapted names.

    Call before DDP wraps the model, so DDP and the optimizer only ever see the adapter parameters.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"model.lora_targets: unknown {unknown}; known: {sorted(LORA_TARGETS)}")
    if rank < 1:
        raise ValueError(f"model.lora_rank={rank} must be >= 1")
    if alpha <= 0:
        raise ValueError(f"model.lora_alpha={alpha} must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.lora_dropout={dropout} must be in [0, 1)")
    env = parallel_env(model)
    _, _, offset = stage_info(model)
    model.requires_grad_(False)
    adapted = []
    for name, kind, linear in list(_adapted_linears(model, list(targets))):
        if hasattr(linear, "layer_norm_weight"):
            raise ValueError(f"{name}: LoRA does not support LayerNorm-fused linears (Transformer Engine 'te' "
                             "backend); build the model with the 'te_split' or 'local' backend")
        if getattr(linear, "sequence_parallel", False):
            raise ValueError(f"{name}: LoRA does not support sequence parallelism (parallel.sequence_parallel)")
        if hasattr(linear, "lora"):
            raise ValueError(f"{name} already has a LoRA adapter")
        weight = linear.weight
        adapter = LoRAAdapter(kind, rank, alpha, dropout, out_local=weight.shape[0], in_local=weight.shape[1],
                              dtype=weight.dtype, device=weight.device)
        adapter.dp_group = env.dp_group  # where the adapter's checkpoint shards are replicated
        _init_a(adapter, shift_layer_index(name, offset), seed, env.tp, env.tp_rank)
        for param_name, axis in adapter.tp_axes().items():
            param = getattr(adapter, param_name)
            param.tensor_model_parallel = axis is not None  # read by grad-norm (counts replicas once)
            param.partition_dim = -1 if axis is None else axis
            param.partition_stride = 1
        linear.lora = adapter
        linear.register_forward_hook(_adapter_hook)
        linear._lora_base_sharded_state_dict = linear.sharded_state_dict
        linear.sharded_state_dict = types.MethodType(_adapter_sharded_state_dict, linear)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"model.lora_targets={list(targets)} matched no language-model linear")
    return adapted


def lora_adapters(model: torch.nn.Module) -> dict[str, LoRAAdapter]:
    """Adapted linear name -> its adapter (names local to this pipeline stage)."""

    return {name: module.lora for name, module in unwrap_model(model).named_modules()
            if isinstance(getattr(module, "lora", None), LoRAAdapter)}


@contextmanager
def disabled_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: inside, every adapter of ``model`` is bypassed (the GRPO reference policy)."""
    adapters = list(lora_adapters(model).values())
    previous = [a.enabled for a in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, state in zip(adapters, previous):
            adapter.enabled = state


def merged_parameter(model: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """``param``, or ``W + scale * B @ A`` (this rank's shard) when ``name`` is the weight of an enabled adapter.

    Exporting this instead of merging in place leaves the frozen base bit-identical across weight syncs.
    """
    if not name.endswith(".weight"):
        return param
    adapter = getattr(model.get_submodule(name[:-len(".weight")]), "lora", None)
    if not isinstance(adapter, LoRAAdapter) or not adapter.enabled:
        return param
    return param.detach() + adapter.delta().to(param.dtype)


def _hf_module_names(hf_config: Any, family: Any) -> dict[str, str]:
    """Checkpoint weight name -> transformers in-memory weight name (PEFT keys use the latter)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        hf_model = AutoModelForImageTextToText.from_config(hf_config)
    return {family.checkpoint_name(name): name for name in hf_model.state_dict()}


def _target_regex(module_names: list[str]) -> str:
    """One ``re.fullmatch`` pattern for PEFT's ``target_modules`` covering these names at any layer index."""
    patterns = sorted({re.sub(r"layers\\\.\d+\\\.", r"layers\\.\\d+\\.", re.escape(n)) for n in module_names})
    return "(?:" + "|".join(patterns) + ")"


@torch.no_grad()
def peft_state_dict(model_chunks: torch.nn.Module | list[torch.nn.Module], family: Any) -> tuple[dict, dict]:
    """(PEFT ``adapter_model`` tensors, LoraConfig kwargs) for the whole model, on every rank (a collective).

    Fused megatron linears split exactly: q/k/v (and gate/up) share the adapter's ``A``; ``B``'s rows split like the
    fused weight's (``WeightSpec.from_mcore``; repeated KV-head copies take the first, as for the weight).
    """
    import torch.distributed as dist

    model = single_chunk(model_chunks)
    _, pp_size, offset = stage_info(model)
    local: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    settings = None
    for name, adapter in lora_adapters(model).items():
        weight_name = f"{name}.weight"
        a = gather_full_mcore(model, weight_name, adapter.A) if adapter.kind == "row" else adapter.A.detach()
        b = gather_full_mcore(model, weight_name, adapter.B) if adapter.kind == "column" else adapter.B.detach()
        local[shift_layer_index(weight_name, offset)] = (a.cpu().clone(), b.cpu().clone())
        settings = (adapter.rank, adapter.alpha, float(getattr(adapter.dropout, "p", 0.0)))
    stages = [(local, settings)]
    if pp_size > 1:
        stages = [None] * pp_size
        dist.all_gather_object(stages, (local, settings), group=parallel_env(model).pp_group)
    full = {k: v for stage, _ in stages for k, v in stage.items()}
    rank, alpha, dropout = next(s for _, s in stages if s is not None)
    hf_names = _hf_module_names(model.hf_config, family)
    tensors, modules = {}, []
    for spec in family.weight_specs(model.hf_config, model.layout):
        if spec.mcore_name not in full:
            continue
        a, b = full[spec.mcore_name]
        for hf_name, b_part in zip(spec.hf_names, spec.from_mcore(b)):
            module = hf_names[hf_name][:-len(".weight")]
            modules.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()  # one file entry per module
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_part.contiguous()
    config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": _target_regex(modules),
              "bias": "none"}
    return tensors, config


def export_peft_adapter(model_chunks: torch.nn.Module | list[torch.nn.Module], family: Any, out_dir: str | Path,
                        base_model_path: str, write: bool) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` loadable by ``peft.PeftModel.from_pretrained``
    on the HF base model. A collective; only ranks with ``write`` touch the disk."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, config = peft_state_dict(model_chunks, family)
    if not write:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    LoraConfig(base_model_name_or_path=str(base_model_path), **config).save_pretrained(str(out_dir))
