"""Rollouts → fixed-shape micro-batches for the pipeline schedule.

Every row is self-contained (prompt + one completion + that prompt's images), so rows can be split into
micro-batches freely. All micro-batches of a step are right-padded to one sequence length (the pipeline sends
tensors of a fixed shape); a short last micro-batch is filled with copies of a row whose loss mask is empty.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron_vlmr1.trainer.policy import MicroBatch


def _pad_right(tensor: torch.Tensor, length: int, value: int | float) -> torch.Tensor:
    extra = length - tensor.shape[-1]
    if extra <= 0:
        return tensor
    pad = tensor.new_full((*tensor.shape[:-1], extra), value)
    return torch.cat([tensor, pad], dim=-1)


def completion_token_values(values: Sequence[Sequence[float]], prompt_lengths: Sequence[int],
                            width: int) -> torch.Tensor:
    """Place per-completion-token values at their shifted columns: token t of the row sits at column t-1.

    values[i][k] belongs to the k-th completion token of row i, which is token ``prompt_lengths[i] + k``.
    Returns [rows, width] float32 (zeros elsewhere).
    """
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for row, (row_values, prompt_len) in enumerate(zip(values, prompt_lengths)):
        start = prompt_len - 1
        out[row, start:start + len(row_values)] = torch.tensor(list(row_values), dtype=torch.float32)
    return out


def make_micro_batches(family: Any, processor: Any, hf_config: Any, prompts: Sequence[Any],
                       completions: Sequence[Sequence[int]], micro_batch_size: int,
                       row_scalars: dict[str, torch.Tensor] | None = None,
                       row_token_values: dict[str, Sequence[Sequence[float]]] | None = None,
                       pad_to_multiple: int = 8) -> list[MicroBatch]:
    """Split rows (``prompts[i]`` + ``completions[i]``) into micro-batches of ``micro_batch_size`` rows.

    ``row_scalars`` (e.g. advantages, [rows]) are broadcast over each row's completion tokens; ``row_token_values``
    (e.g. the rollout engine's log-probs) are placed at the completion tokens' shifted columns. Both land in
    ``MicroBatch.fields`` as [b, s-1] tensors.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need one completion per prompt row, got {len(prompts)} prompts, {len(completions)} rows")
    row_scalars = row_scalars or {}
    row_token_values = row_token_values or {}
    pad_id = family.pad_token_id(processor)
    rows = list(range(len(prompts)))
    chunks = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if len(chunks[-1]) < micro_batch_size:
        chunks[-1] = chunks[-1] + [-1] * (micro_batch_size - len(chunks[-1]))  # -1: filler row, loss masked out
    built = []
    for chunk in chunks:
        real = [i if i >= 0 else chunk[0] for i in chunk]
        batch = family.training_batch(processor, hf_config, [prompts[i] for i in real],
                                      [completions[i] for i in real])
        built.append((chunk, batch))
    longest = max(batch.input_ids.shape[1] for _, batch in built)
    seq_len = -(-longest // pad_to_multiple) * pad_to_multiple
    micro_batches = []
    for chunk, batch in built:
        filler = torch.tensor([i < 0 for i in chunk])
        loss_mask = _pad_right(batch.completion_mask, seq_len, 0)[:, 1:].clone()
        loss_mask[filler] = 0
        fields = {}
        real = [i if i >= 0 else chunk[0] for i in chunk]
        for name, values in row_scalars.items():
            fields[name] = values[real].to(torch.float32)[:, None] * loss_mask
        for name, values in row_token_values.items():
            lengths = batch.prompt_lengths.tolist()
            fields[name] = completion_token_values([values[i] for i in real], lengths, seq_len - 1) * loss_mask
        micro_batches.append(MicroBatch(
            input_ids=_pad_right(batch.input_ids, seq_len, pad_id),
            attention_mask=_pad_right(batch.attention_mask, seq_len, 0),
            position_ids=_pad_right(batch.position_ids, seq_len, 0),
            loss_mask=loss_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            fields=fields,
        ))
    return micro_batches
