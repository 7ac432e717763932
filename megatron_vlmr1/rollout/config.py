"""Which rollout engine a run uses and how it samples."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from megatron_vlmr1.rollout.base import RolloutEngine, SamplingConfig
from megatron_vlmr1.vlm.base import VLMFamily


@dataclasses.dataclass
class RolloutConfig:
    """``engine``: ``hf`` (transformers, in the training process) or ``vllm`` (in-process vLLM, hybrid engine).

    ``sampling.n`` is set from ``algo.group_size`` by the trainer, which also gives every prompt its own seed from
    (``train.seed``, step, round, prompt index) in place of ``sampling.seed`` (``placement.prompt_seed``), so a resumed
    run samples exactly what an uninterrupted one would.

    Placement (both engines): the job's ranks form ``world / tp`` rollout replicas of ``tp`` consecutive ranks, and a
    step's prompts are split over them, each generated once (``rollout.placement``). ``tp`` is vLLM's
    ``tensor_parallel_size`` (default: the trainer's ``parallel.tp``); the transformers engine is always 1. With more
    than one rank, vLLM runs with ``distributed_executor_backend="external_launcher"`` inside the torchrun processes,
    each on the device its ``LOCAL_RANK`` names.

    ``max_model_len`` (default: the model's ``max_position_embeddings``) bounds prompt + completion.
    ``max_batch_size`` is the transformers engine's rows per forward; ``max_num_seqs``, ``gpu_memory_utilization``,
    ``enforce_eager`` (default: false on CUDA, CUDA graphs; true on CPU), ``kv_cache_gb`` (CPU KV cache, GiB) and
    ``max_images_per_prompt`` only concern vLLM.

    Weight sync (hybrid engine): each step the trainer's exporter streams full HF tensors (the owning pipeline
    stage's shards broadcast over PP, gathered over TP) and vLLM reloads them ``sync_bucket_mb`` at a time; only one
    bucket is held in host memory. ``vllm_sleep`` (CUDA only; ignored on CPU, where vLLM cannot sleep) puts vLLM to
    sleep at level 2 (weights and KV cache released: the weights are rewritten by the next sync anyway) while the
    trainer computes log-probs and updates; the next sync empties the CUDA cache, wakes the weights, reloads them,
    then re-allocates the KV cache.
    """

    engine: Literal["hf", "vllm"] = "hf"
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    tp: int | None = None
    max_model_len: int | None = None
    max_batch_size: int = 64
    max_num_seqs: int = 256
    max_images_per_prompt: int = 4
    kv_cache_gb: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool | None = None
    sync_bucket_mb: float = 512.0
    vllm_sleep: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.tp is not None and self.tp < 1:
            raise ValueError(f"rollout.tp must be >= 1, got {self.tp}")
        if self.engine == "hf" and self.tp not in (None, 1):
            raise ValueError(f"rollout.tp={self.tp}: the transformers engine has no tensor parallelism (use "
                             f"rollout.engine=vllm, or leave rollout.tp unset)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"rollout.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_images_per_prompt < 0:
            raise ValueError(f"rollout.max_images_per_prompt must be >= 0, got {self.max_images_per_prompt}")
        if self.kv_cache_gb < 1:
            raise ValueError(f"rollout.kv_cache_gb must be >= 1, got {self.kv_cache_gb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.sync_bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {self.sync_bucket_mb}")

    def rollout_tp(self, trainer_tp: int) -> int:
        """Ranks per rollout replica: ``tp`` (default the trainer's TP) for vLLM, 1 for the transformers engine."""
        if self.engine == "hf":
            return 1
        return self.tp if self.tp is not None else trainer_tp


def model_max_len(hf_path: str | Path) -> int:
    """The longest sequence the checkpoint supports: its text config's ``max_position_embeddings``."""
    from transformers import AutoConfig

    from megatron_vlmr1.vlm.base import hf_config_text

    config = hf_config_text(AutoConfig.from_pretrained(hf_path))
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"{hf_path}: config has no usable max_position_embeddings ({length!r}); "
                         f"set rollout.max_model_len")
    return length


def build_engine(cfg: RolloutConfig, hf_path: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", family: VLMFamily | None = None, tp: int = 1,
                 world_size: int = 1) -> RolloutEngine:
    """The configured engine, loaded from an HF checkpoint (its weights are replaced each step anyway).

    ``device`` places the transformers engine's model (the trainer's device). ``family`` is the checkpoint's model
    family (the trainer passes the one it holds; None looks it up). vLLM runs with ``tensor_parallel_size`` ``tp``;
    with ``world_size`` > 1 it joins the already initialised ``torch.distributed`` world (external launcher) and
    takes its device from ``LOCAL_RANK``.
    """
    max_model_len = cfg.max_model_len or model_max_len(hf_path)
    if cfg.engine == "hf":
        from megatron_vlmr1.rollout.hf import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(hf_path, dtype=dtype, device=device, family=family,
                                               max_model_len=max_model_len, max_batch_size=cfg.max_batch_size)
    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(hf_path, max_model_len=max_model_len, max_images_per_prompt=cfg.max_images_per_prompt,
                             max_num_seqs=cfg.max_num_seqs, dtype=str(dtype).removeprefix("torch."),
                             kv_cache_gb=cfg.kv_cache_gb, gpu_memory_utilization=cfg.gpu_memory_utilization,
                             enforce_eager=cfg.enforce_eager, sleep=cfg.vllm_sleep,
                             sync_bucket_bytes=max(1, int(cfg.sync_bucket_mb * 2**20)), family=family,
                             tensor_parallel_size=tp, world_size=world_size)
