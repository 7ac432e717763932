"""vLLM's constructor arguments inside a torchrun world, checked with a fake ``vllm.LLM`` (no GPU needed).

The GPU-0 bug: without ``tensor_parallel_size`` and an executor backend vLLM takes its single-process executor on
``torch.device("cuda")`` without an index, so every rank of a node would land on GPU 0.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_vlmr1.rollout.config import RolloutConfig, build_engine, model_max_len


def test_vllm_in_a_torchrun_world_uses_external_launcher_tp_and_local_rank_device(fake_llm, tiny_qwen2_5_vl,
                                                                                  monkeypatch):
    devices = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    engine = build_engine(RolloutConfig(engine="vllm"), str(tiny_qwen2_5_vl), tp=2, world_size=4)
    assert fake_llm["tensor_parallel_size"] == 2
    assert fake_llm["distributed_executor_backend"] == "external_launcher"
    assert engine.device == torch.device("cuda", 3) and devices == [torch.device("cuda", 3)]
    # GPU defaults: CUDA graphs, sleep between rollouts, the model's own context length
    assert fake_llm["enforce_eager"] is False and fake_llm["enable_sleep_mode"] is True
    assert fake_llm["max_model_len"] == 4096 and fake_llm["max_num_seqs"] == 256


def test_vllm_alone_on_cpu_keeps_the_single_process_executor(fake_llm, tiny_qwen2_5_vl, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = build_engine(RolloutConfig(engine="vllm", max_num_seqs=8), str(tiny_qwen2_5_vl))
    assert "distributed_executor_backend" not in fake_llm and fake_llm["tensor_parallel_size"] == 1
    assert engine.device == torch.device("cpu")
    assert fake_llm["enforce_eager"] is True and fake_llm["enable_sleep_mode"] is False  # CPU: no graphs, no sleep
    assert fake_llm["max_num_seqs"] == 8
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must be >= 1 and divide the world size 4"):
        build_engine(RolloutConfig(engine="vllm"), str(tiny_qwen2_5_vl), tp=3, world_size=4)


def test_max_model_len_defaults_to_what_the_model_supports(fake_llm, tiny_qwen2_5_vl, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    short = shutil.copytree(tiny_qwen2_5_vl, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 2048
    (short / "config.json").write_text(json.dumps(config))
    assert model_max_len(short) == 2048
    build_engine(RolloutConfig(engine="vllm"), str(short))
    assert fake_llm["max_model_len"] == 2048
    assert build_engine(RolloutConfig(), str(short)).max_model_len == 2048  # the transformers engine too
    build_engine(RolloutConfig(engine="vllm", max_model_len=512), str(short))
    assert fake_llm["max_model_len"] == 512


def test_rollout_tp_defaults_to_the_trainer_tp_for_vllm_only():
    assert RolloutConfig(engine="vllm").rollout_tp(4) == 4
    assert RolloutConfig(engine="vllm", tp=2).rollout_tp(4) == 2
    assert RolloutConfig(engine="hf").rollout_tp(4) == 1
    with pytest.raises(ValueError, match="rollout.tp=2: the transformers engine has no tensor parallelism"):
        RolloutConfig(engine="hf", tp=2)
    with pytest.raises(ValueError, match="rollout.tp must be >= 1"):
        RolloutConfig(engine="vllm", tp=0)
