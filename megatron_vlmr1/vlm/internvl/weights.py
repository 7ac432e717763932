"""HF <-> megatron weight mapping for InternVL (transformers-native ``InternVLForConditionalGeneration``).

HF names are the checkpoint names of the ``OpenGVLab/InternVL3-*-hf`` checkpoints (and of ``save_pretrained``):
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.{embed_tokens,layers.{i},norm}.*``,
``language_model.lm_head.weight``. transformers 5 holds them in memory as ``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*`` and ``lm_head.weight``; ``to_checkpoint_name`` and
``to_transformers_name`` convert.

Megatron names are those of ``InternVLModel``: ``visual.vision_tower.*`` and ``visual.multi_modal_projector.*``
(transformers' own modules, kept as they are) and the Qwen2 language model on megatron-core, laid out exactly as
Qwen-VL's (``language_model.embedding...``, ``language_model.decoder.layers.{i}...``): the same fused q/k/v, repeated
KV heads, padded vocabulary and gated MLP as ``qwen_vl.weights``, whose layer specs are reused with InternVL's HF
prefix.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_vlmr1.vlm.base import WeightSpec
from megatron_vlmr1.vlm.qwen_vl import weights as gpt_weights

LANGUAGE_PREFIX = "language_model.model."
HEAD_NAME = "language_model.lm_head.weight"


def _single(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _as_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


def _language_names(spec: WeightSpec) -> WeightSpec:
    """Qwen-VL's language-model spec (HF ``model.*`` / ``lm_head.weight``) with InternVL's HF names."""
    renamed = tuple(HEAD_NAME if name == "lm_head.weight" else LANGUAGE_PREFIX + name[len("model."):]
                    for name in spec.hf_names)
    return dataclasses.replace(spec, hf_names=renamed)


def weight_specs(hf_config: Any, layout: gpt_weights.QwenLayout, vision_names: list[str]) -> list[WeightSpec]:
    """Every weight, in export order: vision tower + projector, embeddings, layers 0..L-1, final norm, LM head.

    ``vision_names`` are the names inside ``visual`` (``vision_tower.*``, ``multi_modal_projector.*``), which are
    also their HF checkpoint names.
    """
    visual = [WeightSpec(f"visual.{name}", (name,), _single, _as_list) for name in vision_names]
    language = gpt_weights.weight_specs(hf_config, layout, vision_names=[])
    return visual + [_language_names(spec) for spec in language]


def to_checkpoint_name(name: str) -> str:
    """transformers-5 in-memory name -> checkpoint name; checkpoint names are returned unchanged."""
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return LANGUAGE_PREFIX + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return HEAD_NAME
    return name


def to_transformers_name(name: str) -> str:
    """Checkpoint name -> the name in a transformers-5 ``InternVLForConditionalGeneration.state_dict()``."""
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + name
    if name.startswith(LANGUAGE_PREFIX):
        return "model.language_model." + name[len(LANGUAGE_PREFIX):]
    if name == HEAD_NAME:
        return "lm_head.weight"
    return name
