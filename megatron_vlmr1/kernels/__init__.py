"""Fused kernels for the hot RL math (Python face of csrc/, with plain-torch fallbacks).

- `fused_logprob`: vocab-parallel log-prob (+ entropy) of target tokens without full-vocabulary temporaries.
- `group_advantage`: GRPO group-normalised advantages.
- `backend()`: which implementation runs ("csrc-cuda", "csrc-cpu" or "torch").
References for tests live in `megatron_vlmr1.kernels.reference`.
"""
from megatron_vlmr1.kernels.advantage import group_advantage
from megatron_vlmr1.kernels.extension import backend, build_jit
from megatron_vlmr1.kernels.logprob import fused_logprob

__all__ = ["backend", "build_jit", "fused_logprob", "group_advantage"]
