"""The Qwen-VL ``VLMFamily``: Qwen2-VL and Qwen2.5-VL (same language model, different vision towers)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from megatron_vlmr1.vlm.base import register_family
from megatron_vlmr1.vlm.gpt_family import GPTFamily
from megatron_vlmr1.vlm.inputs import EncodedPrompt, PromptBatch, TrainingBatch
from megatron_vlmr1.vlm.qwen_vl import processor as inputs
from megatron_vlmr1.vlm.qwen_vl import weights
from megatron_vlmr1.vlm.qwen_vl.model import QwenVLModel, transformer_config, vision_class

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin


class QwenVLFamily(GPTFamily):
    model_types = ("qwen2_5_vl", "qwen2_vl")
    end_of_turn = "<|im_end|>"
    vision_placeholders = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    min_image_side = 28  # one merged 2x2 group of 14-pixel patches
    weights = weights
    inputs = inputs
    model_class = QwenVLModel
    make_transformer_config = staticmethod(transformer_config)

    def default_box_space(self, model_type: str) -> str:
        """Qwen2.5-VL grounds in pixels of the resized image it was fed; Qwen2-VL in 0-1000 coordinates."""
        return "resized" if model_type == "qwen2_5_vl" else "norm1000"

    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> weights.QwenLayout:
        return weights.make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                                   fused_norm=backend == "te")

    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names of the vision tower (built on the meta device: no memory, no init)."""
        with torch.device("meta"):
            tower = vision_class(hf_config.model_type)._from_config(hf_config.vision_config)
        return list(tower.state_dict().keys())

    def collate_prompts(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                        prompts: Sequence[EncodedPrompt]) -> PromptBatch:
        return inputs.collate_prompts(prompts, self.pad_token_id(processor), self.image_token_id(processor),
                                      hf_config.vision_config.spatial_merge_size)

    def training_batch(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                       prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]) -> TrainingBatch:
        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor),
                                           self.image_token_id(processor),
                                           hf_config.vision_config.spatial_merge_size)


QWEN_VL = register_family(QwenVLFamily())
