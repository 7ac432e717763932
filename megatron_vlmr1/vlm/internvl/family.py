"""The InternVL ``VLMFamily``: transformers-native InternVL (``model_type: internvl``, the ``*-hf`` checkpoints)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from megatron_vlmr1.vlm.base import register_family
from megatron_vlmr1.vlm.gpt_family import GPTFamily
from megatron_vlmr1.vlm.inputs import EncodedPrompt, PromptBatch, TrainingBatch
from megatron_vlmr1.vlm.internvl import processor as inputs
from megatron_vlmr1.vlm.internvl import weights
from megatron_vlmr1.vlm.internvl.model import InternVLModel, InternVLVisual, check_supported, transformer_config
from megatron_vlmr1.vlm.qwen_vl.weights import QwenLayout, make_layout

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin


class InternVLFamily(GPTFamily):
    model_types = ("internvl",)
    end_of_turn = "<|im_end|>"
    vision_placeholders = inputs.PLACEHOLDER_TOKENS
    min_image_side = 28  # one merged 2x2 group of 14-pixel patches, as for Qwen-VL; tiles are resized anyway
    weights = weights
    inputs = inputs
    model_class = InternVLModel
    make_transformer_config = staticmethod(transformer_config)

    def default_box_space(self, model_type: str) -> str:
        """InternVL answers boxes as [x1, y1, x2, y2] on a 0-1000 grid over the original image."""
        return "norm1000"

    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> QwenLayout:
        return make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                           fused_norm=backend == "te")

    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names inside ``visual`` (vision tower + projector), built on the meta device."""
        check_supported(hf_config)
        with torch.device("meta"):
            visual = InternVLVisual(hf_config, torch.float32)
        return list(visual.state_dict().keys())

    def collate_prompts(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                        prompts: Sequence[EncodedPrompt]) -> PromptBatch:
        return inputs.collate_prompts(prompts, self.pad_token_id(processor))

    def training_batch(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                       prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]) -> TrainingBatch:
        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor))

    def transformers_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The language model is a plain Qwen2: one axis of the [3, b, s] positions (all three are equal)."""
        return position_ids[0]


INTERNVL = register_family(InternVLFamily())
