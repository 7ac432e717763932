"""The VLM family interface, and the tensor-parallel layout of megatron-core GPT weights that all families share.

One ``VLMFamily`` per model family (Qwen-VL here, InternVL next). Everything model-specific — building the megatron
model for a pipeline stage, the HF <-> megatron weight mapping, chat rendering, image loading and preprocessing,
placeholder and end-of-turn tokens, the layer backend — lives behind it, so nothing outside ``vlm/`` branches on
model names or imports a family module: callers get a family from ``megatron_vlmr1.vlm.families.get_family`` and
use what comes back. This module imports no family (families import it to register themselves).
"""
from __future__ import annotations

import abc
import dataclasses
import os
import re
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
from PIL import Image

from megatron_vlmr1.data.schema import load_image
from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.registry import Registry
from megatron_vlmr1.vlm.inputs import ChatMessage, EncodedPrompt, ImageInput, PromptBatch, TrainingBatch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase, ProcessorMixin

# ---------------------------------------------------------------------------------------------------------------
# Tensor-parallel layout of megatron-core's GPT parameters (local and TE specs name them the same way).
# ---------------------------------------------------------------------------------------------------------------

# Column-parallel (split along dim 0): the output features are sharded.
_COLUMN_PARALLEL = (
    "embedding.word_embeddings.weight", "output_layer.weight",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
)
# Row-parallel (split along dim 1): the input features are sharded; their bias is replicated.
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
# SwiGLU's fc1 is [gate; up] stacked; each TP rank holds [gate_shard; up_shard].
_GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


def tp_partition_dim(mcore_name: str) -> int | None:
    """Dimension a megatron GPT parameter is split along under TP, or None if every rank holds all of it."""
    if mcore_name.endswith(_COLUMN_PARALLEL):
        return 0
    if mcore_name.endswith(_ROW_PARALLEL):
        return 1
    return None


def tp_split(mcore_name: str, full: torch.Tensor, tp_size: int, tp_rank: int, gated_mlp: bool = True) -> torch.Tensor:
    """This TP rank's shard of a full megatron parameter (``full`` is laid out as megatron does at TP=1)."""
    dim = tp_partition_dim(mcore_name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"{mcore_name}: dim {dim} of shape {tuple(full.shape)} does not split into {tp_size} TP ranks")
    if gated_mlp and mcore_name.endswith(_GATED):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_merge(mcore_name: str, shards: list[torch.Tensor], gated_mlp: bool = True) -> torch.Tensor:
    """Inverse of ``tp_split``: the full parameter from the shards of all TP ranks (in rank order)."""
    dim = tp_partition_dim(mcore_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated_mlp and mcore_name.endswith(_GATED):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)], dim=0)
    return torch.cat(shards, dim=dim)


_LAYER_RE = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


def shift_layer_index(name: str, offset: int) -> str:
    """``decoder.layers.3.x`` -> ``decoder.layers.{3+offset}.x`` (local <-> global layer numbering under PP)."""
    match = _LAYER_RE.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def layer_index(name: str) -> int | None:
    match = _LAYER_RE.match(name)
    return None if match is None else int(match.group(2))


# ---------------------------------------------------------------------------------------------------------------
# The family interface.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor and where it lives in the megatron model.

    ``mcore_name`` is the *global* megatron name (language-model layers numbered over the whole model, before PP);
    ``to_mcore`` / ``from_mcore`` are the shape transforms between the HF tensor(s) and the full (TP=1) megatron
    tensor. Several HF tensors may fuse into one megatron tensor (q/k/v -> linear_qkv): then ``hf_names`` lists them
    all, in the order ``to_mcore`` takes them and ``from_mcore`` returns them.
    """

    mcore_name: str
    hf_names: tuple[str, ...]
    to_mcore: Callable[[list[torch.Tensor]], torch.Tensor]
    from_mcore: Callable[[torch.Tensor], list[torch.Tensor]]


class ModelLayout(Protocol):
    """The megatron-side shapes a family derives from the HF config and the TP size (a built model's ``layout``)."""

    num_layers: int
    num_kv_heads: int
    tied: bool

    @property
    def kv_repeat(self) -> int:
        """How often each KV head is repeated to reach the TP size (1: not repeated)."""


class VLMFamily(abc.ABC):
    """Everything model-family specific, behind one typed interface: trainers, engines, evaluation and the
    conversion tool hold a family object and never import a family module.

    The model side builds a pipeline stage's megatron model and maps weights; the input side renders chat messages,
    loads and preprocesses images, and lays prompts and completions out as the model wants them.
    """

    model_types: tuple[str, ...] = ()
    end_of_turn: str = ""  # appended to an SFT target so the policy learns to stop
    vision_placeholders: tuple[str, ...] = ()  # tokens that mark image/video positions; never sampled
    min_image_side: int = 28  # smaller images are upscaled on load (aspect kept)

    # -- the model side --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self, hf_config: PretrainedConfig, env: ParallelEnv, *, params_dtype: torch.dtype = torch.float32,
                    backend: str = "local", num_query_groups: int | None = None,
                    make_vocab_size_divisible_by: int = 128, shared_prefix_attention: bool = False,
                    **config_overrides: object) -> torch.nn.Module:
        """The megatron model for ``env``'s pipeline stage, laid out for its TP size, with defaults for its device.
        ``shared_prefix_attention``: the decoder's core attention is ``vlm.prefix_attention.SharedPrefixAttention``
        (reads shared-prefix layouts; the rest of the ``backend``'s layer spec is kept).

        The model keeps ``env`` as ``parallel_env``: the weight exporter/loader and LoRA read ranks and groups there.
        """

    @abc.abstractmethod
    def weight_specs(self, hf_config: PretrainedConfig, layout: ModelLayout | None = None) -> list[WeightSpec]:
        """Every weight of the model, in a stable order (vision tower, embeddings, layer 0..L-1, final norm, head).

        ``layout`` is the family's description of the megatron shapes (TP-dependent, e.g. repeated KV heads); it is
        the built model's ``layout`` attribute. None means the TP=1 default.
        """

    def checkpoint_name(self, hf_name: str) -> str:
        """A HF tensor name in the checkpoint convention ``WeightSpec.hf_names`` uses (identity by default)."""
        return hf_name

    def transformers_name(self, checkpoint_name: str) -> str:
        """Inverse of ``checkpoint_name``: where a checkpoint tensor lives in the transformers model's state dict
        (the ``hf`` engine's weight sync receives checkpoint names)."""
        return checkpoint_name

    def default_backend(self, device: torch.device, separate_norm: bool = False) -> str:
        """The layer implementation for a run on ``device``: ``te`` (Transformer Engine) when it is importable and
        the run is on CUDA, ``local`` (pure megatron-core) otherwise. ``separate_norm`` (LoRA, whose hooks need each
        linear's own input): ``te_split``, Transformer Engine layers with the norms as modules of their own."""
        if device.type != "cuda":
            return "local"
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            return "local"
        return "te_split" if separate_norm else "te"

    # -- the input side: what trainers and engines call, so they never branch on the model name --------------
    def load_processor(self, hf_dir: str | os.PathLike) -> ProcessorMixin:
        """The HF processor (tokenizer + image processor) saved with the checkpoint."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(hf_dir)

    @abc.abstractmethod
    def render_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage]) -> str:
        """The chat template applied with a generation prompt: one (unexpanded) vision block per image slot."""

    def load_image(self, image: ImageInput) -> Image.Image:
        """RGB image, upscaled to ``min_image_side`` when smaller (the one loader of training, rollout and eval)."""
        return load_image(image, self.min_image_side)

    @abc.abstractmethod
    def encode_prompt(self, processor: ProcessorMixin, messages: Sequence[ChatMessage],
                      images: Sequence[ImageInput]) -> EncodedPrompt:
        """One prompt (chat messages with image slots + images) → model-ready ids and pixels."""

    @abc.abstractmethod
    def collate_prompts(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                        prompts: Sequence[EncodedPrompt]) -> PromptBatch:
        """Left-padded prompts for generation, with the family's position ids."""

    @abc.abstractmethod
    def training_batch(self, processor: ProcessorMixin, hf_config: PretrainedConfig,
                       prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]]) -> TrainingBatch:
        """Right-padded prompt + completion rows with the family's position ids and a completion mask."""

    @abc.abstractmethod
    def image_token_id(self, processor: ProcessorMixin) -> int:
        """The token an image's features replace in the prompt."""

    def transformers_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Batch ``position_ids`` [3, b, s] as the family's transformers model takes them (the ``hf`` engine)."""
        return position_ids

    def pad_token_id(self, processor: ProcessorMixin) -> int:
        return processor.tokenizer.pad_token_id

    def banned_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids of the ``vision_placeholders`` this tokenizer has, sorted: no engine may sample them."""
        vocab = tokenizer.get_vocab()
        return sorted(vocab[token] for token in self.vision_placeholders if token in vocab)

    def default_box_space(self, model_type: str) -> str:
        """The coordinate space this family's ``model_type`` answers boxes in (``rewards.boxes``): 0-1000 unless
        the family says otherwise (Qwen2-VL and InternVL ground in ``norm1000``)."""
        return "norm1000"


def owning_pp_rank(mcore_name: str, num_layers: int, pp_size: int) -> int:
    """Pipeline stage holding a global megatron name: vision + embeddings on the first, head on the last, layers
    split evenly."""
    index = layer_index(mcore_name)
    if index is not None and not mcore_name.startswith("visual."):
        return index // (num_layers // pp_size)
    if mcore_name.endswith(("final_layernorm.weight", "final_layernorm.bias", "output_layer.weight")):
        return pp_size - 1
    return 0


def hf_config_text(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a VLM HF config (``text_config`` in transformers 5, the config itself before)."""
    return getattr(hf_config, "text_config", None) or hf_config


# The family registry. A family module registers its instance at import (``register_family``);
# ``megatron_vlmr1.vlm.families`` imports every family module and looks families up by ``model_type``.
FAMILIES: Registry[VLMFamily] = Registry("model_type", allow_import_paths=False)


def register_family(family: VLMFamily) -> VLMFamily:
    """Register ``family`` under each of its ``model_types`` (a model_type registered twice raises)."""
    for model_type in family.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is already registered")
        FAMILIES.add(model_type, family)
    return family
