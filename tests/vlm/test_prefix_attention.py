"""The shared-prefix core attention alone, against a plain masked softmax over the same packed rows."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_vlmr1.trainer.packing import PAD_SEGMENT, PROMPT_SEGMENT, prefix_layout
from megatron_vlmr1.vlm.prefix_attention import (SharedPrefixAttention, masked_attention, row_plan,
                                                 shared_prefix_attention, with_shared_prefix_attention)

# row 0: prefix of 3, segments of 2, 4, 1, then 2 padding; row 1: no prefix (a one-token prompt), segments 5, 3,
# then 4 padding. Uneven segment lengths, padding, a row without prefix.
SEGMENTS = torch.tensor([
    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, -1, -1],
    [1, 1, 1, 1, 1, 2, 2, 2, -1, -1, -1, -1],
])


def _reference(query, key, value, segments, scale):
    """softmax(q k^T * scale) v over the keys each query may see, as an explicit [b, h, s, s] mask."""
    seq, _, heads, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[2], dim=2)
    value = value.repeat_interleave(heads // value.shape[2], dim=2)
    q_seg, k_seg = segments[:, None, :, None], segments[:, None, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal & (k_seg != PAD_SEGMENT) & ((k_seg == PROMPT_SEGMENT) | (k_seg == q_seg))
    scores = torch.einsum("qbhd,kbhd->bhqk", query, key) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()  # padded queries: all masked -> 0
    return torch.einsum("bhqk,kbhd->qbhd", probs, value)


def _inputs(heads=4, kv_heads=2, dim=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    seq, batch = SEGMENTS.shape[1], SEGMENTS.shape[0]
    make = lambda h: torch.randn(seq, batch, h, dim, generator=gen, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def test_prefix_layout_of_the_segments():
    assert prefix_layout(SEGMENTS).tolist() == [[3, 2, 4, 1], [0, 5, 3, 0]]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (2, 1)])
def test_matches_masked_softmax_with_gradients(heads, kv_heads):
    query, key, value = _inputs(heads, kv_heads)
    scale = 1 / math.sqrt(query.shape[-1])
    out = shared_prefix_attention(query, key, value, prefix_layout(SEGMENTS), scale)
    expected = _reference(query, key, value, SEGMENTS, scale)
    real = (SEGMENTS != PAD_SEGMENT).T  # [s, b]
    torch.testing.assert_close(out[real], expected[real], atol=1e-12, rtol=0)
    assert bool((out[~real] == 0).all())  # padded tail: zeros, finite
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    weights = weights * real[..., None, None]
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


def test_row_plan_indices_by_hand():
    """Row 0 of ``SEGMENTS``: prefix 3, segments of 2, 4, 1 at positions 3-4, 5-8, 9 (n_max 4; a short segment's
    tail repeats its last position)."""
    plan = row_plan(3, (2, 4, 1), torch.device("cpu"))
    assert plan.segment_index.tolist() == [3, 4, 4, 4, 5, 6, 7, 8, 9, 9, 9, 9]
    assert plan.key_index.tolist() == [0, 1, 2, 3, 4, 4, 4, 0, 1, 2, 5, 6, 7, 8, 0, 1, 2, 9, 9, 9, 9]
    assert plan.output_index.tolist() == [0, 1, 4, 5, 6, 7, 8]
    assert plan.mask.tolist()[0] == [True] * 4 + [False] * 3  # query 0 sees the prefix and its own first token
    assert plan.mask.tolist()[3] == [True] * 7
    assert plan.used == 10
    assert row_plan(3, (2, 4, 1), torch.device("cpu")) is plan  # built once, shared by every layer


def test_gradcheck():
    """Finite differences on a small row (prefix 1, segments 2 and 1, one padding token; GQA 2:1)."""
    gen = torch.Generator().manual_seed(3)
    make = lambda h: torch.randn(5, 1, h, 2, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    layout = torch.tensor([[1, 2, 1]])
    assert torch.autograd.gradcheck(lambda q, k, v: shared_prefix_attention(q, k, v, layout, 0.5),
                                    (make(2), make(1), make(1)))


def test_float32_matches_float64_reference():
    query, key, value = _inputs(dtype=torch.float32)
    out = shared_prefix_attention(query, key, value, prefix_layout(SEGMENTS), 0.3)
    expected = _reference(query.double(), key.double(), value.double(), SEGMENTS, 0.3)
    real = (SEGMENTS != PAD_SEGMENT).T
    torch.testing.assert_close(out[real].double(), expected[real], atol=1e-5, rtol=0)


def test_layout_that_does_not_fit_is_rejected():
    query, key, value = _inputs()
    with pytest.raises(ValueError, match="do not fit"):
        shared_prefix_attention(query, key, value, torch.tensor([[3, 10], [0, 5]]), 1.0)
    with pytest.raises(ValueError, match="segments must be"):
        prefix_layout(torch.tensor([[0, 2, 2, 1, -1]]))


def test_masked_attention_causal_and_bool_mask():
    query, key, value = _inputs()
    seq = query.shape[0]
    everything = torch.zeros(SEGMENTS.shape[0], seq, dtype=torch.long)  # one segment covering each row: causal
    causal = _reference(query, key, value, everything, 0.5)
    torch.testing.assert_close(masked_attention(query, key, value, None, 0.5), causal, atol=1e-12, rtol=0)
    mask = ~torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    torch.testing.assert_close(masked_attention(query, key, value, mask, 0.5), causal, atol=1e-12, rtol=0)
    mask[:, :, -1] = True  # a fully masked query row stays finite (megatron's fill value, not -inf)
    assert bool(masked_attention(query, key, value, mask, 0.5).isfinite().all())


def _config(**overrides):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                             attention_dropout=0.0, use_cpu_initialization=True, **overrides)


def test_module_output_layout_and_scale():
    from megatron.core.transformer.enums import AttnMaskType

    module = SharedPrefixAttention(_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                                   attention_type="self")
    assert module.softmax_scale == pytest.approx(1 / math.sqrt(8))
    query, key, value = _inputs()
    layout = prefix_layout(SEGMENTS)
    out = module(query, key, value, layout, attn_mask_type=AttnMaskType.causal)
    assert out.shape == (12, 2, 32)
    expected = shared_prefix_attention(query, key, value, layout, 1 / math.sqrt(8)).reshape(12, 2, 32)
    assert torch.equal(out, expected)
    causal = module(query, key, value, None)  # no layout: causal, like megatron's attention without a mask
    torch.testing.assert_close(causal, masked_attention(query, key, value, None, 1 / math.sqrt(8)).reshape(12, 2, 32))


def test_module_rejects_what_it_cannot_compute():
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match="attention_dropout"):
        SharedPrefixAttention(_config(), 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    with pytest.raises(ValueError, match="window_size"):
        SharedPrefixAttention(_config(window_size=(4, 0)), 1, AttnMaskType.causal, "self")
    module = SharedPrefixAttention(_config(), 1, AttnMaskType.causal, "self")
    query, key, value = _inputs()
    with pytest.raises(ValueError, match="packed_seq_params"):
        module(query, key, value, None, packed_seq_params=object())


def _local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _split_norm_spec():
    from megatron.core.models.backends import LocalSpecProvider

    from megatron_vlmr1.vlm.layer_specs import split_norm_layer_spec

    return split_norm_layer_spec(LocalSpecProvider())


@pytest.mark.parametrize("make_spec", [_local_spec, _split_norm_spec])
def test_spec_swaps_exactly_the_core_attention(make_spec):
    """The helper takes any transformer-layer spec (Transformer Engine's ``te`` and ``te_split`` specs cannot be
    built without TE; megatron's local spec and the split-norm spec from megatron's local provider have the same
    structure) and changes only ``self_attention.submodules.core_attention``."""
    spec = make_spec()
    original_core = spec.submodules.self_attention.submodules.core_attention
    swapped = with_shared_prefix_attention(spec)
    assert spec.submodules.self_attention.submodules.core_attention is original_core  # the input is not mutated
    assert swapped.submodules.self_attention.submodules.core_attention is SharedPrefixAttention
    assert swapped.module is spec.module and swapped.params == spec.params
    for field in dataclasses.fields(spec.submodules):
        if field.name != "self_attention":
            assert getattr(swapped.submodules, field.name) is getattr(spec.submodules, field.name), field.name
    attention, new_attention = spec.submodules.self_attention, swapped.submodules.self_attention
    assert new_attention.module is attention.module and new_attention.params == attention.params
    for field in dataclasses.fields(attention.submodules):
        if field.name != "core_attention":
            assert getattr(new_attention.submodules, field.name) is getattr(attention.submodules, field.name)
