"""Qwen2-VL / Qwen2.5-VL family: model assembly, HF <-> megatron weights, prompt processing.

``family.py`` registers ``QwenVLFamily`` when ``vlm.families`` imports it; code outside ``vlm/`` uses that family
object, never these modules.
"""
