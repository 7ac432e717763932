"""The Qwen-VL ``VLMFamily``: Qwen2-VL and Qwen2.5-VL (same language model, different vision towers)."""
from __future__ import annotations

from typing import Any

import torch

from megatron_vlmr1.vlm.base import VLMFamily, WeightSpec, register_family
from megatron_vlmr1.vlm.qwen_vl import weights
from megatron_vlmr1.vlm.qwen_vl.model import QwenVLModel, transformer_config, vision_class


def layer_spec(backend: str) -> Any:
    """megatron layer spec: ``local`` (pure megatron-core, runs on CPU) or ``te`` (Transformer Engine, CUDA)."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if backend == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")
    raise ValueError(f"model backend {backend!r}: expected 'local' or 'te'")


def default_backend(device: str | torch.device) -> str:
    """TE when it is importable and the run is on CUDA, local otherwise."""
    if torch.device(device).type != "cuda":
        return "local"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return "local"
    return "te"


class QwenVLFamily(VLMFamily):
    model_types = ("qwen2_5_vl", "qwen2_vl")

    def default_box_space(self, model_type: str) -> str:
        """Qwen2.5-VL grounds in pixels of the resized image it was fed; Qwen2-VL in 0-1000 coordinates."""
        return "resized" if model_type == "qwen2_5_vl" else "norm1000"

    def layout(self, hf_config: Any, tp_size: int = 1, num_query_groups: int | None = None,
               make_vocab_size_divisible_by: int = 128, backend: str = "local") -> weights.QwenLayout:
        return weights.make_layout(hf_config, tp_size, num_query_groups, make_vocab_size_divisible_by,
                                   fused_norm=backend == "te")

    def build_model(self, hf_config: Any, pre_process: bool = True, post_process: bool = True, *,
                    params_dtype: torch.dtype = torch.float32, backend: str = "local",
                    num_query_groups: int | None = None, make_vocab_size_divisible_by: int = 128,
                    **config_overrides: Any) -> QwenVLModel:
        """This stage's model, randomly initialised (load weights with ``export.load_hf_weights``).

        ``num_query_groups`` defaults to the KV heads, repeated up to the TP size when TP exceeds them; pass it
        explicitly to build a model that matches a checkpoint written at a larger TP.
        """
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        layout = self.layout(hf_config, tp, num_query_groups, make_vocab_size_divisible_by, backend)
        config = transformer_config(hf_config, layout, params_dtype, **config_overrides)
        return QwenVLModel(hf_config, config, layout, layer_spec(backend), pre_process, post_process)

    def vision_weight_names(self, hf_config: Any) -> list[str]:
        """State-dict names of the vision tower (built on the meta device: no memory, no init)."""
        with torch.device("meta"):
            tower = vision_class(hf_config.model_type)._from_config(hf_config.vision_config)
        return list(tower.state_dict().keys())

    def weight_specs(self, hf_config: Any, layout: weights.QwenLayout | None = None) -> list[WeightSpec]:
        layout = layout or self.layout(hf_config)
        return weights.weight_specs(hf_config, layout, self.vision_weight_names(hf_config))

    def checkpoint_name(self, hf_name: str) -> str:
        return weights.to_checkpoint_name(hf_name)

    def load_processor(self, hf_dir: Any) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(hf_dir)

    def encode_prompt(self, processor: Any, messages: Any, images: Any) -> Any:
        from megatron_vlmr1.vlm.qwen_vl import processor as inputs

        return inputs.encode_prompt(processor, messages, images)

    def training_batch(self, processor: Any, hf_config: Any, prompts: Any, completions: Any) -> Any:
        from megatron_vlmr1.vlm.qwen_vl import processor as inputs

        return inputs.build_training_batch(prompts, completions, self.pad_token_id(processor),
                                           inputs.image_token_id(processor),
                                           hf_config.vision_config.spatial_merge_size)


QWEN_VL = register_family(QwenVLFamily())
