"""Session-wide fixtures: tiny Qwen-VL and InternVL checkpoints built once per test session (a few seconds each)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tools.make_tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> Path:
    """Directory of a tiny Qwen2.5-VL HF checkpoint (seed 0, 2 layers, untied embeddings)."""
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """Directory of a tiny Qwen2-VL HF checkpoint (seed 0, 2 layers, untied embeddings)."""
    return make_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny_qwen2_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_kv2(tmp_path_factory) -> Path:
    """Tiny Qwen2.5-VL with 2 KV heads (2 query heads): trainable at TP=2 without replicated KV heads."""
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen2_5_vl_kv2"), seed=0, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory) -> Path:
    """Directory of a tiny InternVL HF checkpoint (seed 0, 2 layers, 2 query / 2 KV heads of dim 64, untied)."""
    return make_tiny_model("internvl", tmp_path_factory.mktemp("tiny_internvl"), seed=0)
