"""vLLM tensor parallel inside a torchrun world: TP=2 over 2 gloo ranks (``external_launcher``) against TP=1.

This module's ``__main__`` is the engine driver (vLLM pins CPU threads and keeps global state, so it runs in its own
processes): ``tp2`` under ``torchrun --nproc-per-node 2`` starts fresh on a checkpoint after one Adam step, then
receives the start weights and then the stepped weights again through ``update_weights``; ``tp1`` (one process)
starts on the stepped checkpoint and receives the start weights. The tiny Qwen2.5-VL has 2 KV heads (one per rank).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_vlmr1.rollout.base import SamplingConfig
from tests.rollout.test_hf_engine import _requests
from tests.rollout.test_hybrid_engine import _adam_step, _dump, _ids, _logprobs

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingConfig(n=2, temperature=0, max_new_tokens=6)
SAMPLED = SamplingConfig(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6)
SEEDS = [11, 12, 13]


def _drive(mode: str, start_dir: str, stepped_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine

    world, rank = 1, 0
    if mode == "tp2":
        dist.init_process_group("gloo")  # as the trainer does before building the engine
        world, rank = dist.get_world_size(), dist.get_rank()
    engine = VLLMRolloutEngine(stepped_dir, max_model_len=256, max_num_seqs=8, max_images_per_prompt=2,
                               sync_bucket_bytes=64 * 2**10, tensor_parallel_size=world, world_size=world)
    out = {"greedy_fresh": _dump(engine.generate(_requests(), GREEDY)),
           "sampled_fresh": _dump(engine.generate(_requests(), SAMPLED, seeds=SEEDS))}
    engine.update_weights(iter(load_file(f"{start_dir}/model.safetensors").items()))
    out["greedy_start"] = _dump(engine.generate(_requests(), GREEDY))
    if mode == "tp2":
        engine.update_weights(iter(load_file(f"{stepped_dir}/model.safetensors").items()))
        out["greedy_synced"] = _dump(engine.generate(_requests(), GREEDY))
        out["sampled_synced"] = _dump(engine.generate(_requests(), SAMPLED, seeds=SEEDS))
    engine.close()  # (shuts vLLM's groups down, and with them the default group it joined)
    Path(out_dir, f"{mode}_rank{rank}.json").write_text(json.dumps(out))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_qwen2_5_vl_kv2, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm_tp")
    stepped = _adam_step(tiny_qwen2_5_vl_kv2, root / "stepped")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode, launcher in (("tp2", ["-m", "torch.distributed.run", "--nproc-per-node", "2"]), ("tp1", [])):
        result = subprocess.run([sys.executable, *launcher, "-m", "tests.rollout.test_vllm_tp", mode,
                                 str(tiny_qwen2_5_vl_kv2), str(stepped), str(root)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-5000:]
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("tp2_rank0", "tp2_rank1", "tp1_rank0")}


@pytest.mark.slow
def test_vllm_tp2_matches_tp1_and_a_sync_matches_a_fresh_tp2_engine(runs):
    rank0, rank1, tp1 = runs["tp2_rank0"], runs["tp2_rank1"], runs["tp1_rank0"]
    assert rank0 == rank1  # both ranks of the tensor-parallel engine return the same results
    for key in ("greedy_fresh", "greedy_start"):
        assert _ids(rank0[key]) == _ids(tp1[key]), key
        torch.testing.assert_close(_logprobs(rank0[key]), _logprobs(tp1[key]), atol=1e-4, rtol=0)
    # a bucketed sync after the Adam step gives exactly what a TP=2 engine loaded from the stepped checkpoint gives
    assert _ids(rank0["greedy_synced"]) == _ids(rank0["greedy_fresh"])
    torch.testing.assert_close(_logprobs(rank0["greedy_synced"]), _logprobs(rank0["greedy_fresh"]), atol=1e-5, rtol=0)
    assert _ids(rank0["sampled_synced"]) == _ids(rank0["sampled_fresh"])
    # the start weights really are different from the stepped ones
    assert (_logprobs(rank0["greedy_start"]) - _logprobs(rank0["greedy_fresh"])).abs().max() > 0.05


if __name__ == "__main__":
    _drive(*sys.argv[1:5])
