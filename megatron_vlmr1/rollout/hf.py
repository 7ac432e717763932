"""Rollout engine on a transformers model: the reference engine, and the one CPU tests and tiny runs use.

Sampling is an explicit loop over the KV cache rather than ``model.generate`` so that every rule in ``base`` is
visible in one place: which log-prob is recorded (raw logits, before temperature / top-k / top-p), when a row stops,
and which random generator draws the tokens (one ``torch.Generator`` seeded from ``SamplingConfig.seed``, consumed
row-major over the batch, so the same requests, weights and seed give the same completions). The generator lives on
the model's device (a CPU generator cannot draw on CUDA tensors), so CPU and GPU runs draw different samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from megatron_vlmr1.rollout.base import (
    Completion,
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    SamplingConfig,
    encode_request,
)
from megatron_vlmr1.vlm.base import VLMFamily
from megatron_vlmr1.vlm.inputs import EncodedPrompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits [batch, vocab] with everything below the k-th largest set to -inf (-1 keeps all)."""
    if top_k == -1 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [batch, vocab] keeping the smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is kept if the probability mass strictly before it (in descending order) is below ``top_p``, so the
    most likely token always survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_tokens(logits: torch.Tensor, sampling: SamplingConfig,
                  generator: torch.Generator | Sequence[torch.Generator],
                  banned_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from raw ``logits`` [batch, vocab]; return tokens [batch] and raw log-probs [batch].

    ``generator`` is one generator for the batch, or one per row (each row then draws from its own, in row order).
    ``banned_ids`` are never drawn (image placeholders: a completion holding one would not be a valid model input);
    the recorded log-probs still come from the untouched logits, as ``base`` defines them.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    drawable = logits
    if banned_ids:
        drawable = logits.index_fill(-1, torch.tensor(list(banned_ids), device=logits.device), float("-inf"))
    if sampling.greedy:
        tokens = drawable.argmax(dim=-1)
    else:
        scaled = filter_top_p(filter_top_k(drawable / sampling.temperature, sampling.top_k), sampling.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if isinstance(generator, torch.Generator):
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tokens = torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=g).view(1)
                                for row, g in enumerate(generator)])
    return tokens, raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def resolve_parameter_name(name: str, params: dict[str, torch.nn.Parameter], mapped: str | None = None) -> str:
    """The key of ``params`` (a model's ``named_parameters``) that a checkpoint name refers to.

    transformers 5 nests VLM language models under ``model.language_model.`` and the vision tower under
    ``model.visual.``, while checkpoints (and our exporter) keep the flat names; both spellings are accepted.
    ``mapped`` is the family's own mapping of ``name`` (``family.transformers_name``), tried first.
    """
    candidates = ([mapped] if mapped else []) + [name, "model." + name]
    if name.startswith("model."):
        candidates.append("model.language_model." + name[len("model."):])
    for candidate in candidates:
        if candidate in params:
            return candidate
    raise ValueError(f"update_weights: {name!r} is not a parameter of the model (e.g. {next(iter(params))!r})")


class HFRolloutEngine(RolloutEngine):
    """Generates with a transformers VLM in this process (CPU or one GPU)."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, family: VLMFamily, max_model_len: int = 4096,
                 max_batch_size: int = 64):
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.family = family
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = set(eos) | {processor.tokenizer.eos_token_id}
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.banned_ids = family.banned_token_ids(processor.tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", family: VLMFamily | None = None, max_model_len: int = 4096,
                        max_batch_size: int = 64) -> "HFRolloutEngine":
        """Load an HF checkpoint onto ``device`` (the trainer passes its own: a CUDA run rolls out on the GPU).

        ``family`` is the checkpoint's model family (the trainer passes the one it holds; None looks it up).
        """
        from transformers import AutoModelForImageTextToText

        from megatron_vlmr1.vlm.families import get_family

        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("HFRolloutEngine: device is cuda but CUDA is not available here")
        family = family or get_family(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, family.load_processor(path), family, max_model_len=max_model_len,
                   max_batch_size=max_batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def make_generator(self, seed: int | None) -> torch.Generator:
        """The sampling generator, on the model's device (``torch.multinomial`` needs them to agree)."""
        return torch.Generator(device=self.device).manual_seed(seed if seed is not None else torch.seed())

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[RolloutResult]:
        sampling.validate()
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(requests)} requests")
        prompts = [encode_request(self.family, self.processor, index, request)
                   for index, request in enumerate(requests)]
        for index, prompt in enumerate(prompts):
            self.check_prompt_length(index, len(prompt.input_ids))
        rows = [prompt for prompt in prompts for _ in range(sampling.n)]
        completions: list[Completion] = []
        if seeds is None:
            generator = self.make_generator(sampling.seed)
            for start in range(0, len(rows), self.max_batch_size):
                completions.extend(self._generate_rows(rows[start:start + self.max_batch_size], sampling, generator))
        else:
            # A request's rows never straddle two forward batches and draw from the request's own generator, so
            # its samples are the same whatever requests share the call.
            per_batch = max(1, self.max_batch_size // sampling.n)
            for first in range(0, len(prompts), per_batch):
                generators = [self.make_generator(seed) for seed in seeds[first:first + per_batch]]
                batch_rows = rows[first * sampling.n:(first + len(generators)) * sampling.n]
                row_generators = [g for g in generators for _ in range(sampling.n)]
                completions.extend(self._generate_rows(batch_rows, sampling, row_generators))
        return [RolloutResult(prompt, completions[i * sampling.n:(i + 1) * sampling.n])
                for i, prompt in enumerate(prompts)]

    @torch.no_grad()
    def _generate_rows(self, rows: list[EncodedPrompt], sampling: SamplingConfig,
                       generator: torch.Generator | Sequence[torch.Generator]) -> list[Completion]:
        batch = self.family.collate_prompts(self.processor, self.model.config, rows)
        device = self.device
        attention_mask = batch.attention_mask.to(device)
        # Next text position per row: one past the largest mrope position of its prompt (images can make the
        # positions run behind the token count, so it is not the prompt length).
        next_position = batch.position_ids.amax(dim=(0, 2)).to(device) + 1
        to_model = self.family.transformers_position_ids
        output = self.model(input_ids=batch.input_ids.to(device), attention_mask=attention_mask,
                            position_ids=to_model(batch.position_ids.to(device)),
                            pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(device),
                            image_grid_thw=None if batch.image_grid_thw is None else batch.image_grid_thw.to(device),
                            use_cache=True, logits_to_keep=1)
        budgets = [min(sampling.max_new_tokens, self.max_model_len - len(row.input_ids)) for row in rows]
        tokens_out: list[list[int]] = [[] for _ in rows]
        logprobs_out: list[list[float]] = [[] for _ in rows]
        finish: list[str | None] = [None] * len(rows)
        while True:
            tokens, logprobs = sample_tokens(output.logits[:, -1], sampling, generator, self.banned_ids)
            for row, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                if finish[row] is None:
                    tokens_out[row].append(token)
                    logprobs_out[row].append(logprob)
                    finish[row] = self._finish_reason(tokens_out[row], budgets[row], sampling.stop)
            if all(reason is not None for reason in finish):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            output = self.model(input_ids=tokens[:, None], attention_mask=attention_mask,
                                position_ids=to_model(next_position.view(1, -1, 1).expand(3, -1, 1)),
                                past_key_values=output.past_key_values, use_cache=True)
            next_position = next_position + 1
        return [Completion(ids, self._decode(ids), lps, reason)
                for ids, lps, reason in zip(tokens_out, logprobs_out, finish)]

    def _decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish_reason(self, ids: list[int], budget: int, stop: list[str]) -> str | None:
        if ids[-1] in self.eos_token_ids:
            return "stop"
        if stop:
            text = self._decode(ids)
            if any(s in text for s in stop):
                return "stop"
        return "length" if len(ids) >= budget else None

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors in place, one at a time (checkpoint names, mapped by ``family.transformers_name``); a tied
        LM head is the embedding, so either name updates both. Returns the bytes received."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        received = 0
        for name, tensor in weights:
            target = params[resolve_parameter_name(name, params, self.family.transformers_name(name))]
            if target.shape != tensor.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor)
            received += tensor.numel() * tensor.element_size()
        return received
