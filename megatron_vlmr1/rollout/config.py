"""Which rollout engine a run uses and how it samples."""
from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_vlmr1.rollout.base import SamplingConfig


@dataclasses.dataclass
class RolloutConfig:
    """``engine``: ``hf`` (transformers, in the training process) or ``vllm`` (in-process vLLM, hybrid engine).

    ``sampling.n`` is set from ``algo.group_size`` by the trainer; ``sampling.seed`` is the base of a per-step,
    per-rank seed, so a resumed run samples exactly what an uninterrupted one would.
    """

    engine: Literal["hf", "vllm"] = "hf"
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    max_model_len: int = 4096
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size must be >= 1, got {self.max_batch_size}")


def build_engine(cfg: RolloutConfig, hf_path: str, dtype):
    """The configured engine, loaded from an HF checkpoint (its weights are replaced each step anyway)."""
    if cfg.engine == "hf":
        from megatron_vlmr1.rollout.hf import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(hf_path, dtype=dtype, max_model_len=cfg.max_model_len,
                                               max_batch_size=cfg.max_batch_size)
    from megatron_vlmr1.rollout import vllm as vllm_engine

    return vllm_engine.VLLMRolloutEngine.from_pretrained(hf_path, dtype=dtype, max_model_len=cfg.max_model_len)
