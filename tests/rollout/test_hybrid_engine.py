"""Hybrid engine: bucketed weight sync, sync after an optimizer step, device plumbing, bad input before generation.

The vLLM cases run vLLM in subprocesses (this module's ``__main__``; vLLM pins CPU threads and keeps global state):
one engine starts from the tiny seed-0 model and receives the weights of that model after one Adam step through
``update_weights`` in 64 KiB buckets; a second engine is started fresh on the stepped checkpoint. Both must then
generate the same tokens with the same log-probs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from megatron_vlmr1.rollout.base import RolloutRequest, SamplingConfig, weight_buckets, weight_group
from megatron_vlmr1.rollout.config import RolloutConfig, build_engine
from megatron_vlmr1.rollout.hf import HFRolloutEngine, resolve_parameter_name
from megatron_vlmr1.vlm.qwen_vl.processor import build_training_batch, encode_prompt, image_token_id
from tests.rollout.test_hf_engine import _requests

REPO = Path(__file__).resolve().parents[2]
BUCKET_BYTES = 64 * 2**10
GREEDY = SamplingConfig(n=2, temperature=0, max_new_tokens=8)
SAMPLED = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)


# -- buckets -------------------------------------------------------------------------------------------------------
def test_weight_group_is_the_block_or_the_module():
    assert weight_group("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert weight_group("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert weight_group("visual.blocks.0.attn.qkv.bias") == "visual.blocks.0"
    assert weight_group("visual.merger.mlp.2.weight") == "visual.merger.mlp.2"
    assert weight_group("model.embed_tokens.weight") == "model.embed_tokens"
    assert weight_group("lm_head.weight") == "lm_head"


def _stream(sizes: list[tuple[str, int]]):
    return [(name, torch.zeros(numel, dtype=torch.float32)) for name, numel in sizes]


def test_buckets_close_at_the_size_but_never_inside_a_block():
    weights = _stream([("model.embed_tokens.weight", 10), ("model.layers.0.self_attn.q_proj.weight", 4),
                       ("model.layers.0.self_attn.k_proj.weight", 4), ("model.layers.0.mlp.up_proj.weight", 4),
                       ("model.layers.1.self_attn.q_proj.weight", 4), ("model.norm.weight", 1)])
    names = [[name for name, _ in bucket] for bucket in weight_buckets(weights, bucket_bytes=8 * 4)]
    # 40 bytes of embeddings fill bucket 1; layer 0 (48 bytes) stays whole; layer 1 (16) + norm (4) end the stream
    assert names == [["model.embed_tokens.weight"],
                     ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                      "model.layers.0.mlp.up_proj.weight"],
                     ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]]
    everything = [[name for name, _ in bucket] for bucket in weight_buckets(weights, bucket_bytes=10**9)]
    assert everything == [[name for name, _ in weights]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(weight_buckets(weights, 0))


def test_buckets_consume_the_stream_lazily():
    pulled = []

    def stream():
        for i in range(6):
            pulled.append(i)
            yield f"model.layers.{i}.mlp.down_proj.weight", torch.zeros(4)

    buckets = weight_buckets(stream(), bucket_bytes=16)
    first = next(buckets)
    # one bucket of one block, plus the tensor that proved the bucket full: never the whole model
    assert [name for name, _ in first] == ["model.layers.0.mlp.down_proj.weight"] and pulled == [0, 1]
    assert len(list(buckets)) == 5


def test_rollout_config_sync_keys():
    with pytest.raises(ValueError, match="rollout.sync_bucket_mb"):
        RolloutConfig(sync_bucket_mb=0)
    assert RolloutConfig().sync_bucket_mb == 512.0 and RolloutConfig().vllm_sleep is True


# -- transformers engine: bytes, device plumbing, bad input ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_qwen2_5_vl) -> HFRolloutEngine:
    return HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_batch_size=4)


def test_hf_update_weights_returns_the_bytes_received(engine, tiny_qwen2_5_vl):
    checkpoint = load_file(tiny_qwen2_5_vl / "model.safetensors")
    assert engine.update_weights(checkpoint.items()) == sum(t.numel() * t.element_size() for t in checkpoint.values())
    assert engine.sleep() == 0


def test_build_engine_places_the_hf_model_on_the_given_device(tiny_qwen2_5_vl, monkeypatch):
    seen = {}
    real = HFRolloutEngine.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(HFRolloutEngine, "from_pretrained", classmethod(spy))
    built = build_engine(RolloutConfig(), str(tiny_qwen2_5_vl), device=torch.device("cpu"))
    assert seen["device"] == torch.device("cpu") and built.device == torch.device("cpu")
    # the sampling generator lives where the logits are (a CPU generator cannot draw CUDA tensors)
    assert built.make_generator(3).device == built.device
    assert torch.equal(torch.randint(0, 100, (5,), generator=built.make_generator(3)),
                       torch.randint(0, 100, (5,), generator=torch.Generator().manual_seed(3)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device is cuda but CUDA is not available"):
        HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, device="cuda")


def _bad_requests(tmp_dir: Path) -> list[tuple[RolloutRequest, str]]:
    """Requests every engine must refuse before generating, with the message each error must contain."""
    corrupt = tmp_dir / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    return [(RolloutRequest.from_prompt("<image>Where?", [corrupt]), "request 0: cannot identify image file"),
            (RolloutRequest.from_prompt("<image>Where?", [tmp_dir / "missing.png"]),
             "request 0: image file not found"),
            (RolloutRequest.from_prompt("<image>Where?", [Image.new("RGB", (10, 3000))]),
             "request 0: absolute aspect ratio must be smaller than 200"),
            (RolloutRequest.from_prompt("red " * 600, []), "request 0: prompt has")]


def _bad_sampling() -> list[tuple[SamplingConfig, str]]:
    """Sampling configs mutated out of range after construction: generate re-validates them."""
    cases = []
    for key, value in [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_k", 0),
                       ("max_new_tokens", 0), ("n", 0)]:
        sampling = SamplingConfig()
        setattr(sampling, key, value)
        cases.append((sampling, f"sampling.{key}"))
    return cases


def test_sampling_config_refuses_a_temperature_vllm_would_treat_as_greedy():
    with pytest.raises(ValueError, match=r"sampling.temperature must be 0 \(greedy\) or >= 1e-05"):
        SamplingConfig(n=4, temperature=1e-6)
    assert SamplingConfig(n=4, temperature=1e-5).temperature == 1e-5


def test_hf_engine_refuses_bad_input_before_generating(tiny_qwen2_5_vl, tmp_path):
    short = HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_model_len=512)
    calls = []
    short.model.register_forward_pre_hook(lambda *_: calls.append(1))
    for request, message in _bad_requests(tmp_path):
        with pytest.raises(ValueError, match=message):
            short.generate([request], SamplingConfig(max_new_tokens=2))
    for sampling, key in _bad_sampling():
        with pytest.raises(ValueError, match=key):
            short.generate(_requests(), sampling)
    assert calls == []  # nothing reached the model


# -- vLLM: a bucketed sync after an optimizer step equals a fresh engine on the stepped weights --------------------
def _adam_step(source: Path, out: Path) -> Path:
    """``source`` after one Adam step (lr 1e-2) on the log-likelihood of a few completions, saved under the
    checkpoint's own tensor names (the names the trainer's exporter streams)."""
    engine = HFRolloutEngine.from_pretrained(source)
    model = engine.model.train()
    requests = _requests()
    prompts = [encode_prompt(engine.processor, r.messages, r.images) for r in requests]
    batch = build_training_batch(prompts, [[100, 101, 102, 103]] * len(prompts), engine.pad_token_id,
                                 image_token_id(engine.processor), 2)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw).logits
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    (-(logprobs * batch.completion_mask[:, 1:]).sum()).backward()
    optimizer.step()
    shutil.copytree(source, out)
    params = dict(model.named_parameters())
    names = load_file(source / "model.safetensors").keys()
    save_file({name: params[resolve_parameter_name(name, params)].detach().contiguous() for name in names},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _dump(results) -> list[dict]:
    return [{"prompt_ids": r.prompt_ids, "completions": [dataclasses.asdict(c) for c in r.completions]}
            for r in results]


def _drive(mode: str, model_dir: str, weights_dir: str, out_path: str) -> None:
    """Subprocess body. ``synced``: start on ``model_dir``, check bad input, sync ``weights_dir`` in buckets;
    ``fresh``: start on ``weights_dir``. Then generate greedily and sampled, and write everything as JSON."""
    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine

    torch.set_num_threads(1)
    start = model_dir if mode == "synced" else weights_dir
    engine = VLLMRolloutEngine(start, max_model_len=512, max_num_seqs=8, max_images_per_prompt=2,
                               sync_bucket_bytes=BUCKET_BYTES, sleep=True)
    out: dict = {"sleep_freed": engine.sleep(), "can_sleep": engine.can_sleep}
    if mode == "synced":
        out["before"] = _dump(engine.generate(_requests(), GREEDY))
        errors = []
        for request, _ in _bad_requests(Path(out_path).parent):
            try:
                engine.generate([request], GREEDY)
            except ValueError as err:
                errors.append(str(err))
        for sampling, _ in _bad_sampling():
            try:
                engine.generate(_requests(), sampling)
            except ValueError as err:
                errors.append(str(err))
        out["errors"] = errors
        out["synced_bytes"] = engine.update_weights(iter(load_file(f"{weights_dir}/model.safetensors").items()))
        out["buckets"] = engine.last_sync_buckets
    out["greedy"] = _dump(engine.generate(_requests(), GREEDY))
    out["sampled"] = _dump(engine.generate(_requests(), SAMPLED))
    engine.close()
    with open(out_path, "w") as fh:
        json.dump(out, fh)


@pytest.fixture(scope="module")
def vllm_runs(tiny_qwen2_5_vl, tmp_path_factory) -> tuple[dict, dict, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    stepped = _adam_step(tiny_qwen2_5_vl, root / "stepped")
    runs = {}
    for mode in ("synced", "fresh"):
        out = root / f"{mode}.json"
        result = subprocess.run([sys.executable, "-m", "tests.rollout.test_hybrid_engine", mode, str(tiny_qwen2_5_vl),
                                 str(stepped), str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-5000:]
        runs[mode] = json.loads(out.read_text())
    return runs["synced"], runs["fresh"], stepped


def _logprobs(dumped: list[dict]) -> torch.Tensor:
    return torch.tensor([lp for r in dumped for c in r["completions"] for lp in c["logprobs"]])


def _ids(dumped: list[dict]) -> list:
    return [[c["completion_ids"] for c in r["completions"]] for r in dumped]


@pytest.mark.slow
def test_bucketed_sync_after_an_optimizer_step_equals_a_fresh_engine(vllm_runs):
    synced, fresh, stepped = vllm_runs
    checkpoint = load_file(stepped / "model.safetensors")
    assert synced["synced_bytes"] == sum(t.numel() * t.element_size() for t in checkpoint.values())
    groups = [weight_group(name) for name in checkpoint]  # the order the driver streams them in
    runs = 1 + sum(a != b for a, b in zip(groups, groups[1:]))
    assert 5 < synced["buckets"] <= runs  # 64 KiB buckets: many reload calls, each with whole blocks
    for key in ("greedy", "sampled"):
        assert _ids(synced[key]) == _ids(fresh[key])
        torch.testing.assert_close(_logprobs(synced[key]), _logprobs(fresh[key]), atol=1e-5, rtol=0)
    # the step changed what vLLM computes (same greedy tokens would still differ in log-probs)
    assert len(_logprobs(synced["before"])) == len(_logprobs(synced["greedy"]))
    assert (_logprobs(synced["before"]) - _logprobs(synced["greedy"])).abs().max() > 0.05


@pytest.mark.slow
def test_vllm_refuses_bad_input_before_generating_and_does_not_sleep_on_cpu(vllm_runs, tmp_path):
    synced, fresh, _ = vllm_runs
    messages = [message for _, message in _bad_requests(tmp_path)] + [key for _, key in _bad_sampling()]
    assert len(synced["errors"]) == len(messages)
    for error, message in zip(synced["errors"], messages):
        assert message in error, (message, error)
    assert synced["sleep_freed"] == 0 and synced["can_sleep"] is False


# -- the throughput benchmark ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_throughput_reports_tokens_and_sync_speed(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "tools/bench_throughput.py", "--engine", "hf", "--prompts", "2",
                             "--group", "2", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1",
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["engine"] == "hf" and 2 * 2 <= row["rollout_tokens"] <= 2 * 2 * 4
    assert row["tokens_per_s"] == pytest.approx(row["rollout_tokens"] / row["rollout_s"])
    assert row["sync_s_per_gib"] == pytest.approx(row["sync_s"] / row["sync_gib"])
    assert 0.001 < row["sync_gib"] < 0.01  # the tiny model: about 5.5 MB of fp32 weights
    assert "tokens/s" in result.stdout and "\nhf | " in result.stdout


if __name__ == "__main__":
    _drive(*sys.argv[1:5])
