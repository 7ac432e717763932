"""Rollouts → fixed-shape micro-batches for the pipeline schedule.

Per-row (``make_micro_batches``): every row is self-contained (prompt + one completion + that prompt's images), so
rows can be split into micro-batches freely. Shared-prefix (``make_shared_prefix_micro_batches``): one packed row
per group (``trainer/packing.py``). All micro-batches of a step are right-padded to one sequence length (the
pipeline sends tensors of a fixed shape); a short last micro-batch is filled with copies of a row whose loss mask
is empty.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron_vlmr1.trainer.packing import PAD_SEGMENT, Packing, pack_group, prefix_layout
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
                       pad_to_multiple: int = 8, pad_per_micro_batch: bool = False) -> list[MicroBatch]:
    """Split rows (``prompts[i]`` + ``completions[i]``) into micro-batches of ``micro_batch_size`` rows.

    ``pad_per_micro_batch`` (no pipeline parallelism: shapes may differ between micro-batches): rows are sorted by
    length before splitting, so each micro-batch holds rows of similar length, and each is padded only to its own
    longest row. The step's loss does not depend on how rows are grouped (micro-batch exact normalisation).
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
    if pad_per_micro_batch:
        rows.sort(key=lambda i: len(prompts[i].input_ids) + len(completions[i]))
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
        if pad_per_micro_batch:
            seq_len = -(-batch.input_ids.shape[1] // pad_to_multiple) * pad_to_multiple
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


def make_shared_prefix_micro_batches(family: Any, processor: Any, hf_config: Any, prompts: Sequence[Any],
                                     completions: Sequence[Sequence[Sequence[int]]], groups_per_micro_batch: int,
                                     row_scalars: dict[str, torch.Tensor] | None = None,
                                     row_token_values: dict[str, Sequence[Sequence[float]]] | None = None,
                                     pad_to_multiple: int = 8, pad_per_micro_batch: bool = False) -> list[MicroBatch]:
    """Groups (``prompts[g]`` with its completions ``completions[g]``) -> packed micro-batches of
    ``groups_per_micro_batch`` rows each.

    Completion rows are numbered group-major (row ``r`` = completion ``r % G`` of group ``r // G``, the order of
    ``row_scalars`` [rows] and ``row_token_values``). Packed rows are right-padded to the step's longest (the
    pipeline sends one shape); a short last micro-batch is filled with a copy of a group whose loss mask is empty.
    ``loss_mask`` and ``fields`` of each micro-batch are in the per-completion layout [rows, T].
    ``pad_per_micro_batch`` (no pipeline parallelism) pads each micro-batch only to its own longest packed row.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need one completion list per prompt, got {len(prompts)} prompts, {len(completions)}")
    if groups_per_micro_batch < 1:
        raise ValueError(f"groups_per_micro_batch must be >= 1, got {groups_per_micro_batch}")
    row_scalars = row_scalars or {}
    row_token_values = row_token_values or {}
    pad_id = family.pad_token_id(processor)
    packed, first_row = [], []
    row = 0
    for prompt, group in zip(prompts, completions):
        batch = family.training_batch(processor, hf_config, [prompt] * len(group), list(group))
        packed.append(pack_group(batch.input_ids, batch.position_ids, len(prompt.input_ids), [len(c) for c in group]))
        first_row.append(row)
        row += len(group)
    groups = list(range(len(prompts)))
    chunks = [groups[i:i + groups_per_micro_batch] for i in range(0, len(groups), groups_per_micro_batch)]
    if len(chunks[-1]) < groups_per_micro_batch:
        chunks[-1] = chunks[-1] + [-1] * (groups_per_micro_batch - len(chunks[-1]))  # -1: filler, loss masked out
    longest = max(len(p.input_ids) for p in packed)
    seq_len = -(-longest // pad_to_multiple) * pad_to_multiple
    micro_batches = []
    for chunk in chunks:
        real = [g if g >= 0 else chunk[0] for g in chunk]
        if pad_per_micro_batch:
            seq_len = -(-max(len(packed[g].input_ids) for g in real) // pad_to_multiple) * pad_to_multiple
        b = len(chunk)
        input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, b, seq_len, dtype=torch.long)
        segments = torch.full((b, seq_len), PAD_SEGMENT, dtype=torch.long)
        target_mask = torch.zeros(b, seq_len - 1, dtype=torch.long)
        rows = [(slot, g, k) for slot, g in enumerate(real) for k in range(len(completions[g]))]
        width = max(1, max(len(completions[g][k]) for _, g, k in rows))
        columns = torch.zeros(len(rows), width, dtype=torch.long)
        loss_mask = torch.zeros(len(rows), width, dtype=torch.long)
        row_of = torch.tensor([slot for slot, _, _ in rows], dtype=torch.long)
        for slot, g in enumerate(real):
            group = packed[g]
            length = len(group.input_ids)
            input_ids[slot, :length] = group.input_ids
            position_ids[:, slot, :length] = group.position_ids
            segments[slot, :length] = group.segments
            if chunk[slot] >= 0:
                for cols in group.target_columns:
                    target_mask[slot, cols] = 1
        for index, (slot, g, k) in enumerate(rows):
            cols = packed[g].target_columns[k]
            columns[index, :len(cols)] = cols
            if chunk[slot] >= 0:
                loss_mask[index, :len(cols)] = 1
        global_rows = torch.tensor([first_row[g] + k for _, g, k in rows], dtype=torch.long)
        fields = {name: values[global_rows].to(torch.float32)[:, None] * loss_mask
                  for name, values in row_scalars.items()}
        for name, values in row_token_values.items():
            table = torch.zeros(len(rows), width, dtype=torch.float32)
            for index, global_row in enumerate(global_rows.tolist()):
                row_values = list(values[global_row])
                table[index, :len(row_values)] = torch.tensor(row_values, dtype=torch.float32)
            fields[name] = table * loss_mask
        pixels = [prompts[g].pixel_values for g in real if prompts[g].pixel_values is not None]
        grids = [prompts[g].image_grid_thw for g in real if prompts[g].image_grid_thw is not None]
        micro_batches.append(MicroBatch(
            input_ids=input_ids, attention_mask=(segments != PAD_SEGMENT).long(), position_ids=position_ids,
            loss_mask=loss_mask, pixel_values=torch.cat(pixels) if pixels else None,
            image_grid_thw=torch.cat(grids) if grids else None, fields=fields,
            packing=Packing(target_mask, row_of, columns, prefix_layout(segments)),
        ))
    return micro_batches
