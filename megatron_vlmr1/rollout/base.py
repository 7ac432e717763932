"""The rollout-engine interface shared by the transformers and vLLM engines.

An engine turns prompts (chat messages + images) into G sampled completions each, and takes new weights in place
between GRPO steps. An engine holds the model's family (``vlm.base.VLMFamily``) and encodes each prompt once with
``family.encode_prompt``; its result carries that ``EncodedPrompt`` (ids, pixel values, image geometry), which the
trainer scores as is, so the trainer scores exactly the prompt that was sampled from and nothing is encoded twice.

Definitions every engine follows (the trainer depends on them):

* ``completion_ids`` are the sampled tokens, *including* the token that ended generation (an EOS token, or the
  token whose text completed a stop string), so the policy also learns when to stop.
* ``text`` is ``tokenizer.decode(completion_ids, skip_special_tokens=True)``: the stop string is kept (a reward
  for ``</answer>`` must see it) and the EOS token is not.
* ``logprobs[i]`` is ``log_softmax(raw_logits)[completion_ids[i]]``: the log-probability of the sampled token under
  the model's unmodified distribution (temperature 1, no top-k / top-p truncation), at the position that produced
  it. This is what the trainer recomputes as the "old" policy log-prob, so the two can be compared directly; it is
  *not* the log-probability under the tempered/truncated distribution the token was drawn from.
* vision placeholder tokens (the family's ``vision_placeholders``) are never sampled: a completion holding one
  would not be a valid model input (its image tokens would not match the images). Their raw log-probs still count
  in the normalisation of every other token's log-prob.
* ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"`` (``max_new_tokens`` or the engine's
  ``max_model_len`` reached).
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

import torch

from megatron_vlmr1.data.messages import ChatMessage, build_messages
from megatron_vlmr1.vlm.inputs import EncodedPrompt, ImageGeometry, ImageInput

if TYPE_CHECKING:
    from transformers import ProcessorMixin

    from megatron_vlmr1.vlm.base import VLMFamily

FinishReason = Literal["stop", "length"]

# The smallest sampling temperature; vLLM samples greedily below it.
MIN_TEMPERATURE = 1e-5

@dataclasses.dataclass
class SamplingConfig:
    """How to sample: ``n`` completions per prompt (the GRPO group size G).

    ``temperature`` 0 means greedy. ``top_k`` -1 and ``top_p`` 1.0 disable truncation. ``seed`` None draws a fresh
    seed each call; an int makes ``generate`` deterministic for the same requests and weights.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key; engines call it again before generating (fields are mutable)."""
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            # vLLM treats such a temperature as greedy (and then refuses n > 1); say so instead of diverging.
            raise ValueError(f"sampling.temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"sampling.stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"sampling.seed must be >= 0 or null, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class RolloutRequest:
    """One prompt: chat messages with one ``{"type": "image"}`` slot per entry of ``images`` (paths or PIL images)."""

    messages: list[ChatMessage]
    images: list[ImageInput] = dataclasses.field(default_factory=list)

    @classmethod
    def from_prompt(cls, prompt: str, images: Sequence[ImageInput] = (),
                    system_prompt: str | None = None) -> "RolloutRequest":
        """From VLM-R1 style text where each ``<image>`` marks an image (images first if there is no marker)."""
        return cls(build_messages(prompt, len(images), system_prompt), list(images))


@dataclasses.dataclass
class Completion:
    """One sampled completion; see the module docstring for the exact definitions."""

    completion_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


@dataclasses.dataclass
class RolloutResult:
    """The ``n`` completions of one request and the encoded prompt they continue (what the trainer scores)."""

    prompt: EncodedPrompt
    completions: list[Completion]

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.input_ids

    @property
    def images(self) -> list[ImageGeometry]:
        """Each image's original and resized size (box rewards and evaluation rescale with it)."""
        return self.prompt.images


def weight_group(hf_name: str) -> str:
    """The unit a weight sync must never split: a transformer block (``model.layers.3``, ``visual.blocks.0``), else
    the weight's module (``model.embed_tokens``).

    vLLM fuses several checkpoint tensors into one layer (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``)
    and rebuilds a layer's kernel weights only when all of its parts arrived in the same reload call; a part
    missing from that call would leave the fused layer half-initialised.
    """
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])


def weight_buckets(weights: Iterable[tuple[str, torch.Tensor]],
                   bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of ``(hf_name, tensor)`` into lists of about ``bucket_bytes`` bytes, in stream order.

    A bucket is closed once it holds at least ``bucket_bytes`` and the next tensor starts a new ``weight_group``,
    so a bucket is never more than ``bucket_bytes`` plus one group, and only one bucket is alive at a time
    (the stream is consumed lazily: the model is never copied whole into host memory).
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size, group = 0, None
    for name, tensor in weights:
        if bucket and size >= bucket_bytes and weight_group(name) != group:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        group = weight_group(name)
    if bucket:
        yield bucket


def encode_request(family: VLMFamily, processor: ProcessorMixin, index: int, request: RolloutRequest) -> EncodedPrompt:
    """``family.encode_prompt`` with the request's index in the error: an unreadable image file (PIL raises
    ``OSError``) or one the image processor rejects becomes a ``ValueError`` before any generation starts."""
    try:
        return family.encode_prompt(processor, request.messages, request.images)
    except (OSError, ValueError) as err:
        raise ValueError(f"request {index}: {err}") from err


class RolloutEngine(abc.ABC):
    """Generates G completions per prompt; receives the trainer's weights in place between steps."""

    max_model_len: int
    family: VLMFamily

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[RolloutResult]:
        """One result per request, in order, each with ``sampling.n`` completions.

        ``seeds`` (one per request) replaces ``sampling.seed``: each request then samples from its own generator, so
        its completions do not depend on which other requests share the call (how the trainer keeps rollouts
        independent of how a step's prompts are split over rollout replicas).
        """

    @abc.abstractmethod
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy ``(hf_name, tensor)`` pairs (checkpoint names, full unsharded tensors) into the engine's model.

        Returns the number of bytes received. Tensors are full HF tensors whatever the trainer's TP/PP layout, so the
        engine's own parallelism (vLLM's tensor parallelism) is independent of the trainer's.
        """

    def sleep(self) -> int:
        """Release accelerator memory while the trainer runs; returns the bytes freed (0: this engine never sleeps).

        The next ``update_weights`` or ``generate`` wakes the engine.
        """
        return 0

    def close(self) -> None:
        """Shut the engine down (before the trainer tears its process groups down)."""

    def check_prompt_length(self, index: int, num_tokens: int) -> None:
        """A prompt must leave room for at least one generated token."""
        if num_tokens >= self.max_model_len:
            raise ValueError(f"request {index}: prompt has {num_tokens} tokens (images expanded), the engine's "
                             f"max_model_len is {self.max_model_len}; shorten it or raise rollout.max_model_len")
