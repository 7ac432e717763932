"""Time and peak extra memory of log-prob forward+backward: fused kernel vs plain torch vs megatron-core.

    python tools/bench_kernels.py                          # CPU: 1024 tokens x 151936 vocab, TP 1/2/8
    python tools/bench_kernels.py --device cuda --tokens 8192 --dtype bf16

Implementations, each computing per-token log p(target) and the gradient w.r.t. the logits for loss = -sum(log p):
- torch:        log_softmax + gather (what a plain GRPO trainer does); its autograd keeps the log-softmax output,
                a scattered one-hot gradient and the input gradient: three full-vocabulary fp32 tensors.
- megatron:     megatron-core's vocab_parallel_cross_entropy (on a gloo/nccl group of one rank). It turns the
                logits into the softmax in place when they are fp32 (extra memory ~0, logits destroyed); bf16
                logits get one fp32 copy.
- fused:        megatron_vlmr1.kernels.fused_logprob; only the gradient itself is full-vocabulary.
- fused+inplace: the same with inplace_backward=True: the gradient overwrites the logits.
- fused+entropy: also returns the entropy (and backpropagates through it).

TP shards are simulated by vocabulary slicing: one process runs one rank's share, [tokens, vocab / tp], with
tp_group=None (the real kernel adds two all-reduces over [tokens] and [tokens, 3], negligible next to the shard).

Peak extra memory = peak during forward+backward minus what was allocated before (inputs), the gradient included:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact, caching allocator).
- CPU: the process' peak resident set (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs)
  minus the resident set before. For this phase (after the timings) the tool sets glibc's M_MMAP_THRESHOLD to
  1 MiB (mallopt), so every tensor above 1 MiB is its own mmap, returned to the OS when freed instead of parked
  in the heap; every page of these tensors is written, so the RSS peak is the peak of live tensor bytes (+ a few
  MiB of allocator and thread noise: differences below ~10 MiB mean nothing). The kernel folds the RSS into the
  high-water mark lazily, and a single run now and then under-reports a short peak, so each number is the max
  of three runs.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vlmr1.kernels import backend, fused_logprob  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("torch", "megatron", "fused", "fused+inplace", "fused+entropy")
MIB = 2 ** 20


def loss_fn(impl: str):
    """impl → fn(logits, targets) returning a scalar loss to backpropagate."""
    if impl == "torch":
        return lambda x, t: -torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).sum()
    if impl == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        return lambda x, t: vocab_parallel_cross_entropy(x, t).sum()
    if impl == "fused":
        return lambda x, t: -fused_logprob(x, t).sum()
    if impl == "fused+inplace":
        return lambda x, t: -fused_logprob(x, t, inplace_backward=True).sum()
    if impl == "fused+entropy":
        def with_entropy(x, t):
            logprob, entropy = fused_logprob(x, t, return_entropy=True)
            return -(logprob + 0.01 * entropy).sum()
        return with_entropy
    raise ValueError(f"unknown implementation {impl!r}, known: {IMPLS}")


class CpuPeak:
    """Peak resident set of this process since `reset()`, in bytes (Linux, glibc).

    `enable()` fixes glibc's M_MMAP_THRESHOLD at 1 MiB (which also stops glibc from raising it dynamically), so
    that freed tensors go back to the OS instead of staying resident in the heap. It is enabled only after the
    timings: fresh mmaps page-fault on first touch, which would charge every allocation to the timings.
    """

    def enable(self) -> None:
        m_mmap_threshold = -3  # from malloc.h
        if ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, MIB) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: CPU memory numbers would be meaningless")

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = self._status_kib("VmRSS") * 1024

    def extra(self) -> int:
        return self._status_kib("VmHWM") * 1024 - self.base


class CudaPeak:
    def enable(self) -> None:
        pass

    def reset(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def extra(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def run_once(fn, logits: torch.Tensor, targets: torch.Tensor, meter=None) -> float | int:
    """One forward+backward on a fresh copy of the logits (megatron and in-place variants destroy them).

    Returns seconds, or the peak extra bytes when a memory meter is given.
    """
    x = logits.clone().requires_grad_()
    if meter is not None:
        meter.reset()
    start = time.perf_counter()
    fn(x, targets).backward()
    if logits.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = meter.extra() if meter is not None else None
    assert x.grad is not None and x.grad.shape == logits.shape
    del x
    return seconds if meter is None else peak


def make_inputs(tokens: int, shard: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(shard)
    logits = torch.randn(tokens, shard, generator=gen).to(device=device, dtype=dtype)
    return logits, torch.randint(0, shard, (tokens,), generator=gen).to(device)


def init_single_rank_group(device: str) -> None:
    """megatron's cross entropy reads its TP group from parallel_state: give it a world of one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 4096 on cuda, 1024 on cpu")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or (4096 if args.device == "cuda" else 1024)
    if "megatron" in args.impl:
        init_single_rank_group(args.device)
    meter = CudaPeak() if args.device == "cuda" else CpuPeak()
    dtype = DTYPES[args.dtype]
    print(f"# device={args.device} backend={backend(args.device)} dtype={args.dtype} tokens={tokens} "
          f"vocab={args.vocab} threads={torch.get_num_threads()} repeat={args.repeat} (median time)")
    header = f"| {'impl':<14} | tp | {'shard':>6} | {'fwd+bwd ms':>10} | {'peak extra MiB':>14} | " \
             f"{'x shard':>7} | {'time / torch':>12} | {'mem / torch':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    shards = {tp: args.vocab // tp for tp in args.tp}
    seconds = {}
    for tp, shard in shards.items():  # phase 1: timings (median of --repeat after a warm-up)
        logits, targets = make_inputs(tokens, shard, dtype, args.device)
        for impl in args.impl:
            fn = loss_fn(impl)
            run_once(fn, logits, targets)
            seconds[tp, impl] = statistics.median(run_once(fn, logits, targets) for _ in range(args.repeat))
        del logits
    meter.enable()
    for tp, shard in shards.items():  # phase 2: peak memory (max of 3 runs after a warm-up, see CpuPeak)
        logits, targets = make_inputs(tokens, shard, dtype, args.device)
        shard_mib = logits.numel() * logits.element_size() / MIB
        peaks = {}
        for impl in args.impl:
            fn = loss_fn(impl)
            run_once(fn, logits, targets, meter)
            peaks[impl] = max(run_once(fn, logits, targets, meter) for _ in range(3))
        del logits
        for impl in args.impl:
            base_t, base_m = seconds.get((tp, "torch")), peaks.get("torch")
            ratio_t = f"{seconds[tp, impl] / base_t:.2f}" if base_t else "-"
            ratio_m = f"{peaks[impl] / base_m:.2f}" if base_m else "-"
            print(f"| {impl:<14} | {tp:>2} | {shard:>6} | {seconds[tp, impl] * 1e3:>10.1f} | "
                  f"{peaks[impl] / MIB:>14.0f} | {peaks[impl] / MIB / shard_mib:>7.2f} | {ratio_t:>12} | "
                  f"{ratio_m:>11} |", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
