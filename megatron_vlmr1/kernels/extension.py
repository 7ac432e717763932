"""Loading the csrc extension and choosing between it and the torch fallback.

`megatron_vlmr1._C` (built by setup.py) registers the `torch.ops.vlmr1.*` ops with a CPU kernel, plus a CUDA
kernel when it was built with a CUDA toolkit. When a device has no kernel (extension not built, or built without
CUDA) the callers use the plain-torch twins in `reference.py`; `backend()` says so and a warning is emitted once per
device type, so nothing falls back silently.
"""
from __future__ import annotations

import os
import warnings

import torch

CSRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_load_error: str | None = None
_warned: set[str] = set()


def _load() -> None:
    global _load_error
    try:
        import megatron_vlmr1._C  # noqa: F401  (importing registers torch.ops.vlmr1)
    except ImportError as err:
        _load_error = f"{type(err).__name__}: {err}"


def build_jit(with_cuda: bool | None = None, verbose: bool = False) -> None:
    """Compile csrc/ with `torch.utils.cpp_extension.load` and load it (development without `setup.py`).

    Only for a process where `megatron_vlmr1._C` did not load: registering the ops twice is an error.
    """
    from torch.utils import cpp_extension

    if ops_registered():
        raise RuntimeError("megatron_vlmr1 kernels: the vlmr1 ops are already registered (extension loaded)")
    if with_cuda is None:
        with_cuda = cpp_extension.CUDA_HOME is not None
    sources = [os.path.join(CSRC_DIR, name) for name in ("bindings.cpp", "cpu_kernels.cpp")]
    if with_cuda:
        sources.append(os.path.join(CSRC_DIR, "cuda_kernels.cu"))
    cpp_extension.load(name="vlmr1_jit", sources=sources, extra_include_paths=[CSRC_DIR],
                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"],
                       with_cuda=with_cuda, is_python_module=False, verbose=verbose)
    global _load_error
    _load_error = None


def ops_registered() -> bool:
    """Whether the vlmr1 op schemas exist (the extension, or its JIT build, is loaded)."""
    return hasattr(torch.ops.vlmr1, "logprob_stats")


def has_kernel(device_type: str) -> bool:
    """Whether the csrc extension has a kernel for this device type ("cpu" or "cuda")."""
    key = _DISPATCH_KEYS.get(device_type)
    return (key is not None and ops_registered()
            and torch._C._dispatch_has_kernel_for_dispatch_key("vlmr1::logprob_stats", key))


def backend(device: str | torch.device | None = None) -> str:
    """Which implementation runs for tensors on `device`: "csrc-cuda", "csrc-cpu" or "torch".

    Default device: cuda when a GPU is visible, else cpu.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return f"csrc-{device_type}" if has_kernel(device_type) else "torch"


def use_csrc(device: torch.device) -> bool:
    """True when the csrc op should run for this device; otherwise warns (once per device type) and returns False."""
    if has_kernel(device.type):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        reason = _load_error or f"megatron_vlmr1._C was built without {device.type} kernels"
        warnings.warn(f"megatron_vlmr1 kernels: no csrc kernel for {device.type} tensors ({reason}); using the "
                      "plain-torch fallback, which materialises full-vocabulary temporaries. Build the extension "
                      "with `python setup.py build_ext --inplace` (CUDA_HOME set for CUDA).", RuntimeWarning,
                      stacklevel=3)
    return False


_load()
