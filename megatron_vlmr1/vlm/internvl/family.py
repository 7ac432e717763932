"""The InternVL ``VLMFamily``: transformers-native InternVL (``model_type: internvl``, the ``*-hf`` checkpoints)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import ModelLayout, VLMFamily, WeightSpec, register_family
from megatron_vlmr1.vlm.gpt_vlm import layer_spec
from megatron_vlmr1.vlm.prefix_attention import with_shared_prefix_attention
from megatron_vlmr1.vlm.inputs import ChatMessage, EncodedPrompt, ImageInput, PromptBatch, TrainingBatch
from megatron_vlmr1.vlm.internvl import processor as inputs
from megatron_vlmr1.vlm.internvl import weights
from megatron_vlmr1.vlm.internvl.model import InternVLModel, InternVLVisual, check_supported, transformer_config
from megatron_vlmr1.vlm.qwen_vl.weights import QwenLayout, make_layout
from megatron_vlmr1.vlm.stages import mark_tensor_parallel_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin


class InternVLFamily(VLMFamily):
    model_types = ("internvl",)
    end_of_turn = "<|im_end|>"
    vision_placeholders = inputs.PLACEHOLDER_TOKENS
    min_image_side = 28  # one merged 2x2 group of 14-pixel patches, as for Qwen-VL; tiles are resized anyway

    def default_box_space(self, model_type: str) -> str:
        """InternVL answers boxes as [x1, y1, x2, y2] on a 0-1000 grid over the original image."""
        return "norm1000"

    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> QwenLayout:
        return make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                           fused_norm=backend == "te")

    def build_model(self, hf_config: PretrainedConfig, env: ParallelEnv, *, params_dtype: torch.dtype = torch.float32,
                    backend: str = "local", num_query_groups: int | None = None,
                    make_vocab_size_divisible_by: int = 128, shared_prefix_attention: bool = False,
                    **config_overrides: object) -> InternVLModel:
        """This stage's model (``perform_initialization=False`` skips the random init when weights follow).

        ``num_query_groups`` as for Qwen-VL: the KV heads by default, repeated up to the TP size when TP exceeds them.
        """
        layout = self.layout(hf_config, env.tp, num_query_groups, make_vocab_size_divisible_by, backend)
        config = transformer_config(hf_config, layout, env, params_dtype, backend, **config_overrides)
        spec = layer_spec(backend)
        if shared_prefix_attention:
            spec = with_shared_prefix_attention(spec)
        model = InternVLModel(hf_config, config, layout, spec, env)
        if not config.perform_initialization:
            mark_tensor_parallel_weights(model)
        return model

    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names inside ``visual`` (vision tower + projector), built on the meta device."""
        check_supported(hf_config)
        with torch.device("meta"):
            visual = InternVLVisual(hf_config, torch.float32)
        return list(visual.state_dict().keys())

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
        return inputs.collate_prompts(prompts, self.pad_token_id(processor))

    def training_batch(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                       prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]) -> TrainingBatch:
        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor))

    def image_token_id(self, processor: ProcessorMixin) -> int:
        return inputs.image_token_id(processor)

    def transformers_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The language model is a plain Qwen2: one axis of the [3, b, s] positions (all three are equal)."""
        return position_ids[0]


INTERNVL = register_family(InternVLFamily())
