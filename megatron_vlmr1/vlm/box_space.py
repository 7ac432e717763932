"""``box_space: auto``: the coordinate space a model answers boxes in, from its family (``VLMFamily.default_box_space``).

Scoring a Qwen2.5-VL trained on real, resized images against original-pixel boxes silently gives the wrong rewards;
so the default is the family's own convention, an explicit ``abs`` / ``resized`` / ``norm1000`` still wins.
"""
from __future__ import annotations

from typing import Any

from megatron_vlmr1.vlm.families import get_family

AUTO = "auto"


def resolve_box_space(box_space: str, hf_config: Any) -> str:
    """``box_space`` itself, or for ``auto`` the default of ``hf_config``'s family (by its ``model_type``)."""
    if box_space != AUTO:
        return box_space
    return get_family(hf_config).default_box_space(hf_config.model_type)


def describe_box_space(configured: str, resolved: str, model_type: str | None) -> str:
    """One log line saying which space boxes are scored in and why."""
    if configured != AUTO:
        return f"box_space: {resolved} (set in the config)"
    if model_type is None:
        return f"box_space: {resolved} (auto, no model to ask: original-image pixels)"
    return f"box_space: {resolved} (auto: the default of model_type {model_type!r})"
