"""Time and peak extra memory of log-prob forward+backward: fused kernel vs plain torch vs megatron-core.

    python tools/bench_kernels.py                          # CPU: 1024 tokens x 151936 vocab, TP 1/2/8
    python tools/bench_kernels.py --device cuda --tokens 8192 --dtype bf16
    python tools/bench_kernels.py --trainer-path [--rows 8 --seq 204]   # the trainer's loss path vs the kernel alone
    python tools/bench_kernels.py --grpo-step [--micro-batch 1 16]      # peak memory of one GRPO step per micro-batch
    python tools/bench_kernels.py --dtype bf16 --bandwidth-goal 0.667  # GB/s vs the device's peak (exit 1 below)

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

--trainer-path: a tiny Qwen2.5-VL (2 layers, hidden 128) with a --vocab LM head, built by tools/make_tiny_model.py;
one micro-batch of --rows x --seq tokens (first half prompt: targets ignored) through `ScoringModel.run`, i.e.
megatron's schedule, the model's LM head and the trainer's own loss function, forward and backward. Beside it the
kernel alone: the same tokens' logits from one matmul of [tokens, hidden] by the LM head's [vocab, hidden] weight,
then `fused_logprob(..., inplace_backward=True)` with the same targets. Both count the logits they produce; the
trainer path also runs the embedding and the two tiny layers (a few MiB).

--grpo-step: one real GRPO step (`GRPOTrainer`, transformers rollout engine, synthetic REC data, fp32, 8 prompts x
group 2 = 16 rows) of the same tiny --vocab model in a fresh process per --micro-batch size; reports each process'
peak resident set, and (a sharper number, since the step's peak may come from another phase such as the rollout)
the peak of the log-prob and update phases above their start; each as a difference to the first size in units of
the extra rows' logits ((mbs - mbs_0) x seq x vocab x 4 bytes, seq being the step's padded row length).

GB/s: the fused kernels' minimum traffic over the time, 3 x the logits' bytes (read for the statistics, read and
written for the gradient) — on a GPU, compare it with the device's memory bandwidth (the goal is >= 2/3 of it).

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


def tiny_model(vocab: int, out_dir: str) -> str:
    from tools.make_tiny_model import make_tiny_model

    return str(make_tiny_model("qwen2_5_vl", out_dir, seed=0, vocab_size=vocab))


def trainer_batch(rows: int, seq: int, vocab_tokens: int, device: str):
    """Text-only rows of `seq` tokens; the first half of each row is prompt (outside the loss)."""
    from megatron_vlmr1.trainer.policy import MicroBatch

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(20, vocab_tokens, (rows, seq), generator=gen)
    loss_mask = torch.zeros(rows, seq - 1, dtype=torch.long)
    loss_mask[:, seq // 2:] = 1
    position_ids = torch.arange(seq).expand(3, rows, seq).contiguous()
    return MicroBatch(input_ids, torch.ones(rows, seq, dtype=torch.long), position_ids, loss_mask).to(device)


def bench_trainer_path(args) -> None:
    """The trainer's real loss path (ScoringModel.run) beside the LM-head matmul + kernel alone."""
    import tempfile

    from transformers import AutoConfig

    from megatron_vlmr1.trainer.config import ModelConfig, ParallelConfig
    from megatron_vlmr1.parallel import init_parallel, teardown_parallel
    from megatron_vlmr1.trainer.policy import ScoringModel, shifted_targets
    from megatron_vlmr1.vlm.families import get_family

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model(args.vocab, tmp)
        env = init_parallel(ParallelConfig(tp=1, pp=1, device=args.device), seed=0)
        hf_config = AutoConfig.from_pretrained(path)
        scoring = ScoringModel(get_family(hf_config), hf_config, path, env, ModelConfig(path=path))
    scoring.module.train()
    batch = trainer_batch(args.rows, args.seq, 1000, args.device)
    tokens = args.rows * args.seq
    weight = scoring.module.language_model.output_layer.weight.detach().clone().requires_grad_()
    hidden = torch.randn(tokens, weight.shape[1], device=args.device, requires_grad=True)
    targets = shifted_targets(batch).t().reshape(-1)  # the trainer's targets, in its (s, b) row order
    vocab_end = scoring.vocab_size

    def trainer_path():
        scoring.run([batch], lambda mb, logprobs, entropy: (-logprobs.sum(), {}), forward_only=False)

    def kernel_alone():
        logits = hidden @ weight.t()
        (-fused_logprob(logits, targets, vocab_end=vocab_end, inplace_backward=True)).sum().backward()

    paths = {"trainer path": trainer_path, "kernel alone": kernel_alone}
    meter = CudaPeak() if args.device == "cuda" else CpuPeak()

    def timed(fn) -> float:
        """CPU: the process' CPU time (robust to other processes sharing the cores); CUDA: wall time."""
        if args.device == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start
        start = time.process_time()
        fn()
        return time.process_time() - start

    for fn in paths.values():
        fn()  # warm-up; also allocates the parameters' .grad, which later runs accumulate into
    seconds = {name: float("inf") for name in paths}
    for _ in range(args.repeat):  # interleaved, best of --repeat: both paths see the same machine
        for name, fn in paths.items():
            seconds[name] = min(seconds[name], timed(fn))
    meter.enable()
    peaks = {}
    for name, fn in paths.items():
        fn()
        runs = []
        for _ in range(3):
            meter.reset()
            fn()
            runs.append(meter.extra())
        peaks[name] = max(runs)
    logits_mib = tokens * weight.shape[0] * 4 / MIB
    print(f"# device={args.device} backend={backend(args.device)} fp32 rows={args.rows} seq={args.seq} "
          f"tokens={tokens} vocab={weight.shape[0]} logits={logits_mib:.0f} MiB threads={torch.get_num_threads()} "
          f"repeat={args.repeat} (best time of interleaved runs, {'wall' if args.device == 'cuda' else 'CPU'} "
          f"seconds; max of 3 peaks)")
    print("| path         | fwd+bwd ms | peak extra MiB | x logits | time / kernel | mem / kernel |")
    print("|--------------|------------|----------------|----------|---------------|--------------|")
    for name in paths:
        print(f"| {name:<12} | {seconds[name] * 1e3:>10.1f} | {peaks[name] / MIB:>14.0f} | "
              f"{peaks[name] / MIB / logits_mib:>8.2f} | {seconds[name] / seconds['kernel alone']:>13.2f} | "
              f"{peaks[name] / peaks['kernel alone']:>12.2f} |", flush=True)
    teardown_parallel(env)


def grpo_step_child(model: str, micro_batch: int, out_dir: str) -> None:
    """One GRPO step at this micro-batch size; prints `peak_bytes seq` (run in a fresh process)."""
    from megatron_vlmr1.config import from_dict
    from megatron_vlmr1.data.synthetic import make_rec_dataset
    from megatron_vlmr1.trainer import policy
    from megatron_vlmr1.trainer.grpo import GRPORunConfig, GRPOTrainer

    data = make_rec_dataset(os.path.join(out_dir, "data"), 16, seed=0, difficulty="easy")["train"]
    cfg = from_dict(GRPORunConfig, {
        "model": {"path": model}, "data": {"files": [str(data)], "task": "rec"},
        "rollout": {"sampling": {"max_new_tokens": 48}}, "algo": {"group_size": 2, "beta": 0.04},
        "rewards": [{"name": "format", "weight": 1.0}],
        "train": {"output_dir": os.path.join(out_dir, "run"), "steps": 1, "prompts_per_step": 8,
                  "micro_batch_size": micro_batch, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False}, "parallel": {"device": "cpu"},
    })
    seen = []
    phase_peak, step_peak = [0], [0]
    meter = CpuPeak()
    meter.enable()  # freed tensors go back to the OS, so each phase's RSS peak is its own
    run = policy.ScoringModel.run

    def recording_run(self, micro_batches, token_loss, forward_only):
        """Old/reference log-probs and the update: RSS peak above the phase's start."""
        seen.append(micro_batches[0].input_ids.shape)
        step_peak[0] = max(step_peak[0], CpuPeak._status_kib("VmHWM") * 1024)  # the reset below clears it
        meter.reset()
        try:
            return run(self, micro_batches, token_loss, forward_only)
        finally:
            phase_peak[0] = max(phase_peak[0], meter.extra())

    policy.ScoringModel.run = recording_run
    trainer = GRPOTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    step_peak[0] = max(step_peak[0], CpuPeak._status_kib("VmHWM") * 1024)
    print("RESULT", step_peak[0], seen[-1][1], phase_peak[0], flush=True)


def bench_grpo_step(args) -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(args.vocab, os.path.join(tmp, "model"))
        results = {}
        for mbs in args.micro_batch:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--grpo-step-child", model, str(mbs),
                                  os.path.join(tmp, f"mbs{mbs}")], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
            if out.returncode or not lines:
                raise RuntimeError(f"GRPO step at micro-batch {mbs} failed:\n{out.stderr[-3000:]}")
            results[mbs] = tuple(int(v) for v in lines[-1].split()[1:])
    print(f"# one GRPO step, CPU, fp32, vocab={args.vocab}, 16 rows; per fresh process: peak RSS of the whole step, "
          f"and the log-prob/update phases' peak above their start")
    print("| micro-batch | seq | step peak MiB | step extra MiB | phase peak MiB | phase extra MiB | extra rows' "
          "logits MiB | step ratio | phase ratio |")
    print("|-------------|-----|---------------|----------------|----------------|-----------------|-------------"
          "-----------|------------|-------------|")
    first = args.micro_batch[0]
    for mbs, (peak, seq, phase) in results.items():
        extra, phase_extra = peak - results[first][0], phase - results[first][2]
        rows_logits = (mbs - first) * seq * args.vocab * 4
        ratio = f"{extra / rows_logits:.2f}" if rows_logits else "-"
        phase_ratio = f"{phase_extra / rows_logits:.2f}" if rows_logits else "-"
        print(f"| {mbs:>11} | {seq:>3} | {peak / MIB:>13.0f} | {extra / MIB:>14.0f} | {phase / MIB:>14.0f} | "
              f"{phase_extra / MIB:>15.0f} | {rows_logits / MIB:>22.0f} | {ratio:>10} | {phase_ratio:>11} |",
              flush=True)


def device_peak_gbps(device: torch.device) -> tuple[float, str]:
    """The device's memory bandwidth, GB/s, and where the number comes from: memory clock x bus width (double
    data rate) where torch reports them, else a measured device-to-device copy of 1 GiB (a lower bound)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width"
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9, "measured 1 GiB copy, a lower bound"


def bench_bandwidth(args) -> int:
    """The fused kernels' achieved bandwidth against the device's peak; exit status 1 below ``--bandwidth-goal``.

    Minimum traffic: the forward alone (log-prob-only passes) reads the logits once; forward + in-place backward
    reads them twice and writes them once."""
    if args.device != "cuda" and not args.peak_gbps:
        raise SystemExit("--bandwidth-goal: on a CPU give the memory bandwidth with --peak-gbps")
    tokens = args.tokens or 16384
    logits, targets = make_inputs(tokens, args.vocab, DTYPES[args.dtype], args.device)
    peak, source = (args.peak_gbps, "--peak-gbps") if args.peak_gbps else device_peak_gbps(logits.device)
    logits_bytes = logits.numel() * logits.element_size()

    def forward_only(x, t):
        with torch.no_grad():
            fused_logprob(x, t)

    def timed(fn, copy: bool) -> float:
        runs = []
        for _ in range(args.repeat + 1):  # the first is a warm-up
            x = logits.clone() if copy else logits
            if copy:
                x.requires_grad_()
            if logits.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x, targets)
            if logits.is_cuda:
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs[1:])

    inplace = loss_fn("fused+inplace")
    results = {"forward (log-prob only)": logits_bytes / timed(forward_only, copy=False),
               "forward+backward, in place": 3 * logits_bytes / timed(lambda x, t: inplace(x, t).backward(), True)}
    met = True
    for name, bytes_per_s in results.items():
        share = bytes_per_s / 1e9 / peak
        met &= share >= args.bandwidth_goal
        print(f"kernel bandwidth: {name}, {args.dtype}, {tokens} x {args.vocab}: {bytes_per_s / 1e9:.3g} GB/s = "
              f"{share:.0%} of the device's {peak:.0f} GB/s ({source})", flush=True)
    print(f"kernel bandwidth goal >= {args.bandwidth_goal:.0%} of peak: {'met' if met else 'NOT met'}", flush=True)
    return 0 if met else 1


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--grpo-step-child":
        grpo_step_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 4096 on cuda, 1024 on cpu")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--trainer-path", action="store_true",
                        help="the trainer's loss path from a model's LM head, beside the kernel alone")
    parser.add_argument("--rows", type=int, default=8, help="--trainer-path: rows (sequences) in the micro-batch")
    parser.add_argument("--seq", type=int, default=204, help="--trainer-path: tokens per row")
    parser.add_argument("--grpo-step", action="store_true",
                        help="peak memory of one GRPO step at each --micro-batch size (CPU)")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--bandwidth-goal", type=float, default=None,
                        help="report the fused kernels' GB/s against the device's peak; exit 1 below this share")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="--bandwidth-goal: the device's memory bandwidth (default: from the device)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grpo_step:
        bench_grpo_step(args)
        return
    if args.trainer_path:
        bench_trainer_path(args)
        return
    if args.bandwidth_goal is not None:
        sys.exit(bench_bandwidth(args))
    tokens = args.tokens or (4096 if args.device == "cuda" else 1024)
    if "megatron" in args.impl:
        init_single_rank_group(args.device)
    meter = CudaPeak() if args.device == "cuda" else CpuPeak()
    dtype = DTYPES[args.dtype]
    print(f"# device={args.device} backend={backend(args.device)} dtype={args.dtype} tokens={tokens} "
          f"vocab={args.vocab} threads={torch.get_num_threads()} repeat={args.repeat} (median time)")
    header = f"| {'impl':<14} | tp | {'shard':>6} | {'fwd+bwd ms':>10} | {'peak extra MiB':>14} | " \
             f"{'x shard':>7} | {'time / torch':>12} | {'mem / torch':>11} | {'GB/s':>6} |"
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
                  f"{ratio_m:>11} | {3 * shard_mib * MIB / seconds[tp, impl] / 1e9:>6.1f} |", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
