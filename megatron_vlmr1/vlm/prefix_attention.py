"""Shared-prefix core attention: a GRPO group's prompt attended once, each completion over [prompt; itself].

A packed row (``trainer/packing.py``) is ``[prefix ; segment_1 ; ... ; segment_G ; padding]``: the prefix is the
prompt without its last token, segment k is ``(p_last, c_k)``. Prefix queries attend causally among the prefix;
segment k's queries attend to the whole prefix and causally to segment k's own keys, never to another segment.
Instead of a dense [b, 1, L, L] mask this module gets the row layout and makes two
``scaled_dot_product_attention`` calls per row:

- the prefix: a plain causal call (``is_causal``: flash kernel on CUDA);
- all G segments as one batch of G: queries [G, n_max] (segments right-padded to the longest), keys/values
  ``[prefix ; own segment]`` [G, prefix + n_max], with a lower-right-aligned causal mask (query i sees keys
  ``<= prefix + i``): ``causal_lower_right``, which torch runs with the flash or memory-efficient kernel on CUDA
  and as a materialised mask on CPU. A padded query of a short segment only sees padding/own keys; its output is
  dropped.

Queries and keys/values of the segment call are gathered with one ``index_select`` each (and the output put back
with one), whose indices depend only on the row layout: ``row_plan`` builds them once and caches them, so every
layer (and every micro-batch of the same layout) reuses them; backward is one ``index_add`` per tensor instead of a
zero-filled gradient per segment slice.

The layout reaches the module as the ``attention_mask`` argument megatron passes through unchanged (also under
pipeline schedules and activation recompute, which save it as a tensor): an integer CPU tensor [b, 1 + S] per
micro-batch, ``layout[r] = [prefix length, len(segment_1), ..., len(segment_S)]`` (0 = no such segment), read on
the host without a device sync. Padded tail positions get a zero output. A bool [b, 1, s, s] mask (True = masked,
megatron's convention) or ``None`` (causal) are handled as well, so the module is a drop-in ``core_attention``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right

# megatron's local attention fills masked scores with this (``attention_mask_func``): fully masked rows stay finite
MASKED_SCORE = -10000.0


def is_prefix_layout(attention_mask: torch.Tensor | None) -> bool:
    """A shared-prefix layout [b, 1 + S] (integer) rather than a bool [b, 1, s, s] mask or ``None``."""
    return (attention_mask is not None and attention_mask.dim() == 2
            and not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool)


def _repeat_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    """[s, b, kv_heads, d] -> [s, b, heads, d], each KV head repeated for its query heads (megatron's GQA order)."""
    groups = key.shape[2]
    if heads % groups:
        raise ValueError(f"{heads} query heads are not a multiple of {groups} key/value heads")
    return key if groups == heads else key.repeat_interleave(heads // groups, dim=2)


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """How one packed row's tokens are gathered for the two attention calls (``row_plan``).

    ``segment_index`` [G * n_max]: the row positions of segment g's tokens at ``g * n_max + i``, a short segment's
    tail filled with its last position (a real token, so everything stays finite; those queries' outputs are
    dropped and, under the lower-right causal mask, no real query sees those keys). ``key_index``
    [G * (prefix + n_max)]: per segment, the prefix positions then its ``segment_index`` slots. ``output_index``
    [sum of lengths]: the slots of the [G * n_max] segment output that are real tokens, in row order. ``mask``: the
    lower-right causal mask of the segment call (query i sees keys ``<= prefix + i``): the ``causal_lower_right``
    bias on CUDA (fused kernels, nothing materialised), a bool [n_max, prefix + n_max] tensor on CPU.
    """

    prefix: int
    lengths: tuple[int, ...]
    longest: int
    segment_index: torch.Tensor
    key_index: torch.Tensor
    output_index: torch.Tensor
    mask: Any

    @property
    def used(self) -> int:
        return self.prefix + sum(self.lengths)


@functools.lru_cache(maxsize=256)
def row_plan(prefix: int, lengths: tuple[int, ...], device: torch.device) -> RowPlan:
    """The gather indices of one row layout, built once and shared by every layer (and every micro-batch with the
    same layout): the per-layer work is then three ``index_select``s and two attention calls."""
    longest = max(lengths)
    slot = torch.arange(longest)
    starts = torch.tensor([prefix + sum(lengths[:g]) for g in range(len(lengths))])
    last = torch.tensor(lengths) - 1
    segment_index = starts[:, None] + torch.minimum(slot[None, :], last[:, None])  # [G, n_max]
    key_index = torch.cat([torch.arange(prefix).expand(len(lengths), prefix), segment_index], dim=1)
    output_index = torch.cat([g * longest + torch.arange(n) for g, n in enumerate(lengths)])
    mask = (torch.ones(longest, prefix + longest, dtype=torch.bool).tril(prefix) if device.type == "cpu"
            else causal_lower_right(longest, prefix + longest))
    return RowPlan(prefix, lengths, longest, segment_index.flatten().to(device), key_index.flatten().to(device),
                   output_index.to(device), mask)


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Attention of packed rows: query [s, b, h, d], key/value [s, b, h_kv, d], layout [b, 1 + S] -> [s, b, h, d].

    Exactly softmax(q k^T * scale) v restricted to the keys each query may see (module docstring); zeros at the
    padded tail of each row.
    """
    seq, batch, heads, dim = query.shape
    if layout.shape[0] != batch:
        raise ValueError(f"shared-prefix layout has {layout.shape[0]} rows, the batch {batch}")
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    rows = []
    for row, (prefix, *lengths) in enumerate(layout.tolist()):
        lengths = tuple(n for n in lengths if n > 0)
        if prefix < 0 or not lengths or prefix + sum(lengths) > seq:
            raise ValueError(f"shared-prefix layout row {row}: prefix {prefix} + segments {list(lengths)} do not "
                             f"fit a row of {seq} tokens (need a prefix >= 0, at least one segment)")
        plan = row_plan(prefix, lengths, query.device)
        q, k, v = query[:, row], key[:, row], value[:, row]  # [s, h, d]
        pieces = []
        if prefix:
            head = lambda t: t[:prefix].transpose(0, 1)[None]  # noqa: E731  [1, h, prefix, d]
            pieces.append(F.scaled_dot_product_attention(head(q), head(k), head(v), is_causal=True,
                                                         scale=scale)[0].transpose(0, 1))
        groups = len(lengths)
        seg_q = q.index_select(0, plan.segment_index).view(groups, plan.longest, heads, dim).transpose(1, 2)
        keys = lambda t: t.index_select(0, plan.key_index).view(groups, -1, heads, dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(seg_q, keys(k), keys(v), attn_mask=plan.mask, scale=scale)
        pieces.append(out.transpose(1, 2).reshape(groups * plan.longest, heads, dim).index_select(0, plan.output_index))
        if plan.used < seq:
            pieces.append(q.new_zeros(seq - plan.used, heads, dim))
        rows.append(torch.cat(pieces))  # [s, h, d]
    return rows[0][:, None] if batch == 1 else torch.stack(rows, dim=1)


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention under megatron's bool mask [b, 1, s, s] (True = masked) or, for ``None``, causal. [s, b, h, d]."""
    heads = query.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, _repeat_kv(key, heads), _repeat_kv(value, heads)))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask.to(q.device), MASKED_SCORE)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.permute(2, 0, 1, 3)


class SharedPrefixAttention(MegatronModule):
    """megatron ``core_attention`` on ``torch.nn.functional.scaled_dot_product_attention`` that understands
    shared-prefix layouts (module docstring). Per-head math: heads split over TP work as they come."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {"attention_dropout": dropout, "context_parallel_size": config.context_parallel_size > 1,
                       "window_size": config.window_size, "softmax_type": config.softmax_type != "vanilla"}
        bad = [name for name, value in unsupported.items() if value]
        if bad:
            raise ValueError(f"SharedPrefixAttention: {', '.join(bad)} not supported (attention_dropout must be 0, "
                             "no context parallelism, no sliding window, vanilla softmax)")
        # apply_query_key_layer_scaling divides the scores by layer_number and the softmax multiplies it back:
        # the product is 1/sqrt(head_dim) either way
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        """query [sq, b, h/TP, d], key/value [sk, b, h_kv/TP, d] -> [sq, b, h/TP * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SharedPrefixAttention takes neither attention_bias nor packed_seq_params")
        if is_prefix_layout(attention_mask):
            out = shared_prefix_attention(query, key, value, attention_mask, self.softmax_scale)
        else:
            out = masked_attention(query, key, value, attention_mask, self.softmax_scale)
        return out.reshape(out.shape[0], out.shape[1], -1)


def with_shared_prefix_attention(spec: Any) -> Any:
    """A copy of a transformer-layer spec whose self-attention ``core_attention`` is ``SharedPrefixAttention``;
    every other submodule (Transformer Engine linears included) stays as it is."""
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=SharedPrefixAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))
