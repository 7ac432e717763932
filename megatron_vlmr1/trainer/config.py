"""The trainer's own config pieces: model/training mode, parallelism, optimiser, loop, checkpoints, rewards.

Each other component (data, rollout, algo) declares its own dataclass next to itself; the run's root configs
(``GRPORunConfig``, ``SFTRunConfig``) only compose them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Which HF checkpoint to start from and which of its weights train."""

    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    train_mode: Literal["full", "freeze_vision", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])

    def __post_init__(self):
        if self.train_mode == "lora" and self.lora_rank < 1:
            raise ValueError("model.lora_rank must be >= 1 for train_mode=lora")


@dataclass
class ParallelConfig:
    """Model parallel sizes; data parallel size is whatever world_size / (tp * pp) leaves."""

    tp: int = 1
    pp: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed_optimizer: bool = True
    # Activation recompute of the actor's decoder layers during the update: "none" keeps every activation,
    # "selective" recomputes the attention core, "full" keeps only each layer's input and recomputes the layer.
    recompute: Literal["none", "selective", "full"] = "none"

    def __post_init__(self):
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute must be none, selective or full, got {self.recompute!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")


@dataclass
class CheckpointConfig:
    save_interval: int = 0          # steps between checkpoints; 0 saves only at the end (and on SIGTERM)
    keep_last: int = 2
    resume: bool = True             # continue from OUTPUT_DIR/checkpoints/latest when it exists
    export_hf: bool = True          # write OUTPUT_DIR/hf (safetensors) at the end

    def __post_init__(self):
        if self.save_interval < 0:
            raise ValueError("checkpoint.save_interval must be >= 0")


@dataclass
class RewardSpec:
    """One reward term: a built-in name or ``package.module:function``, with its weight in the total."""

    name: str = "format"
    weight: float = 1.0


@dataclass
class LoopConfig:
    output_dir: str = "runs/default"
    steps: int = 10
    prompts_per_step: int = 8        # global, across data-parallel ranks
    micro_batch_size: int = 4        # sequences per forward/backward micro-batch
    seed: int = 1234
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        for key in ("steps", "prompts_per_step", "micro_batch_size", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1")
