"""Qwen2-VL / Qwen2.5-VL family: model assembly, HF <-> megatron weights, prompt processing."""
