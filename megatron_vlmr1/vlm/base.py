"""The VLM family interface, and the tensor-parallel layout of megatron-core GPT weights that all families share.

One ``VLMFamily`` per model family (Qwen-VL here, InternVL next). Everything model-specific — building the megatron
model for a pipeline stage, the HF <-> megatron weight mapping — lives behind it, so the trainer never branches on
model names: it calls ``get_family(hf_config_or_dir)`` and uses what comes back.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------------
# Tensor-parallel layout of megatron-core's GPT parameters (local and TE specs name them the same way).
# ---------------------------------------------------------------------------------------------------------------

# Column-parallel (split along dim 0): the output features are sharded.
_COLUMN_PARALLEL = (
    "embedding.word_embeddings.weight", "output_layer.weight",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
)
# Row-parallel (split along dim 1): the input features are sharded; their bias is replicated.
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
# SwiGLU's fc1 is [gate; up] stacked; each TP rank holds [gate_shard; up_shard].
_GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


def tp_partition_dim(mcore_name: str) -> int | None:
    """Dimension a megatron GPT parameter is split along under TP, or None if every rank holds all of it."""
    if mcore_name.endswith(_COLUMN_PARALLEL):
        return 0
    if mcore_name.endswith(_ROW_PARALLEL):
        return 1
    return None


def tp_split(mcore_name: str, full: torch.Tensor, tp_size: int, tp_rank: int, gated_mlp: bool = True) -> torch.Tensor:
    """This TP rank's shard of a full megatron parameter (``full`` is laid out as megatron does at TP=1)."""
    dim = tp_partition_dim(mcore_name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"{mcore_name}: dim {dim} of shape {tuple(full.shape)} does not split into {tp_size} TP ranks")
    if gated_mlp and mcore_name.endswith(_GATED):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_merge(mcore_name: str, shards: list[torch.Tensor], gated_mlp: bool = True) -> torch.Tensor:
    """Inverse of ``tp_split``: the full parameter from the shards of all TP ranks (in rank order)."""
    dim = tp_partition_dim(mcore_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated_mlp and mcore_name.endswith(_GATED):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)], dim=0)
    return torch.cat(shards, dim=dim)


_LAYER_RE = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


def shift_layer_index(name: str, offset: int) -> str:
    """``decoder.layers.3.x`` -> ``decoder.layers.{3+offset}.x`` (local <-> global layer numbering under PP)."""
    match = _LAYER_RE.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def layer_index(name: str) -> int | None:
    match = _LAYER_RE.match(name)
    return None if match is None else int(match.group(2))


# ---------------------------------------------------------------------------------------------------------------
# The family interface.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor and where it lives in the megatron model.

    ``mcore_name`` is the *global* megatron name (language-model layers numbered over the whole model, before PP);
    ``to_mcore`` / ``from_mcore`` are the shape transforms between the HF tensor(s) and the full (TP=1) megatron
    tensor. Several HF tensors may fuse into one megatron tensor (q/k/v -> linear_qkv): then ``hf_names`` lists them
    all, in the order ``to_mcore`` takes them and ``from_mcore`` returns them.
    """

    mcore_name: str
    hf_names: tuple[str, ...]
    to_mcore: Any  # Callable[[list[Tensor]], Tensor]
    from_mcore: Any  # Callable[[Tensor], list[Tensor]]


class VLMFamily(abc.ABC):
    """What the trainer, the rollout weight sync and the conversion tool need from a model family."""

    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def build_model(self, hf_config: Any, pre_process: bool, post_process: bool, **kwargs: Any) -> torch.nn.Module:
        """The megatron model for this pipeline stage (parallel_state must be initialised)."""

    @abc.abstractmethod
    def weight_specs(self, hf_config: Any, layout: Any = None) -> list[WeightSpec]:
        """Every weight of the model, in a stable order (vision tower, embeddings, layer 0..L-1, final norm, head).

        ``layout`` is the family's description of the megatron shapes (TP-dependent, e.g. repeated KV heads); it is
        the built model's ``layout`` attribute. None means the TP=1 default.
        """

    def checkpoint_name(self, hf_name: str) -> str:
        """A HF tensor name in the checkpoint convention ``WeightSpec.hf_names`` uses (identity by default)."""
        return hf_name

    # -- the input side: what trainers and engines call, so they never branch on the model name --------------
    @abc.abstractmethod
    def load_processor(self, hf_dir: Any) -> Any:
        """The HF processor (tokenizer + image processor) saved with the checkpoint."""

    @abc.abstractmethod
    def encode_prompt(self, processor: Any, messages: Any, images: Any) -> Any:
        """One prompt (chat messages with image slots + images) → model-ready ids and pixels."""

    @abc.abstractmethod
    def training_batch(self, processor: Any, hf_config: Any, prompts: Any, completions: Any) -> Any:
        """Right-padded prompt + completion rows with the family's position ids and a completion mask."""

    def pad_token_id(self, processor: Any) -> int:
        return processor.tokenizer.pad_token_id


def owning_pp_rank(mcore_name: str, num_layers: int, pp_size: int) -> int:
    """Pipeline stage holding a global megatron name: vision + embeddings on the first, head on the last, layers even."""
    index = layer_index(mcore_name)
    if index is not None and not mcore_name.startswith("visual."):
        return index // (num_layers // pp_size)
    if mcore_name.endswith(("final_layernorm.weight", "final_layernorm.bias", "output_layer.weight")):
        return pp_size - 1
    return 0


def hf_config_text(hf_config: Any) -> Any:
    """The language-model part of a VLM HF config (``text_config`` in transformers 5, the config itself before)."""
    return getattr(hf_config, "text_config", None) or hf_config


_FAMILIES: dict[str, VLMFamily] = {}


def register_family(family: VLMFamily) -> VLMFamily:
    for model_type in family.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model_type {model_type!r} is already registered")
        _FAMILIES[model_type] = family
    return family


def _model_type(hf_config_or_dir: Any) -> str:
    if isinstance(hf_config_or_dir, (str, os.PathLike)):
        path = os.path.join(hf_config_or_dir, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"{hf_config_or_dir}: no config.json (not a HF model directory)")
        with open(path) as fh:
            model_type = json.load(fh).get("model_type")
        if model_type is None:
            raise ValueError(f"{path}: no 'model_type' key")
        return model_type
    return hf_config_or_dir.model_type


def get_family(hf_config_or_dir: Any) -> VLMFamily:
    """The family for a HF config object or model directory, looked up by its ``model_type``."""
    import megatron_vlmr1.vlm.internvl.family  # noqa: F401  (registers its family)
    import megatron_vlmr1.vlm.qwen_vl.family  # noqa: F401  (registers its family)

    model_type = _model_type(hf_config_or_dir)
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[model_type]

