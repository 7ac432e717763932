"""HF <-> megatron weight layout for Qwen-VL, checked against hand-built tensors (single process, fast)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_vlmr1.vlm.base import owning_pp_rank, shift_layer_index, tp_merge, tp_split
from megatron_vlmr1.vlm.families import get_family
from megatron_vlmr1.vlm.qwen_vl import weights


def _layout(num_heads=4, num_kv_heads=2, groups=None, tp=1, vocab=10, divisible_by=8, head_dim=2):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(text_config=dict(
        vocab_size=vocab, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, num_hidden_layers=4, intermediate_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 0, 0]}))
    return weights.make_layout(config, tp, groups, divisible_by)


def _rows(start: int, count: int, head_dim: int = 2) -> torch.Tensor:
    """Rows tagged by head: head h holds the value start + h in each of its head_dim rows."""
    return torch.arange(start, start + count).repeat_interleave(head_dim)[:, None].float()


def test_fuse_qkv_groups_q_heads_with_their_kv_head():
    layout = _layout(num_heads=4, num_kv_heads=2)
    q, k, v = _rows(0, 4), _rows(10, 2), _rows(20, 2)
    fused = weights.fuse_qkv(q, k, v, layout)
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1 (each head is head_dim=2 rows)
    expected = [0, 0, 1, 1, 10, 10, 20, 20, 2, 2, 3, 3, 11, 11, 21, 21]
    assert fused[:, 0].tolist() == expected
    back = weights.split_qkv(fused, layout)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_kv_heads_repeat_when_tp_exceeds_them():
    layout = _layout(num_heads=4, num_kv_heads=1, tp=2)
    assert layout.num_query_groups == 2 and layout.kv_repeat == 2
    q, k, v = _rows(0, 4), _rows(10, 1), _rows(20, 1)
    fused = weights.fuse_qkv(q, k, v, layout)
    assert fused[:, 0].tolist() == [0, 0, 1, 1, 10, 10, 20, 20, 2, 2, 3, 3, 10, 10, 20, 20]
    first = weights.split_qkv(fused, layout)
    assert torch.equal(first[1], k) and torch.equal(first[2], v)
    summed = weights.split_qkv(fused, layout, reduce="sum")  # gradients of the copies add up
    assert torch.equal(summed[1], 2 * k) and torch.equal(summed[0], q)
    # Bias (1-D) takes the same path.
    bias = weights.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], layout)
    assert torch.equal(bias, fused[:, 0])


def test_layout_rejects_impossible_splits():
    with pytest.raises(ValueError, match="num_key_value_heads=2 and TP size 3"):
        _layout(num_heads=6, num_kv_heads=2, tp=3)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by TP size 8"):
        _layout(num_heads=4, num_kv_heads=4, tp=8, divisible_by=8)
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=6 must be a multiple of the TP size 4"):
        weights.padded_vocab_size(10, 6, 4)


def test_vocab_padding_is_tp_independent_and_sliced_on_export():
    assert weights.padded_vocab_size(10, 8, 1) == weights.padded_vocab_size(10, 8, 2) == 16
    layout = _layout(vocab=10, divisible_by=8)
    weight = torch.randn(10, 3)
    padded = weights.pad_vocab(weight, layout)
    assert padded.shape == (16, 3) and torch.equal(padded[:10], weight) and not padded[10:].any()
    with pytest.raises(ValueError, match="vocab_size=10"):
        weights.pad_vocab(torch.randn(12, 3), layout)


def test_tp_split_and_merge_swiglu_fc1():
    gate, up = torch.arange(8.0)[:, None], torch.arange(100.0, 108.0)[:, None]
    full = torch.cat([gate, up])
    name = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    rank1 = tp_split(name, full, 2, 1)
    assert rank1[:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert torch.equal(tp_merge(name, [tp_split(name, full, 2, r) for r in range(2)]), full)
    row = "language_model.decoder.layers.0.self_attention.linear_proj.weight"
    assert tp_split(row, torch.zeros(4, 6), 2, 0).shape == (4, 3)
    norm = "language_model.decoder.layers.0.input_layernorm.weight"
    assert tp_split(norm, torch.zeros(6), 2, 1).shape == (6,)


def test_pp_ownership_and_layer_renumbering():
    assert shift_layer_index("language_model.decoder.layers.3.mlp.linear_fc2.weight", -2) == \
        "language_model.decoder.layers.1.mlp.linear_fc2.weight"
    assert shift_layer_index("visual.blocks.3.attn.qkv.weight", 5) == "visual.blocks.3.attn.qkv.weight"
    assert owning_pp_rank("language_model.decoder.layers.3.mlp.linear_fc2.weight", 4, 2) == 1
    assert owning_pp_rank("visual.blocks.3.attn.qkv.weight", 4, 2) == 0
    assert owning_pp_rank("language_model.output_layer.weight", 4, 2) == 1
    assert owning_pp_rank("language_model.embedding.word_embeddings.weight", 4, 2) == 0


def test_hf_name_conventions_round_trip():
    pairs = [("model.language_model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
             ("model.visual.blocks.0.attn.qkv.bias", "visual.blocks.0.attn.qkv.bias"),
             ("lm_head.weight", "lm_head.weight")]
    for in_memory, checkpoint in pairs:
        assert weights.to_checkpoint_name(in_memory) == checkpoint
        assert weights.to_transformers_name(checkpoint) == in_memory


def test_specs_cover_every_transformers_weight(tiny_qwen2_5_vl):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl)
    family = get_family(tiny_qwen2_5_vl)
    hf_names = [n for spec in family.weight_specs(config) for n in spec.hf_names]
    with torch.device("meta"):
        expected = AutoModelForImageTextToText.from_config(config).state_dict()
    assert sorted(hf_names) == sorted(family.checkpoint_name(n) for n in expected)
    assert len(hf_names) == len(set(hf_names))


def test_get_family_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        get_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='llama'"):
        get_family(tmp_path)


def _tp_attributes(rank, world_size, hf_dir):
    import torch
    from transformers import AutoConfig

    from megatron_vlmr1.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    env = initialize_parallel(ParallelConfig(), torch.device("cpu"))
    config = AutoConfig.from_pretrained(hf_dir)
    family = get_family(config)
    built = {}
    for init in (True, False):
        model = family.build_model(config, env, perform_initialization=init)
        built[init] = {name: tuple(getattr(p, a, None) for a in ("tensor_model_parallel", "partition_dim",
                                                                   "partition_stride"))
                       for name, p in model.named_parameters()}
    destroy_parallel()
    return built


def test_a_model_built_without_init_carries_the_same_tensor_parallel_attributes(tiny_qwen2_5_vl):
    """Skipping the random init (weights are loaded next) must not lose megatron's TP attributes: gradient clipping
    would count TP shards as replicas (the golden TP=2 x PP=2 run caught exactly that)."""
    from tests.distributed import run_distributed

    built = run_distributed(_tp_attributes, 1, str(tiny_qwen2_5_vl))[0]
    assert built[False] == built[True]
    assert built[True]["language_model.decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)
    assert built[True]["language_model.decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)
