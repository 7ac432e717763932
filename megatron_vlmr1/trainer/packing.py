"""Shared-prefix packing: each GRPO group (one prompt, G completions) becomes one row the model reads once.

A group's row is ``[prompt[:-1]; (p_last, c_1); (p_last, c_2); ...; (p_last, c_G)]``: the prompt's last token is
repeated at the head of every completion segment, because the logit at the prompt's last position predicts the
first token of every completion. Attention is a block mask: prompt tokens are causal among themselves; each
segment attends to ``prompt[:-1]`` and causally to its own tokens, never to another segment. Every token keeps
exactly the mrope position it has in the per-row layout (``prompt + completion``), so each completion token's
logits equal the per-row ones, and the gradient into the shared prompt is the sum over the G completions, as the
per-row forward sums it. The vision tower and the prompt's tokens run once per group instead of G times.

The loss side does not change: log-probs of the packed row are gathered back into a per-completion layout
``[rows, T]`` (column k = completion token k) before the per-token loss sees them (``Packing.rows``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

PROMPT_SEGMENT = 0
PAD_SEGMENT = -1


@dataclasses.dataclass
class PackedGroup:
    """One group as one row. ``input_ids`` [L]; ``position_ids`` [3, L]; ``segments`` [L] (0 = shared prompt,
    k = completion k, 1-based); ``target_columns[k]`` [len_k]: the columns whose logits score completion k's
    tokens (column j predicts token j+1)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    target_columns: list[torch.Tensor]


def pack_group(input_ids: torch.Tensor, position_ids: torch.Tensor, prompt_length: int,
               completion_lengths: Sequence[int]) -> PackedGroup:
    """Pack the per-row layout of one group into one row.

    ``input_ids`` [G, s] right-padded rows ``prompt + completion_k`` (the same prompt in every row),
    ``position_ids`` [3, G, s] their mrope positions, ``prompt_length`` P >= 1, ``completion_lengths`` [G].
    """
    rows = input_ids.shape[0]
    if len(completion_lengths) != rows or rows == 0:
        raise ValueError(f"{rows} rows but {len(completion_lengths)} completion lengths")
    if prompt_length < 1:
        raise ValueError("a shared prefix needs a prompt of at least one token")
    if not bool((input_ids[:, :prompt_length] == input_ids[:1, :prompt_length]).all()):
        raise ValueError("pack_group: the rows of a group must share one prompt")
    head = prompt_length - 1
    ids = [input_ids[0, :head]]
    positions = [position_ids[:, 0, :head]]
    segments = [torch.full((head,), PROMPT_SEGMENT, dtype=torch.long)]
    target_columns = []
    column = head
    for k, length in enumerate(completion_lengths):
        end = prompt_length + length
        ids.append(input_ids[k, head:end])
        positions.append(position_ids[:, k, head:end])
        segments.append(torch.full((length + 1,), k + 1, dtype=torch.long))
        target_columns.append(torch.arange(column, column + length))
        column += length + 1
    return PackedGroup(torch.cat(ids), torch.cat(positions, dim=1), torch.cat(segments), target_columns)


def shared_prefix_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Segments [b, L] (``PAD_SEGMENT`` = padding) -> megatron's [b, 1, L, L] bool mask (True = masked).

    Query q may see key k <= q when k is a shared-prompt token or in q's own segment. Padded query rows mask
    everything (their output is finite garbage and never read).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal[None] & (key != PAD_SEGMENT) & (query != PAD_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
    return ~allowed[:, None]


@dataclasses.dataclass
class Packing:
    """How a packed micro-batch maps onto per-completion rows.

    ``target_mask`` [b, s-1]: the packed columns whose next token is scored (model layout); ``row_of`` [rows]:
    the packed row holding completion row r; ``columns`` [rows, T]: the packed column scoring completion token k of
    row r (0 where the row has no token k; ``MicroBatch.loss_mask`` [rows, T] tells which are real).
    """

    target_mask: torch.Tensor
    row_of: torch.Tensor
    columns: torch.Tensor

    def rows(self, values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values of the packed layout [b, >= s-1] -> the per-completion layout [rows, T] (0 off mask)."""
        gathered = values[self.row_of.to(values.device)[:, None], self.columns.to(values.device)]
        return torch.where(loss_mask.bool(), gathered, torch.zeros((), dtype=values.dtype, device=values.device))

    def to(self, device: torch.device) -> "Packing":
        return Packing(self.target_mask.to(device), self.row_of.to(device), self.columns.to(device))
