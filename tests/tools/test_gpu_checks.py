"""tools/gpu_checks.py (what tools/gpu_smoke.sh runs on a GPU) stays runnable: its kernel and model checks pass on
the CPU here with the same code, so a GPU session never discovers a stale check."""
from __future__ import annotations

from tools.gpu_checks import check_kernels, check_model


def test_kernel_check_runs_the_csrc_kernel_and_passes():
    line = check_kernels("cpu", vocab=4096)
    assert line.startswith("kernels (csrc-cpu, vocab 4096)")


def test_model_check_compares_megatron_with_transformers(tiny_qwen2_5_vl):
    line = check_model(str(tiny_qwen2_5_vl), "cpu", "local")
    assert float(line.rsplit(" ", 1)[1]) < 2e-3
