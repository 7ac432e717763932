"""Shared-prefix packing against hand-computed rows, positions, masks and targets."""
from __future__ import annotations

import pytest
import torch

from megatron_vlmr1.trainer.packing import Packing, pack_group, prefix_layout


def _group():
    # prompt [10, 11, 12] (P = 3) with positions 0,1,5 on all axes except the middle one (an "image" jump);
    # completions [20, 21] and [30]; rows right-padded with 0 to 5 columns
    input_ids = torch.tensor([[10, 11, 12, 20, 21], [10, 11, 12, 30, 0]])
    positions = torch.tensor([[0, 1, 5, 6, 7], [0, 1, 5, 6, 0]])
    position_ids = torch.stack([positions, positions + 100 * torch.tensor([[0, 1, 0, 0, 0]]), positions])
    return input_ids, position_ids


def test_pack_group_layout_positions_and_targets():
    input_ids, position_ids = _group()
    packed = pack_group(input_ids, position_ids, prompt_length=3, completion_lengths=[2, 1])
    # [prompt[:-1]; (p_last, c_1); (p_last, c_2)]
    assert packed.input_ids.tolist() == [10, 11, 12, 20, 21, 12, 30]
    assert packed.position_ids[0].tolist() == [0, 1, 5, 6, 7, 5, 6]
    assert packed.position_ids[1].tolist() == [0, 101, 5, 6, 7, 5, 6]
    assert packed.segments.tolist() == [0, 0, 1, 1, 1, 2, 2]
    # column 2 (p_last of segment 1) predicts 20, column 3 predicts 21; column 5 (p_last of segment 2) predicts 30
    assert [c.tolist() for c in packed.target_columns] == [[2, 3], [5]]


def test_pack_group_rejects_rows_with_different_prompts():
    input_ids, position_ids = _group()
    input_ids[1, 0] = 99
    with pytest.raises(ValueError, match="share one prompt"):
        pack_group(input_ids, position_ids, prompt_length=3, completion_lengths=[2, 1])


def test_prefix_layout():
    # prompt of 2, segments of 2 and 1, one padding token; a second row without prompt tokens and one segment
    segments = torch.tensor([[0, 0, 1, 1, 2, -1], [1, 1, 1, -1, -1, -1]])
    assert prefix_layout(segments).tolist() == [[2, 2, 1], [0, 3, 0]]
    assert prefix_layout(segments).device.type == "cpu"
    for bad in ([[0, 1, 0, 2]], [[0, 2, 2, -1]], [[-1, -1]], [[0, 0, -1, -1]]):
        with pytest.raises(ValueError, match="segments must be"):
            prefix_layout(torch.tensor(bad))


def test_packing_rows_maps_columns_back_to_completions():
    values = torch.arange(14, dtype=torch.float32).reshape(2, 7)
    packing = Packing(target_mask=torch.zeros(2, 7), row_of=torch.tensor([0, 0, 1]),
                      columns=torch.tensor([[2, 3], [5, 0], [1, 4]]), layout=torch.tensor([[1, 3, 3], [1, 3, 3]]))
    loss_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    assert packing.rows(values, loss_mask).tolist() == [[2.0, 3.0], [5.0, 0.0], [8.0, 11.0]]


def test_per_row_micro_batches_pad_each_micro_batch_to_its_own_length(tiny_qwen2_5_vl):
    from transformers import AutoConfig

    from megatron_vlmr1.trainer.batching import make_micro_batches
    from megatron_vlmr1.vlm.families import get_family

    hf_config = AutoConfig.from_pretrained(tiny_qwen2_5_vl)
    family = get_family(hf_config)
    processor = family.load_processor(tiny_qwen2_5_vl)
    prompt = family.encode_prompt(processor, [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}], [])
    lengths = [30, 2, 29, 1]  # rows sorted by length: (1, 2) and (29, 30) share micro-batches
    completions = [[200 + k for k in range(n)] for n in lengths]
    values = [[float(n) + k / 100 for k in range(n)] for n in lengths]
    batches = make_micro_batches(family, processor, hf_config, [prompt] * 4, completions, 2,
                                 row_scalars={"advantages": torch.tensor([1.0, 2.0, 3.0, 4.0])},
                                 row_token_values={"values": values}, pad_per_micro_batch=True)
    prompt_len = len(prompt.input_ids)
    assert [b.input_ids.shape[1] for b in batches] == [-(-(prompt_len + 2) // 8) * 8, -(-(prompt_len + 30) // 8) * 8]
    rows = [(batch, r) for batch in batches for r in range(2)]
    for (batch, r), (n, advantage) in zip(rows, [(1, 4.0), (2, 2.0), (29, 3.0), (30, 1.0)]):
        mask = batch.loss_mask[r].bool()
        assert int(mask.sum()) == n
        assert batch.fields["advantages"][r][mask].eq(advantage).all()
        assert batch.fields["values"][r][mask].tolist() == pytest.approx([float(n) + k / 100 for k in range(n)])
        assert batch.input_ids[r, prompt_len:prompt_len + n].tolist() == [200 + k for k in range(n)]
