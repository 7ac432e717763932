"""A vision tower in front of megatron-core's ``GPTModel``: the model plumbing every family shares.

Qwen-VL and InternVL differ only in their vision side (which tower, how pixels become features, how positions are
laid out); the language model is the same megatron ``GPTModel`` with multimodal RoPE, TP/PP, a padded vocabulary,
a [b, s] padding mask, a ready [b, 1, s, s] mask or a shared-prefix layout, and the trainer's ``raw_logits`` output.
A family's model subclasses ``VisionLanguageGPT`` and supplies ``build_visual``, ``image_features`` and (if its
positions are not megatron's [3, b, s]) ``rope_position_ids``.
"""
from __future__ import annotations

import abc
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.vlm.base import ModelLayout, hf_config_text
from megatron_vlmr1.vlm.prefix_attention import SharedPrefixAttention

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec


def layer_spec(backend: str) -> ModuleSpec:
    """megatron layer spec: ``local`` (pure megatron-core, runs on CPU), ``te`` (Transformer Engine, CUDA) or
    ``te_split`` (Transformer Engine with norms apart from the linears, for LoRA: ``vlm.layer_specs``)."""
    if backend == "te_split":
        from megatron_vlmr1.vlm.layer_specs import te_split_norm_layer_spec

        return te_split_norm_layer_spec()
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if backend == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")
    raise ValueError(f"model backend {backend!r}: expected 'local', 'te' or 'te_split'")


def rope_theta(hf_config: Any) -> float:
    text = hf_config_text(hf_config)
    rope = getattr(text, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))


def megatron_softmax_kernel_installed() -> bool:
    """megatron's fused masked-softmax kernel is a separately built module (``scaled_masked_softmax_cuda``, from
    megatron's or apex's build); megatron imports it unconditionally once a shape qualifies, so the fusion may only
    be switched on where it is importable (seen missing on a GPU machine: the first bf16 attention call crashed)."""
    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def device_defaults(device: torch.device, backend: str) -> dict[str, bool]:
    """TransformerConfig switches that depend on where the model runs.

    On CUDA: weights are created on the GPU (no host copy), and megatron's fusions are on: bias + SwiGLU, masked
    softmax (only where its kernel module is installed: ``megatron_softmax_kernel_installed``), RoPE (Transformer
    Engine's kernel; megatron falls back to the unfused path for mRoPE with batch > 1) and gradient-accumulation
    fusion (Transformer Engine's linears). On CPU they are all off: the fused kernels are CUDA-only.
    """
    cuda = device.type == "cuda"
    te = cuda and backend in ("te", "te_split")
    return dict(use_cpu_initialization=not cuda, bias_activation_fusion=cuda,
                masked_softmax_fusion=cuda and megatron_softmax_kernel_installed(),
                apply_rope_fusion=te, gradient_accumulation_fusion=te, persist_layer_norm=False)


def transformer_config(hf_config: Any, layout: Any, env: ParallelEnv, rope_sections: list[int],
                       params_dtype: torch.dtype = torch.float32, backend: str = "local",
                       **overrides: Any) -> TransformerConfig:
    """megatron TransformerConfig of a Qwen2-style language model (SwiGLU, RMSNorm, QKV bias, GQA), with
    ``rope_sections`` as megatron's ``mrope_section``; TP/PP sizes and device defaults come from ``env``."""
    text = hf_config_text(hf_config)
    if text.hidden_act != "silu":
        raise ValueError(f"hidden_act={text.hidden_act!r}: only SwiGLU (silu) language models are supported")
    tp, pp = env.tp, env.pp
    if layout.num_layers % pp:
        raise ValueError(f"num_hidden_layers={layout.num_layers} is not divisible by PP size {pp}")
    kwargs = dict(
        num_layers=layout.num_layers, hidden_size=layout.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=layout.num_heads, num_query_groups=layout.num_query_groups, kv_channels=layout.head_dim,
        normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, mrope_section=list(rope_sections),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype if pp > 1 else None, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        **device_defaults(env.device, backend),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] (1 = real token) -> megatron's [b, 1, s, s] bool mask (True = masked): causal and no padded keys.

    A padded query row masks everything; its output is garbage but finite and never read (callers mask padding).
    """
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]
    return ~allowed[:, None, :, :]


class _LanguageModel(GPTModel):
    """megatron-core's ``GPTModel``, able to hand back its LM head's output as it is.

    ``GPTModel`` returns ``logits.transpose(0, 1).contiguous()`` ([b, s, V/TP], a full-vocabulary copy, and two more
    in backward) unless ``labels`` are given, in which case it calls ``compute_language_model_loss(labels, logits)``
    with the output layer's [s, b, V/TP] tensor. The loss here is computed by the caller (the fused log-prob kernel
    reads megatron's layout directly), so that hook returns the logits untouched; ``labels`` only selects the path.
    """

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits


class VisionLanguageGPT(MegatronModule, abc.ABC):
    """One pipeline stage of a VLM: [vision side + embeddings] -> decoder layers -> [final norm + LM head].

    ``forward(input_ids [b, s], position_ids, attention_mask [b, s], pixel_values, image_grid_thw)``
    (``attention_mask`` may also be a ready [b, 1, s, s] bool mask, True = masked; shared-prefix packed rows pass
    ``prefix_layout`` instead, see ``vlm/prefix_attention.py``)
    returns, on the last stage, logits [b, s, vocab_shard] where vocab_shard = padded_vocab / TP; columns beyond the
    real vocabulary are -inf (at TP=1 they are sliced off instead, so the shape is exactly [b, s, vocab]). With
    ``raw_logits=True`` the last stage returns the LM head's output as it is: [s, b, vocab_shard], padded columns
    included (a loss must skip ids >= ``vocab_size``, as ``fused_logprob(..., vocab_end=model.vocab_size,
    seq_first=True)`` does) — no copy of vocabulary size is made. Other stages return hidden states [s, b, h] as
    ``GPTModel`` does, and take their input through ``set_input_tensor``. The image features replace the word
    embeddings at the ``image_token_id`` positions in row-major (batch, sequence) order.
    """

    def __init__(self, hf_config: Any, config: TransformerConfig, layout: ModelLayout, transformer_layer_spec: Any,
                 env: ParallelEnv) -> None:
        super().__init__(config=config)
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise ValueError(f"{type(self).__name__}: sequence_parallel and context_parallel_size > 1 are not "
                             "supported yet (the image embeddings enter as a full [s, b, h] decoder_input)")
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.hf_config = hf_config
        self.layout = layout
        self.parallel_env = env
        self.pre_process = pre_process = env.is_first_stage
        self.post_process = post_process = env.is_last_stage
        self.image_token_id = hf_config.image_token_id
        if pre_process:
            self.visual = self.build_visual(hf_config, config.params_dtype)
        self.vocab_size = layout.vocab_size
        self.language_model = _LanguageModel(
            config=config, transformer_layer_spec=transformer_layer_spec, vocab_size=layout.padded_vocab_size,
            max_sequence_length=hf_config_text(hf_config).max_position_embeddings, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=layout.tied,
            position_embedding_type="mrope", rotary_base=rope_theta(hf_config), parallel_output=True,
        )
        self.share_embeddings_and_output_weights = layout.tied

    @abc.abstractmethod
    def build_visual(self, hf_config: Any, dtype: torch.dtype) -> torch.nn.Module:
        """The vision side held as ``visual`` on the first stage (its state-dict names are the family's)."""

    @abc.abstractmethod
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """[image tokens of the batch, hidden]: one row per ``image_token_id`` position, in row-major order."""

    def rope_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The family's positions as megatron's multimodal RoPE wants them: [3, b, s]."""
        return position_ids

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings with image features scattered into the image-token positions: [s, b, h]."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        image_mask = input_ids == self.image_token_id  # [b, s]; features are in row-major (batch, seq) order
        if pixel_values is None:
            if bool(image_mask.any()):
                raise ValueError(f"{int(image_mask.sum())} image tokens in input_ids but no pixel_values")
            return embeddings
        image_embeds = self.image_features(pixel_values, image_grid_thw)
        if int(image_mask.sum()) != image_embeds.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens in input_ids but the images give "
                             f"{image_embeds.shape[0]} features (the prompt and the images disagree)")
        embeddings = embeddings.transpose(0, 1).masked_scatter(image_mask[..., None], image_embeds.to(embeddings.dtype))
        return embeddings.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                raw_logits: bool = False, prefix_layout: torch.Tensor | None = None) -> torch.Tensor:
        """``prefix_layout`` [b, 1 + S] (shared-prefix packed rows, ``trainer.packing.prefix_layout``) replaces
        ``attention_mask``; it needs a model built with ``shared_prefix_attention``."""
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        if prefix_layout is not None:
            if not self.uses_shared_prefix_attention():
                raise ValueError("a shared-prefix layout needs a model built with shared_prefix_attention=True "
                                 "(its core attention reads the layout)")
            attention_mask = prefix_layout
        elif attention_mask.dim() == 2:
            attention_mask = padding_attention_mask(attention_mask)
        elif self.config_uses_fused_attention():
            raise ValueError("a [b, 1, s, s] block mask needs the 'local' backend or shared_prefix_attention: "
                             "Transformer Engine's fused attention takes its mask type from the layer spec")
        output = self.language_model(input_ids=input_ids, position_ids=self.rope_position_ids(position_ids),
                                     attention_mask=attention_mask, decoder_input=decoder_input,
                                     labels=input_ids if raw_logits else None)
        if not self.post_process or raw_logits:
            return output
        return self.mask_padded_vocab(output)

    def _core_attention(self) -> torch.nn.Module | None:
        layers = getattr(getattr(self.language_model, "decoder", None), "layers", None)
        return getattr(layers[0].self_attention, "core_attention", None) if layers else None

    def config_uses_fused_attention(self) -> bool:
        """Whether the decoder's core attention is Transformer Engine's (it ignores an explicit block mask)."""
        return type(self._core_attention()).__name__.startswith("TE")

    def uses_shared_prefix_attention(self) -> bool:
        """Whether the decoder's core attention reads shared-prefix layouts (``vlm.prefix_attention``)."""
        return isinstance(self._core_attention(), SharedPrefixAttention)

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded vocabulary columns must not take part in any softmax: slice (TP=1) or -inf in place (TP>1).

        Which columns are padding follows from the shapes alone (no host sync). The in-place fill is safe for
        autograd: ``logits`` is GPTModel's fresh [b, s, V/TP] copy, which nothing has saved.
        """
        if self.parallel_env.tp == 1:
            return logits[..., :self.vocab_size]
        shard = logits.shape[-1]
        start = self.parallel_env.tp_rank * shard
        first_padded = min(shard, max(0, self.vocab_size - start))
        if first_padded < shard:
            logits[..., first_padded:] = float("-inf")
        return logits
