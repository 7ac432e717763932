"""Shared-prefix packing: each GRPO group (one prompt, G completions) becomes one row the model reads once.

A group's row is ``[prompt[:-1]; (p_last, c_1); (p_last, c_2); ...; (p_last, c_G)]``: the prompt's last token is
repeated at the head of every completion segment, because the logit at the prompt's last position predicts the
first token of every completion. Attention: prompt tokens are causal among themselves; each segment attends to
``prompt[:-1]`` and causally to its own tokens, never to another segment (``vlm/prefix_attention.py``, given each
row's ``prefix_layout``). Every token keeps
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


def prefix_layout(segments: torch.Tensor) -> torch.Tensor:
    """Segments [b, L] -> the shared-prefix attention's row layout [b, 1 + S] (int64, CPU):
    ``[prefix length, len(segment 1), ..., len(segment S)]`` (0 where a row has fewer segments).

    Each row must be ``PROMPT_SEGMENT``s (possibly none), then segments 1, 2, ... each in one run, then
    ``PAD_SEGMENT``s: the layout ``vlm/prefix_attention.py`` computes with. This replaces a dense [b, 1, L, L] mask.
    """
    rows = []
    for row, ids in enumerate(segments.cpu()):
        values, counts = (t.tolist() for t in torch.unique_consecutive(ids, return_counts=True))  # the runs
        if values and values[-1] == PAD_SEGMENT:
            values, counts = values[:-1], counts[:-1]
        prefix = 0
        if values and values[0] == PROMPT_SEGMENT:
            prefix, values, counts = counts[0], values[1:], counts[1:]
        if not values or values != list(range(1, len(values) + 1)):
            raise ValueError(f"packed row {row}: segments must be the prompt, then 1, 2, ... each in one run, then "
                             f"padding; got runs {values}")
        rows.append([prefix] + counts)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclasses.dataclass
class Packing:
    """How a packed micro-batch maps onto per-completion rows.

    ``target_mask`` [b, s-1]: the packed columns whose next token is scored (model layout); ``row_of`` [rows]:
    the packed row holding completion row r; ``columns`` [rows, T]: the packed column scoring completion token k of
    row r (0 where the row has no token k; ``MicroBatch.loss_mask`` [rows, T] tells which are real); ``layout``
    [b, 1 + S]: ``prefix_layout`` of the packed rows, the model's attention input (stays on the CPU: the attention
    reads it on the host).
    """

    target_mask: torch.Tensor
    row_of: torch.Tensor
    columns: torch.Tensor
    layout: torch.Tensor

    def rows(self, values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values of the packed layout [b, >= s-1] -> the per-completion layout [rows, T] (0 off mask)."""
        gathered = values[self.row_of.to(values.device)[:, None], self.columns.to(values.device)]
        return torch.where(loss_mask.bool(), gathered, torch.zeros((), dtype=values.dtype, device=values.device))

    def to(self, device: torch.device) -> "Packing":
        return Packing(self.target_mask.to(device), self.row_of.to(device), self.columns.to(device), self.layout)
