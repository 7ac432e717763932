"""InternVL on megatron-core: InternViT + pixel-shuffle MLP projector (transformers' modules) + a megatron ``GPTModel``.

The vision side is transformers' own ``InternVLVisionModel`` and ``InternVLMultiModalProjector``, replicated on every
TP rank of the first pipeline stage as Qwen-VL's tower is (InternViT-300M is small next to the language model). Each
448x448 tile (112x112 in the tiny models) becomes ``(tile / patch)**2 * downsample_ratio**2`` embeddings that replace
the word embeddings at the ``<IMG_CONTEXT>`` positions.

The language model is a Qwen2 (InternVL3) on megatron-core, configured as Qwen-VL's language model. Its RoPE is 1-D,
but megatron's plain ``rope`` ignores ``position_ids`` (it always rotates by column index), which is wrong for a
left-padded row. So it runs through megatron's multimodal RoPE with a single section covering every frequency and
the 1-D positions repeated on its three axes: ``MultimodalRotaryEmbedding`` then computes exactly
``position * inv_freq`` per row, i.e. standard RoPE at the given positions.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import hf_config_text
from megatron_vlmr1.vlm.gpt_vlm import VisionLanguageGPT
from megatron_vlmr1.vlm.gpt_vlm import transformer_config as gpt_transformer_config
from megatron_vlmr1.vlm.qwen_vl.weights import QwenLayout

SUPPORTED_TEXT_MODELS = ("qwen2",)


def check_supported(hf_config: Any) -> None:
    """ValueError for InternVL variants this family cannot build yet (text model, feature selection)."""
    text_type = hf_config_text(hf_config).model_type
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"InternVL text_config.model_type={text_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_TEXT_MODELS)} (InternVL3 / InternVL2.5 with Qwen2.5 language models)")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={hf_config.vision_feature_layer!r}: only a single layer is supported")
    if hf_config.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}: expected "
                         "'default' or 'full'")


def one_d_rope_section(layout: QwenLayout) -> list[int]:
    """One multimodal-RoPE section holding all ``head_dim / 2`` frequencies: plain 1-D RoPE (see module docstring)."""
    return [layout.head_dim // 2]


def transformer_config(hf_config: Any, layout: QwenLayout, env: ParallelEnv, params_dtype: torch.dtype = torch.float32,
                       backend: str = "local", **overrides: Any) -> TransformerConfig:
    """megatron TransformerConfig of the Qwen2 language model (as Qwen-VL's, with 1-D RoPE; sizes from ``env``)."""
    check_supported(hf_config)
    return gpt_transformer_config(hf_config, layout, env, one_d_rope_section(layout), params_dtype, backend,
                                  **overrides)


def pixel_shuffle(features: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """InternVL's space-to-depth: [n, w, h, c] -> [n, w*s, h*s, c/s**2] (s = 0.5 merges 2x2 patches into one).

    The same reshapes and transposes as transformers' ``InternVLModel.pixel_shuffle`` (and the original
    InternVL), so the channel order of each merged token matches the projector's trained weights.
    """
    n, width, height, channels = features.shape
    if height * scale_factor % 1 or width * scale_factor % 1:
        raise ValueError(f"pixel_shuffle: a {width}x{height} patch grid does not downsample by {scale_factor}")
    features = features.reshape(n, width, int(height * scale_factor), int(channels / scale_factor))
    features = features.permute(0, 2, 1, 3).contiguous()
    features = features.reshape(n, int(height * scale_factor), int(width * scale_factor),
                                int(channels / scale_factor**2))
    return features.permute(0, 2, 1, 3).contiguous()


class InternVLVisual(torch.nn.Module):
    """InternViT + pixel shuffle + MLP projector: tiles [n, 3, H, W] -> image embeddings [n * tokens, hidden]."""

    def __init__(self, hf_config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

        self.vision_tower = InternVLVisionModel._from_config(hf_config.vision_config, dtype=dtype)
        self.multi_modal_projector = InternVLMultiModalProjector(hf_config).to(dtype)
        self.downsample_ratio = float(hf_config.downsample_ratio)
        self.feature_layer = int(hf_config.vision_feature_layer)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.feature_layer != -1
        outputs = self.vision_tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=hidden,
                                    return_dict=True)
        features = outputs.hidden_states[self.feature_layer] if hidden else outputs.last_hidden_state
        if self.drop_cls:
            features = features[:, 1:, :]
        tiles, patches, channels = features.shape
        side = int(patches**0.5)
        if side * side != patches:
            raise ValueError(f"InternViT gave {patches} patch features per tile; tiles must be square")
        features = pixel_shuffle(features.reshape(tiles, side, side, channels), self.downsample_ratio)
        return self.multi_modal_projector(features.reshape(tiles, -1, features.shape[-1])).flatten(0, 1)


class InternVLModel(VisionLanguageGPT):
    """One pipeline stage of InternVL (``VisionLanguageGPT`` with InternViT + projector as ``visual``).

    ``forward(input_ids [b, s], position_ids [b, s] or [3, b, s] (1-D), attention_mask [b, s] or [b, 1, s, s],
    pixel_values [tiles, 3, H, W], image_grid_thw=None, raw_logits=False)``. Tiles of all images of all rows come in
    row order, then image order, then tile order (as the processor emits them).
    """

    def __init__(self, hf_config: Any, config: TransformerConfig, layout: QwenLayout, transformer_layer_spec: Any,
                 env: ParallelEnv) -> None:
        check_supported(hf_config)
        super().__init__(hf_config, config, layout, transformer_layer_spec, env)

    def build_visual(self, hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
        return InternVLVisual(hf_config, dtype)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """``image_grid_thw`` is Qwen-VL's and must be None here (the signature is the one the trainer calls)."""
        if image_grid_thw is not None:
            raise ValueError("InternVL takes no image_grid_thw (its tiles are fixed-size); got one")
        return self.visual(pixel_values)

    def rope_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """1-D positions, [b, s] (transformers' layout) or [3, b, s] with equal axes (the batches' layout), on the
        three multimodal-RoPE axes (one section: plain RoPE)."""
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"InternVL position_ids must be [b, s] or [3, b, s]; got {tuple(position_ids.shape)}")
        return position_ids
