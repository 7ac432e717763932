"""The device the device-aware tests run on: ``VLMR1_TEST_DEVICE`` (``cpu``, the default and what CI runs, or
``cuda``, what ``tools/gpu_smoke.sh`` runs on a GPU machine). Single-process tests only: the multi-rank tests spawn
gloo processes and stay on the CPU.

On CUDA the float32 parity tolerances (1e-5) need full float32 matmuls and convolutions, so TF32 is switched off.
"""
from __future__ import annotations

import os

import torch

TEST_DEVICE = os.environ.get("VLMR1_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"VLMR1_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise ValueError("VLMR1_TEST_DEVICE=cuda but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
