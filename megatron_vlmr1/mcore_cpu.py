"""Run megatron-core 0.16.1 on CPU over gloo.

megatron-core assumes CUDA in a handful of places: it asks ``torch.cuda.current_device()`` for the device of new
buffers, synchronises, seeds and saves/restores the CUDA RNG (the TP rng tracker), and a few factory calls pass a
literal ``device="cuda"``. ``enable_cpu_mode()`` redirects exactly those to the CPU:

* ``torch.cuda.current_device`` -> ``"cpu"`` (every ``device=torch.cuda.current_device()`` lands on the CPU);
* ``torch.cuda.synchronize`` -> no-op;
* ``torch.cuda.manual_seed`` / ``torch.cuda[.random].get_rng_state`` / ``set_rng_state`` -> the CPU generator, and
  megatron's own ``_set_cuda_rng_state`` likewise, so the TP rng tracker forks the CPU generator;
* a ``TorchFunctionMode`` rewrites ``device="cuda"`` (or ``torch.device("cuda", i)``) in any torch call, and
  ``Tensor.cuda()`` / ``Tensor.to("cuda")``, to the CPU, and reports CPU tensors' ``Tensor.type()`` as
  ``torch.cuda.*Tensor`` (megatron's (distributed) optimizer checks parameter types by that string).

On a data-parallel group of one rank, megatron's distributed optimizer still all-gathers the parameters (and
reduce-scatters the gradients) through gloo every step, copying each buffer onto itself. The gloo worker thread's
copy is parallel, so it starts a second OpenMP team; libgomp then counts more threads than cores and stops spinning
between parallel regions, which left the CPUs ~20% idle in every later forward and backward of the process (a GRPO
step on 2 threads: update 1.85 s -> 2.2 s). ``enable_cpu_mode`` makes those two collectives local copies on the
calling thread when the group has one rank (``_single_rank_collective``).

It is switched on explicitly, only for CPU runs (a CUDA run never calls it), and is idempotent. After enabling,
initialise ``parallel_state`` and call ``tensor_parallel.model_parallel_cuda_manual_seed`` as usual; models need an
explicit attention mask, and ``pipeline_dtype`` when PP > 1.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


def _to_cpu_device(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices in torch calls to the CPU (factory ``device=`` kwargs, ``.cuda()``, ``.to('cuda')``)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept only 'torch.cuda.*Tensor' type strings for model params
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _CpuModeState:
    """What ``enable_cpu_mode`` replaced, so ``disable_cpu_mode`` can put it back."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []
        self.mode: _CudaToCpuMode | None = None

    def patch(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)


_STATE: _CpuModeState | None = None


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, and the CUDA generators do not matter here.
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _single_rank_collective(collective: Callable) -> Callable:
    """``collective(output, input, group=..., async_op=...)`` (all-gather into / reduce-scatter from one tensor):
    on a one-rank group both are ``output <- input``, done here instead of on gloo's worker thread (see above).
    Asynchronous calls and larger groups go to ``collective`` unchanged."""

    def local_or_collective(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        if kwargs.get("async_op") or torch.distributed.get_world_size(group) != 1:
            return collective(output, input, *args, **kwargs)
        if output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        return None

    return local_or_collective


def is_cpu_mode_enabled() -> bool:
    return _STATE is not None


def enable_cpu_mode() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU (see module docstring). Calling it twice is a no-op."""
    global _STATE
    if _STATE is not None:
        return
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import random as mcore_random

    state = _CpuModeState()
    state.patch(torch.cuda, "current_device", lambda: "cpu")
    state.patch(torch.cuda, "synchronize", lambda device=None: None)
    state.patch(torch.cuda, "manual_seed", _cpu_manual_seed)
    state.patch(torch.cuda, "get_rng_state", _cpu_get_rng_state)
    state.patch(torch.cuda, "set_rng_state", _cpu_set_rng_state)
    state.patch(torch.cuda.random, "get_rng_state", _cpu_get_rng_state)
    state.patch(torch.cuda.random, "set_rng_state", _cpu_set_rng_state)
    state.patch(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        state.patch(param_and_grad_buffer, name, _single_rank_collective(getattr(param_and_grad_buffer, name)))
    state.mode = _CudaToCpuMode()
    state.mode.__enter__()
    _STATE = state


def disable_cpu_mode() -> None:
    """Undo ``enable_cpu_mode`` (for tests that must leave the process as they found it)."""
    global _STATE
    if _STATE is None:
        return
    assert _STATE.mode is not None
    _STATE.mode.__exit__(None, None, None)
    for owner, name, value in reversed(_STATE.saved):
        setattr(owner, name, value)
    _STATE = None


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """``with cpu_mode(): ...`` — enabled inside, restored after (unless it was already enabled before)."""
    was_enabled = is_cpu_mode_enabled()
    enable_cpu_mode()
    try:
        yield
    finally:
        if not was_enabled:
            disable_cpu_mode()


def maybe_enable_cpu_mode(device: str | torch.device) -> bool:
    """Enable CPU mode iff ``device`` is the CPU; returns whether it is on. A CUDA run is left untouched."""
    if torch.device(device).type == "cpu":
        enable_cpu_mode()
        return True
    return False
