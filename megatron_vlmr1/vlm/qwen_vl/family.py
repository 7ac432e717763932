"""The Qwen-VL ``VLMFamily``: Qwen2-VL and Qwen2.5-VL (same language model, different vision towers)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import ModelLayout, VLMFamily, WeightSpec, register_family
from megatron_vlmr1.vlm.gpt_vlm import layer_spec
from megatron_vlmr1.vlm.prefix_attention import with_shared_prefix_attention
from megatron_vlmr1.vlm.inputs import ChatMessage, EncodedPrompt, ImageInput, PromptBatch, TrainingBatch
from megatron_vlmr1.vlm.qwen_vl import processor as inputs
from megatron_vlmr1.vlm.qwen_vl import weights
from megatron_vlmr1.vlm.qwen_vl.model import QwenVLModel, transformer_config, vision_class
from megatron_vlmr1.vlm.stages import mark_tensor_parallel_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin


class QwenVLFamily(VLMFamily):
    model_types = ("qwen2_5_vl", "qwen2_vl")
    end_of_turn = "<|im_end|>"
    vision_placeholders = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    min_image_side = 28  # one merged 2x2 group of 14-pixel patches

    def default_box_space(self, model_type: str) -> str:
        """Qwen2.5-VL grounds in pixels of the resized image it was fed; Qwen2-VL in 0-1000 coordinates."""
        return "resized" if model_type == "qwen2_5_vl" else "norm1000"

    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> weights.QwenLayout:
        return weights.make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                                   fused_norm=backend == "te")

    def build_model(self, hf_config: PretrainedConfig, env: ParallelEnv, *, params_dtype: torch.dtype = torch.float32,
                    backend: str = "local", num_query_groups: int | None = None,
                    make_vocab_size_divisible_by: int = 128, shared_prefix_attention: bool = False,
                    **config_overrides: object) -> QwenVLModel:
        """This stage's model (``perform_initialization=False`` skips the random init when weights follow).

        ``num_query_groups`` defaults to the KV heads, repeated up to the TP size when TP exceeds them; pass it
        explicitly to build a model that matches a checkpoint written at a larger TP.
        """
        layout = self.layout(hf_config, env.tp, num_query_groups, make_vocab_size_divisible_by, backend)
        config = transformer_config(hf_config, layout, env, params_dtype, backend, **config_overrides)
        spec = layer_spec(backend)
        if shared_prefix_attention:
            spec = with_shared_prefix_attention(spec)
        model = QwenVLModel(hf_config, config, layout, spec, env)
        if not config.perform_initialization:
            mark_tensor_parallel_weights(model)
        return model

    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names of the vision tower (built on the meta device: no memory, no init)."""
        with torch.device("meta"):
            tower = vision_class(hf_config.model_type)._from_config(hf_config.vision_config)
        return list(tower.state_dict().keys())

    def weight_specs(self, hf_config: PretrainedConfig, layout: ModelLayout | None = None) -> list[WeightSpec]:
        layout = layout or self.layout(hf_config)
        return weights.weight_specs(hf_config, layout, self.vision_weight_names(hf_config))

    def checkpoint_name(self, hf_name: str) -> str:
        return weights.to_checkpoint_name(hf_name)

    def transformers_name(self, checkpoint_name: str) -> str:
        return weights.to_transformers_name(checkpoint_name)

    def render_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage]) -> str:
        return inputs.render_prompt(processor, messages)

    def encode_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage],
                      images: Sequence[ImageInput]) -> EncodedPrompt:
        return inputs.encode_prompt(processor, messages, images, open_image=self.load_image)

    def collate_prompts(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                        prompts: Sequence[EncodedPrompt]) -> PromptBatch:
        return inputs.collate_prompts(prompts, self.pad_token_id(processor), self.image_token_id(processor),
                                      hf_config.vision_config.spatial_merge_size)

    def training_batch(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                       prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]) -> TrainingBatch:
        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor),
                                           self.image_token_id(processor),
                                           hf_config.vision_config.spatial_merge_size)

    def image_token_id(self, processor: ProcessorMixin) -> int:
        return inputs.image_token_id(processor)


QWEN_VL = register_family(QwenVLFamily())
