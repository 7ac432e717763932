"""Family discovery: imports every family module (each registers itself with ``vlm.base.register_family``) and
finds a family by the ``model_type`` of a HF config or checkpoint directory.

Adding a family is one import line here; nothing else in the package changes. This module is the only one outside
a family's own package that imports it, and no family imports this module back.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from megatron_vlmr1.vlm.internvl import family as _internvl  # noqa: F401  (registers InternVLFamily)
from megatron_vlmr1.vlm.qwen_vl import family as _qwen_vl  # noqa: F401  (registers QwenVLFamily)
from megatron_vlmr1.vlm.base import FAMILIES, VLMFamily

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def model_type_of(hf_config_or_dir: PretrainedConfig | str | os.PathLike) -> str:
    """The ``model_type`` of a HF config object, or of the ``config.json`` in a model directory."""
    if isinstance(hf_config_or_dir, (str, os.PathLike)):
        path = os.path.join(hf_config_or_dir, "config.json")
        if not os.path.exists(path):
            raise ValueError(f"{hf_config_or_dir}: no config.json (not a HF model directory)")
        with open(path) as fh:
            model_type = json.load(fh).get("model_type")
        if model_type is None:
            raise ValueError(f"{path}: no 'model_type' key")
        return model_type
    return hf_config_or_dir.model_type


def get_family(hf_config_or_dir: PretrainedConfig | str | os.PathLike) -> VLMFamily:
    """The family for a HF config object or model directory, looked up by its ``model_type``."""
    model_type = model_type_of(hf_config_or_dir)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; known: {FAMILIES.names()}")
    return FAMILIES.get(model_type)
