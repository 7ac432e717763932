"""What the families built on ``VisionLanguageGPT`` share: the ``VLMFamily`` methods that only hand over to the
family's own weights module (weight specs, checkpoint / transformers names) and inputs module (prompt encoding, the
image token).

A family names those two modules (``weights``, ``inputs``) and keeps only what really differs: its layout, model,
vision weight names and batch layout (position ids). Imports no family module.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Sequence

from PIL import Image

from megatron_vlmr1.vlm.base import ModelLayout, VLMFamily, WeightSpec
from megatron_vlmr1.vlm.inputs import ChatMessage, EncodedPrompt, ImageInput

if TYPE_CHECKING:
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

    @abc.abstractmethod
    def layout(self, hf_config: PretrainedConfig, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> ModelLayout:
        """The megatron-side shapes for ``tp_size`` (what a built model keeps as ``layout``)."""

    @abc.abstractmethod
    def vision_weight_names(self, hf_config: PretrainedConfig) -> list[str]:
        """State-dict names inside the model's ``visual`` module, in export order."""

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
