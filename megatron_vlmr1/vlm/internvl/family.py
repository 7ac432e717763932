"""The InternVL ``VLMFamily``: transformers-native InternVL (``model_type: internvl``, the ``*-hf`` checkpoints)."""
from __future__ import annotations

from typing import Any

import torch

from megatron_vlmr1.vlm.base import VLMFamily, WeightSpec, register_family
from megatron_vlmr1.vlm.internvl import processor as inputs
from megatron_vlmr1.vlm.internvl import weights
from megatron_vlmr1.vlm.internvl.model import InternVLModel, InternVLVisual, check_supported, transformer_config
from megatron_vlmr1.vlm.qwen_vl.family import layer_spec
from megatron_vlmr1.vlm.qwen_vl.weights import QwenLayout, make_layout


class InternVLFamily(VLMFamily):
    model_types = ("internvl",)
    # InternVL answers boxes as [x1, y1, x2, y2] on a 0-1000 grid over the original image.
    default_box_space = "norm1000"

    def layout(self, hf_config: Any, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> QwenLayout:
        return make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                           fused_norm=backend == "te")

    def build_model(self, hf_config: Any, pre_process: bool = True, post_process: bool = True, *,
                    params_dtype: torch.dtype = torch.float32, backend: str = "local",
                    num_query_groups: int | None = None, make_vocab_size_divisible_by: int = 128,
                    **config_overrides: Any) -> InternVLModel:
        """This stage's model, randomly initialised (load weights with ``export.load_hf_weights``).

        ``num_query_groups`` as for Qwen-VL: the KV heads by default, repeated up to the TP size when TP exceeds them.
        """
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        layout = self.layout(hf_config, tp, num_query_groups, make_vocab_size_divisible_by, backend)
        config = transformer_config(hf_config, layout, params_dtype, **config_overrides)
        return InternVLModel(hf_config, config, layout, layer_spec(backend), pre_process, post_process)

    def vision_weight_names(self, hf_config: Any) -> list[str]:
        """State-dict names inside ``visual`` (vision tower + projector), built on the meta device."""
        check_supported(hf_config)
        with torch.device("meta"):
            visual = InternVLVisual(hf_config, torch.float32)
        return list(visual.state_dict().keys())

    def weight_specs(self, hf_config: Any, layout: QwenLayout | None = None) -> list[WeightSpec]:
        layout = layout or self.layout(hf_config)
        return weights.weight_specs(hf_config, layout, self.vision_weight_names(hf_config))

    def checkpoint_name(self, hf_name: str) -> str:
        return weights.to_checkpoint_name(hf_name)

    def transformers_name(self, hf_name: str) -> str:
        """Checkpoint name -> transformers-5 in-memory name (for loading exported weights into the HF model)."""
        return weights.to_transformers_name(hf_name)

    def load_processor(self, hf_dir: Any) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(hf_dir)

    def encode_prompt(self, processor: Any, messages: Any, images: Any) -> inputs.EncodedPrompt:
        return inputs.encode_prompt(processor, messages, images)

    def collate_prompts(self, processor: Any, prompts: Any) -> inputs.PromptBatch:
        """Left-padded generation batch (1-D positions) for the transformers engine."""
        return inputs.collate_prompts(prompts, self.pad_token_id(processor))

    def training_batch(self, processor: Any, hf_config: Any, prompts: Any, completions: Any) -> inputs.TrainingBatch:
        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor))

    def placeholder_token_ids(self, processor: Any) -> list[int]:
        """Tokens no engine may sample: ``<IMG_CONTEXT>``, ``<img>``, ``</img>``, ``<video>``."""
        return inputs.placeholder_token_ids(processor)


INTERNVL = register_family(InternVLFamily())
