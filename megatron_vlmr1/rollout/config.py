"""Which rollout engine a run uses and how it samples."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from megatron_vlmr1.rollout.base import RolloutEngine, SamplingConfig
from megatron_vlmr1.vlm.base import VLMFamily


@dataclasses.dataclass
class RolloutConfig:
    """``engine``: ``hf`` (transformers, in the training process) or ``vllm`` (in-process vLLM, hybrid engine).

    ``sampling.n`` is set from ``algo.group_size`` by the trainer; ``sampling.seed`` is the base of a per-step,
    per-rank seed, so a resumed run samples exactly what an uninterrupted one would. ``max_batch_size`` is the HF
    engine's rows per forward and vLLM's ``max_num_seqs``; the remaining keys only concern vLLM.

    Weight sync (hybrid engine): each step the trainer's exporter streams full HF tensors (gathered over the
    trainer's TP/PP ranks, so vLLM's own tensor parallelism is independent of the trainer's) and vLLM reloads them
    ``sync_bucket_mb`` at a time; only one bucket is held in host memory. ``vllm_sleep`` (CUDA only) puts vLLM to
    sleep (level 1: weights offloaded, KV cache dropped) while the trainer computes log-probs and updates, and wakes
    it for the next sync; it is ignored on CPU, where vLLM cannot sleep.
    """

    engine: Literal["hf", "vllm"] = "hf"
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    max_model_len: int = 4096
    max_batch_size: int = 64
    max_images_per_prompt: int = 4
    kv_cache_gb: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    sync_bucket_mb: float = 512.0
    vllm_sleep: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_images_per_prompt < 0:
            raise ValueError(f"rollout.max_images_per_prompt must be >= 0, got {self.max_images_per_prompt}")
        if self.kv_cache_gb < 1:
            raise ValueError(f"rollout.kv_cache_gb must be >= 1, got {self.kv_cache_gb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.sync_bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {self.sync_bucket_mb}")


def build_engine(cfg: RolloutConfig, hf_path: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", family: VLMFamily | None = None) -> RolloutEngine:
    """The configured engine, loaded from an HF checkpoint (its weights are replaced each step anyway).

    ``device`` places the transformers engine's model (the trainer's device); vLLM picks its own device.
    ``family`` is the checkpoint's model family (the trainer passes the one it holds; None looks it up).
    """
    if cfg.engine == "hf":
        from megatron_vlmr1.rollout.hf import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(hf_path, dtype=dtype, device=device, family=family,
                                               max_model_len=cfg.max_model_len, max_batch_size=cfg.max_batch_size)
    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(hf_path, max_model_len=cfg.max_model_len, max_images_per_prompt=cfg.max_images_per_prompt,
                             max_num_seqs=cfg.max_batch_size, dtype=str(dtype).removeprefix("torch."),
                             kv_cache_gb=cfg.kv_cache_gb, gpu_memory_utilization=cfg.gpu_memory_utilization,
                             enforce_eager=cfg.enforce_eager, sleep=cfg.vllm_sleep,
                             sync_bucket_bytes=max(1, int(cfg.sync_bucket_mb * 2**20)), family=family)
