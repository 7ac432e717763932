"""Transformers rollout engine: determinism, G samples, raw log-probs, stopping, weight updates, input checks."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from megatron_vlmr1.rollout.base import RolloutRequest, SamplingConfig
from megatron_vlmr1.rollout.config import RolloutConfig, build_engine
from megatron_vlmr1.rollout.hf import HFRolloutEngine, filter_top_k, filter_top_p, sample_tokens
from megatron_vlmr1.vlm.qwen_vl.processor import build_training_batch, encode_prompt, image_token_id
from tools.make_tiny_model import make_tiny_model


def _requests() -> list[RolloutRequest]:
    red = Image.new("RGB", (112, 140), (200, 0, 0))
    blue = Image.new("RGB", (168, 112), (0, 0, 200))
    return [RolloutRequest.from_prompt("<image>Where is the red circle?", [red]),
            RolloutRequest.from_prompt("Count the shapes.", []),
            RolloutRequest.from_prompt("Compare <image> with <image>.", [red, blue], system_prompt="Think.")]


@pytest.fixture(scope="module")
def engine(tiny_qwen2_5_vl) -> HFRolloutEngine:
    return HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_batch_size=4)


def _ids(results) -> list[list[list[int]]]:
    return [[c.completion_ids for c in r.completions] for r in results]


def test_sampling_config_rejects_bad_values():
    for kwargs, key in [({"n": 0}, "sampling.n"), ({"temperature": -0.1}, "sampling.temperature"),
                        ({"top_p": 0.0}, "sampling.top_p"), ({"top_p": 1.5}, "sampling.top_p"),
                        ({"top_k": 0}, "sampling.top_k"), ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
                        ({"stop": [""]}, "sampling.stop"), ({"seed": -1}, "sampling.seed")]:
        with pytest.raises(ValueError, match=key):
            SamplingConfig(**kwargs)


def test_filters_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert filter_top_k(logits, 2).tolist() == [[3.0, 2.0, -math.inf, -math.inf]]
    assert torch.equal(filter_top_k(logits, -1), logits)
    probs = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    # Descending mass before each token: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95.
    assert torch.isinf(filter_top_p(probs, 0.79)).tolist() == [[True, False, True, False]]
    assert torch.isinf(filter_top_p(probs, 0.81)).tolist() == [[True, False, False, False]]
    assert torch.isinf(filter_top_p(probs, 0.01)).tolist() == [[True, False, True, True]]


def test_g_samples_deterministic_for_a_seed(engine):
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    first = engine.generate(_requests(), sampling)
    again = engine.generate(_requests(), sampling)
    other = engine.generate(_requests(), SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, seed=8))
    assert [len(r.completions) for r in first] == [3, 3, 3]
    assert _ids(first) == _ids(again)
    assert [[c.logprobs for c in r.completions] for r in first] == [[c.logprobs for c in r.completions] for r in again]
    assert _ids(first) != _ids(other)
    assert len({tuple(ids) for ids in _ids(first)[0]}) > 1  # the G samples of one prompt differ
    for request, result in zip(_requests(), first):
        assert result.prompt_ids == encode_prompt(engine.processor, request.messages, request.images).input_ids
        for completion in result.completions:
            assert completion.text == engine.processor.tokenizer.decode(completion.completion_ids,
                                                                        skip_special_tokens=True)
            assert len(completion.logprobs) == len(completion.completion_ids)
    assert first[0].images[0].original == (140, 112)


def test_logprobs_are_raw_and_equal_a_recomputed_forward(engine):
    sampling = SamplingConfig(n=2, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=10, seed=3)
    requests = _requests()
    results = engine.generate(requests, sampling)
    prompts = [encode_prompt(engine.processor, r.messages, r.images) for r in requests for _ in range(sampling.n)]
    completions = [c.completion_ids for r in results for c in r.completions]
    batch = build_training_batch(prompts, completions, engine.pad_token_id, image_token_id(engine.processor), 2)
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                              image_grid_thw=batch.image_grid_thw).logits
    # Token t is predicted by the logits at column t - 1.
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.completion_mask[:, 1:].bool()
    ours = torch.tensor([lp for r in results for c in r.completions for lp in c.logprobs])
    torch.testing.assert_close(ours, logprobs[mask], atol=1e-4, rtol=0)


def test_greedy_equals_transformers_generate_and_is_batch_independent(engine, tiny_qwen2_5_vl):
    requests = _requests()
    batched = engine.generate(requests, SamplingConfig(temperature=0, max_new_tokens=8))
    for request, result in zip(requests, batched):
        alone = engine.generate([request], SamplingConfig(temperature=0, max_new_tokens=8))[0]
        assert alone.completions[0].completion_ids == result.completions[0].completion_ids
        prompt = encode_prompt(engine.processor, request.messages, request.images)
        inputs = {"input_ids": torch.tensor([prompt.input_ids]),
                  "attention_mask": torch.ones(1, len(prompt.input_ids), dtype=torch.long)}
        if prompt.pixel_values is not None:
            inputs.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                          mm_token_type_ids=(inputs["input_ids"] == image_token_id(engine.processor)).int())
        engine.model.model.rope_deltas = None
        reference = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert result.completions[0].completion_ids == reference[0, len(prompt.input_ids):].tolist()


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(_requests(), SamplingConfig(temperature=0, max_new_tokens=6))
    top1 = engine.generate(_requests(), SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=6, seed=5))
    assert _ids(greedy) == _ids(top1)


def test_stop_string_eos_and_length(engine):
    request = _requests()[1]
    free = engine.generate([request], SamplingConfig(temperature=0, max_new_tokens=10))[0].completions[0]
    assert free.finish_reason == "length" and len(free.completion_ids) == 10
    stop = engine.processor.tokenizer.decode(free.completion_ids[2:4])
    stopped = engine.generate([request], SamplingConfig(temperature=0, max_new_tokens=10, stop=[stop]))
    completion = stopped[0].completions[0]
    assert completion.finish_reason == "stop" and stop in completion.text
    assert stop not in engine.processor.tokenizer.decode(completion.completion_ids[:-1])
    assert completion.completion_ids == free.completion_ids[:len(completion.completion_ids)]
    eos = free.completion_ids[5]
    first_eos = free.completion_ids.index(eos)
    saved = engine.eos_token_ids
    engine.eos_token_ids = saved | {eos}
    try:
        ended = engine.generate([request], SamplingConfig(temperature=0, max_new_tokens=10))[0].completions[0]
    finally:
        engine.eos_token_ids = saved
    assert ended.finish_reason == "stop" and ended.completion_ids == free.completion_ids[:first_eos + 1]


def test_max_model_len_caps_generation_and_rejects_long_prompts(tiny_qwen2_5_vl):
    request = _requests()[0]
    short = HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_model_len=32)
    with pytest.raises(ValueError, match=r"request 0: prompt has \d+ tokens .* max_model_len is 32"):
        short.generate([request], SamplingConfig(max_new_tokens=4))
    prompt_len = len(encode_prompt(short.processor, request.messages, request.images).input_ids)
    capped = HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_model_len=prompt_len + 3)
    completion = capped.generate([request], SamplingConfig(max_new_tokens=50))[0].completions[0]
    assert len(completion.completion_ids) == 3 and completion.finish_reason == "length"
    with pytest.raises(ValueError, match="1 image slots but 0 images"):
        capped.generate([RolloutRequest(request.messages, [])], SamplingConfig())


@pytest.mark.parametrize("tied", [False, True])
def test_update_weights_equals_loading_those_weights_fresh(tmp_path, tied):
    old = make_tiny_model("qwen2_5_vl", tmp_path / "old", seed=11, tie_embeddings=tied)
    new = make_tiny_model("qwen2_5_vl", tmp_path / "new", seed=12, tie_embeddings=tied)
    engine = HFRolloutEngine.from_pretrained(old)
    fresh = HFRolloutEngine.from_pretrained(new)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    before = engine.generate(_requests(), sampling)
    checkpoint = load_file(new / "model.safetensors")
    assert ("lm_head.weight" in checkpoint) != tied
    engine.update_weights(iter(checkpoint.items()))
    after, expected = engine.generate(_requests(), sampling), fresh.generate(_requests(), sampling)
    assert _ids(after) == _ids(expected) and _ids(after) != _ids(before)
    assert [[c.logprobs for c in r.completions] for r in after] == \
           [[c.logprobs for c in r.completions] for r in expected]
    if tied:  # the head is the embedding: updating either name changes both
        engine.update_weights([("lm_head.weight", checkpoint["model.embed_tokens.weight"] * 2)])
        assert torch.equal(engine.model.get_input_embeddings().weight, checkpoint["model.embed_tokens.weight"] * 2)


def test_update_weights_accepts_transformers_names_and_rejects_bad_ones(engine, tiny_qwen2_5_vl):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    original = dict(engine.model.named_parameters())[name].clone()
    try:
        engine.update_weights([(name, torch.zeros_like(original))])
        assert dict(engine.model.named_parameters())[name].abs().sum() == 0
    finally:
        engine.update_weights([(name, original)])
    assert torch.equal(dict(engine.model.named_parameters())[name], dict(model.named_parameters())[name])
    with pytest.raises(ValueError, match="'model.layers.0.nope.weight' is not a parameter"):
        engine.update_weights([("model.layers.0.nope.weight", original)])
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([("model.layers.0.mlp.up_proj.weight", original.T)])


def test_vision_placeholders_are_never_sampled_but_logprobs_stay_raw(engine):
    banned = engine.family.banned_token_ids(engine.processor.tokenizer)
    assert banned == sorted(engine.processor.tokenizer.convert_tokens_to_ids(list(engine.family.vision_placeholders)))
    logits = torch.zeros(2, 20)
    logits[:, 12] = 9.0  # the best token is banned
    logits[:, 4] = 1.0
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits, SamplingConfig(temperature=0), generator, banned_ids=[12])
    assert tokens.tolist() == [4, 4]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[:, 4])
    sampled, _ = sample_tokens(logits[:1].expand(500, -1), SamplingConfig(temperature=2.0), generator, banned_ids=[12])
    assert 12 not in sampled.tolist()


def test_rollout_config_validation_and_build_engine(tiny_qwen2_5_vl):
    for kwargs, key in [({"engine": "sglang"}, "rollout.engine"), ({"max_model_len": 1}, "rollout.max_model_len"),
                        ({"max_batch_size": 0}, "rollout.max_batch_size"),
                        ({"gpu_memory_utilization": 0.0}, "rollout.gpu_memory_utilization")]:
        with pytest.raises(ValueError, match=key):
            RolloutConfig(**kwargs)
    engine = build_engine(RolloutConfig(max_model_len=300, max_batch_size=3), str(tiny_qwen2_5_vl))
    assert isinstance(engine, HFRolloutEngine)
    assert (engine.max_model_len, engine.max_batch_size) == (300, 3)
