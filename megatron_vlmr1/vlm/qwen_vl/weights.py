"""HF <-> megatron weight mapping for Qwen2-VL / Qwen2.5-VL.

HF names are the checkpoint (hub / ``save_pretrained``) names: ``visual.*``, ``model.embed_tokens.weight``,
``model.layers.{i}.*``, ``model.norm.weight``, ``lm_head.weight``. transformers 5 renames them in memory to
``model.visual.*`` / ``model.language_model.*``; ``to_checkpoint_name`` and ``to_transformers_name`` convert.

Megatron names are those of ``QwenVLModel`` with *global* layer numbers: ``visual.*`` (the HF vision tower, kept
as is), ``language_model.embedding.word_embeddings.weight``, ``language_model.decoder.layers.{i}.*``,
``language_model.decoder.final_layernorm.weight``, ``language_model.output_layer.weight``.

Two layout changes happen on the way in, and are undone on the way out:

* q/k/v fuse into ``linear_qkv`` grouped as megatron lays it out: for each query group g, ``[q heads of g; k_g; v_g]``.
  When TP exceeds the number of KV heads, each KV head is repeated ``num_query_groups / num_kv_heads`` times (a query
  group per TP rank; the math is unchanged because HF's GQA maps query head i to KV head i // (nq / nkv), which is
  exactly the copy its megatron group holds). Export takes the first copy. This is exact for forward, backward and
  conversion, but training would let the copies drift apart (each copy only gets its own group's gradient; summing
  them over the TP ranks that hold copies is not implemented), so the trainer refuses TP > num_key_value_heads.
* the vocabulary is padded with zero rows to ``padded_vocab_size`` (a multiple of ``make_vocab_size_divisible_by``,
  independent of TP so checkpoints reshard); export slices the padding off.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch

from megatron_vlmr1.vlm.base import WeightSpec, hf_config_text


@dataclasses.dataclass(frozen=True)
class QwenLayout:
    """The megatron-side shapes derived from the HF config (and the TP size, through ``num_query_groups``)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    fused_norm: bool = False  # Transformer Engine specs fuse the pre-attention / pre-MLP norms into the linears

    @property
    def kv_repeat(self) -> int:
        return self.num_query_groups // self.num_kv_heads


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Vocabulary rounded up to ``divisible_by``. Independent of TP (so checkpoints reshard), which must divide it."""
    if divisible_by % tp_size:
        raise ValueError(f"make_vocab_size_divisible_by={divisible_by} must be a multiple of the TP size {tp_size}")
    return -(-vocab_size // divisible_by) * divisible_by


def default_query_groups(num_kv_heads: int, tp_size: int) -> int:
    """Megatron needs num_query_groups % TP == 0: repeat the KV heads up to the TP size when there are fewer."""
    if num_kv_heads % tp_size == 0:
        return num_kv_heads
    if tp_size % num_kv_heads == 0:
        return tp_size
    raise ValueError(f"num_key_value_heads={num_kv_heads} and TP size {tp_size}: one must divide the other")


def make_layout(hf_config: Any, tp_size: int = 1, num_query_groups: int | None = None,
                make_vocab_size_divisible_by: int = 128, fused_norm: bool = False) -> QwenLayout:
    text = hf_config_text(hf_config)
    num_heads = text.num_attention_heads
    num_kv_heads = text.num_key_value_heads or num_heads
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads={num_heads} is not divisible by TP size {tp_size}")
    groups = num_query_groups or default_query_groups(num_kv_heads, tp_size)
    if groups % num_kv_heads or num_heads % groups or groups % tp_size:
        raise ValueError(f"num_query_groups={groups} must be a multiple of num_key_value_heads={num_kv_heads}, "
                         f"divide num_attention_heads={num_heads}, and be a multiple of TP size {tp_size}")
    return QwenLayout(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, num_query_groups=groups,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
        vocab_size=text.vocab_size,
        padded_vocab_size=padded_vocab_size(text.vocab_size, make_vocab_size_divisible_by, tp_size),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)), fused_norm=fused_norm,
    )


# --- shape transforms (full tensors, TP=1 layout) ---------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: QwenLayout) -> torch.Tensor:
    """HF q [nq*d, ...], k/v [nkv*d, ...] -> megatron linear_qkv [(nq + 2*G)*d, ...] (per group: q heads, k, v)."""
    groups, d, rest = layout.num_query_groups, layout.head_dim, q.shape[1:]
    q = q.reshape(groups, (layout.num_heads // groups) * d, *rest)
    k = k.reshape(layout.num_kv_heads, d, *rest).repeat_interleave(layout.kv_repeat, dim=0)
    v = v.reshape(layout.num_kv_heads, d, *rest).repeat_interleave(layout.kv_repeat, dim=0)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, layout: QwenLayout, reduce: str = "first") -> list[torch.Tensor]:
    """Inverse of ``fuse_qkv``. Repeated KV copies: ``reduce="first"`` for weights, ``"sum"`` for their gradients."""
    groups, d, rest = layout.num_query_groups, layout.head_dim, qkv.shape[1:]
    q_per_group = (layout.num_heads // groups) * d
    grouped = qkv.reshape(groups, q_per_group + 2 * d, *rest)
    q, k, v = grouped.split([q_per_group, d, d], dim=1)
    k = k.reshape(layout.num_kv_heads, layout.kv_repeat, d, *rest)
    v = v.reshape(layout.num_kv_heads, layout.kv_repeat, d, *rest)
    if reduce == "sum":
        k, v = k.sum(dim=1), v.sum(dim=1)
    else:
        k, v = k[:, 0], v[:, 0]
    return [q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous()]


def pad_vocab(weight: torch.Tensor, layout: QwenLayout) -> torch.Tensor:
    if weight.shape[0] != layout.vocab_size:
        raise ValueError(f"vocabulary tensor has {weight.shape[0]} rows, config says vocab_size={layout.vocab_size}")
    pad = weight.new_zeros(layout.padded_vocab_size - layout.vocab_size, *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def _identity(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _wrap(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


def _spec(mcore: str, hf: tuple[str, ...], to_mcore: Callable = _identity, from_mcore: Callable = _wrap) -> WeightSpec:
    return WeightSpec(mcore_name=mcore, hf_names=hf, to_mcore=to_mcore, from_mcore=from_mcore)


def layer_specs(i: int, layout: QwenLayout) -> list[WeightSpec]:
    """The weights of language-model layer ``i`` (global index)."""
    hf, mc = f"model.layers.{i}.", f"language_model.decoder.layers.{i}."
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if layout.fused_norm else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if layout.fused_norm else "pre_mlp_layernorm.weight"
    qkv_in = lambda ts: fuse_qkv(*ts, layout)  # noqa: E731
    qkv_out = lambda t: split_qkv(t, layout)  # noqa: E731
    return [
        _spec(mc + attn_norm, (hf + "input_layernorm.weight",)),
        _spec(mc + "self_attention.linear_qkv.weight",
              tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), qkv_in, qkv_out),
        _spec(mc + "self_attention.linear_qkv.bias",
              tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), qkv_in, qkv_out),
        _spec(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",)),
        _spec(mc + mlp_norm, (hf + "post_attention_layernorm.weight",)),
        _spec(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
              lambda ts: torch.cat(ts, dim=0), lambda t: list(t.chunk(2, dim=0))),
        _spec(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",)),
    ]


def weight_specs(hf_config: Any, layout: QwenLayout, vision_names: list[str]) -> list[WeightSpec]:
    """Every weight, in export order: vision tower, embeddings, layers 0..L-1, final norm, LM head (if untied)."""
    vocab_in = lambda ts: pad_vocab(ts[0], layout)  # noqa: E731
    vocab_out = lambda t: [t[:layout.vocab_size]]  # noqa: E731
    specs = [_spec(f"visual.{name}", (f"visual.{name}",)) for name in vision_names]
    specs.append(_spec("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                       vocab_in, vocab_out))
    for i in range(layout.num_layers):
        specs.extend(layer_specs(i, layout))
    specs.append(_spec("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not layout.tied:
        specs.append(_spec("language_model.output_layer.weight", ("lm_head.weight",), vocab_in, vocab_out))
    return specs


# --- HF name conventions -----------------------------------------------------------------------------------------

def to_checkpoint_name(name: str) -> str:
    """transformers-5 in-memory name -> checkpoint name (``model.language_model.x`` -> ``model.x``, etc.)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def to_transformers_name(name: str) -> str:
    """Checkpoint name -> the name in a transformers-5 ``Qwen2_5_VLForConditionalGeneration.state_dict()``."""
    if name.startswith("visual."):
        return "model." + name
    if re.match(r"^model\.(?!language_model\.|visual\.)", name):
        return "model.language_model." + name[len("model."):]
    return name
