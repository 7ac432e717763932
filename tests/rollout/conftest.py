"""Rollout test fixtures."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest


@pytest.fixture
def fake_llm(monkeypatch):
    seen: dict = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.clear()
            seen.update(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    return seen
