"""Qwen2-VL / Qwen2.5-VL on megatron-core: HF vision tower + megatron ``GPTModel`` with mrope.

The language model is megatron-core's ``GPTModel`` (TP/PP, distributed optimizer, dist_checkpointing all work as
for any GPT). The vision tower is transformers' own module (``Qwen2_5_VisionTransformerPretrainedModel`` or
Qwen2-VL's), replicated on every TP rank of the first pipeline stage: it is small (~0.7B for every Qwen2.5-VL size)
and sharding it would buy little. Its merged patch embeddings replace the word embeddings at the image-token
positions, and the result enters ``GPTModel`` as ``decoder_input``.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import hf_config_text
from megatron_vlmr1.vlm.gpt_vlm import VisionLanguageGPT
from megatron_vlmr1.vlm.gpt_vlm import transformer_config as gpt_transformer_config
from megatron_vlmr1.vlm.qwen_vl.weights import QwenLayout

_VISION_CLASSES = {
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
}


def vision_class(model_type: str) -> type:
    if model_type not in _VISION_CLASSES:
        raise ValueError(f"no Qwen vision tower for model_type={model_type!r}; known: {sorted(_VISION_CLASSES)}")
    module, name = _VISION_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def mrope_section(hf_config: Any) -> list[int]:
    text = hf_config_text(hf_config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if "mrope_section" not in rope:
        raise ValueError("HF config has no rope_parameters.mrope_section (is this a Qwen-VL config?)")
    return list(rope["mrope_section"])


def transformer_config(hf_config: Any, layout: QwenLayout, env: ParallelEnv, params_dtype: torch.dtype = torch.float32,
                       backend: str = "local", **overrides: Any) -> TransformerConfig:
    """megatron TransformerConfig for the language model (TP/PP sizes and device defaults from ``env``)."""
    return gpt_transformer_config(hf_config, layout, env, mrope_section(hf_config), params_dtype, backend, **overrides)


class QwenVLModel(VisionLanguageGPT):
    """One pipeline stage of Qwen-VL (``VisionLanguageGPT`` with transformers' Qwen vision tower as ``visual``).

    ``forward(input_ids [b, s], position_ids [3, b, s], attention_mask [b, s] or [b, 1, s, s], pixel_values
    [patches, C*T*P*P], image_grid_thw [images, 3], raw_logits=False)``.
    """

    def build_visual(self, hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
        return vision_class(hf_config.model_type)._from_config(hf_config.vision_config, dtype=dtype)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        return self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw).pooler_output
