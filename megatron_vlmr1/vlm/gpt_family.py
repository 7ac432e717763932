"""What the families built on ``VisionLanguageGPT`` share: the ``VLMFamily`` methods that only hand over to the
family's own weights module (weight specs, checkpoint / transformers names) and inputs module (prompt encoding, the
image token), and building a stage's model from the family's model class and transformer config.

A family names those modules and functions (``weights``, ``inputs``, ``model_class``, ``make_transformer_config``)
and keeps only what really differs: its layout, vision weight names and batch layout (position ids). Imports no
family module.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

import torch
from PIL import Image

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import ModelLayout, VLMFamily, WeightSpec
from megatron_vlmr1.vlm.gpt_vlm import VisionLanguageGPT, layer_spec
from megatron_vlmr1.vlm.inputs import ChatMessage, EncodedPrompt, ImageInput
from megatron_vlmr1.vlm.prefix_attention import with_shared_prefix_attention
from megatron_vlmr1.vlm.stages import mark_tensor_parallel_weights

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig
    from transformers import PretrainedConfig, ProcessorMixin


class FamilyWeights(Protocol):
    """A family's weights module: its HF <-> megatron weight specs and HF name conventions."""

    def weight_specs(self, hf_config: PretrainedConfig, layout: ModelLayout,
                     vision_names: list[str]) -> list[WeightSpec]: ...

    def to_checkpoint_name(self, name: str) -> str: ...

    def to_transformers_name(self, name: str) -> str: ...


class FamilyInputs(Protocol):
    """A family's inputs module: how one prompt is encoded and which token its images' features replace."""

    def encode_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage], images: Sequence[ImageInput],
                      open_image: Callable[[ImageInput], Image.Image]) -> EncodedPrompt: ...

    def image_token_id(self, processor: ProcessorMixin) -> int: ...


class GPTFamily(VLMFamily):
    """A ``VLMFamily`` whose weight mapping and prompt encoding live in its ``weights`` and ``inputs`` modules."""

    weights: ClassVar[FamilyWeights]
    inputs: ClassVar[FamilyInputs]
    model_class: ClassVar[type[VisionLanguageGPT]]
    # the family's ``transformer_config(hf_config, layout, env, params_dtype, backend, **overrides)``
    make_transformer_config: ClassVar[Callable[..., TransformerConfig]]

    @abc.abstractmethod
    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> ModelLayout:
        """The megatron-side shapes for ``tp_size`` (what a built model keeps as ``layout``)."""

    @abc.abstractmethod
    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names inside the model's ``visual`` module, in export order."""

    def build_model(self, hf_config: PretrainedConfig, env: ParallelEnv, *, params_dtype: torch.dtype = torch.float32,
                    backend: str = "local", num_query_groups: int | None = None,
                    make_vocab_size_divisible_by: int = 128, shared_prefix_attention: bool = False,
                    **config_overrides: Any) -> VisionLanguageGPT:
        """This stage's model (``perform_initialization=False`` skips the random init when weights follow).

        ``num_query_groups`` defaults to the KV heads, repeated up to the TP size when TP exceeds them; pass it
        explicitly to build a model that matches a checkpoint written at a larger TP.
        """
        layout = self.layout(hf_config, env.tp, num_query_groups, make_vocab_size_divisible_by, backend)
        config = self.make_transformer_config(hf_config, layout, env, params_dtype, backend, **config_overrides)
        spec = layer_spec(backend)
        if shared_prefix_attention:
            spec = with_shared_prefix_attention(spec)
        model = self.model_class(hf_config, config, layout, spec, env)
        if not config.perform_initialization:
            mark_tensor_parallel_weights(model)
        return model

    def weight_specs(self, hf_config: PretrainedConfig, layout: ModelLayout | None = None) -> list[WeightSpec]:
        layout = layout or self.layout(hf_config)
        return self.weights.weight_specs(hf_config, layout, self.vision_weight_names(hf_config))

    def checkpoint_name(self, hf_name: str) -> str:
        return self.weights.to_checkpoint_name(hf_name)

    def transformers_name(self, checkpoint_name: str) -> str:
        return self.weights.to_transformers_name(checkpoint_name)

    def encode_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage],
                      images: Sequence[ImageInput]) -> EncodedPrompt:
        return self.inputs.encode_prompt(processor, messages, images, open_image=self.load_image)

    def image_token_id(self, processor: ProcessorMixin) -> int:
        return self.inputs.image_token_id(processor)
