"""Rollout throughput and weight-sync speed of the vLLM engine vs the transformers engine, on one model and prompts.

    python tools/bench_throughput.py [--engine hf vllm] [--prompts 8] [--group 4] [--max-new-tokens 64]
        [--model HF_DIR] [--data JSONL] [--sync-bucket-mb 512] [--repeats 3] [--json OUT]

Without ``--model`` a tiny Qwen2.5-VL (random weights) is built; without ``--data`` a synthetic REC set (one image
per prompt). Each engine runs in its own subprocess (vLLM pins CPU threads and keeps global state) and reports:

* rollout tokens/s: completion tokens of ``prompts x group`` samples (temperature 1, EOS respected) over the wall
  time of one ``generate`` call, after one warm-up call; the best of ``--repeats``;
* sync s/GiB: the wall time of ``update_weights`` with every weight of the checkpoint (the hybrid engine's per-step
  sync; vLLM reloads it ``--sync-bucket-mb`` at a time), per GiB streamed; the best of ``--repeats``.

The tiny model measures engine overhead, not kernels: use ``--model`` for representative numbers.

    python tools/bench_throughput.py --tp 2 [--world 2] [--prompts 8] [--group 4] [--max-new-tokens 64] [--repeats 3]

``--tp N`` measures the hybrid engine's rollout phase inside a torchrun world of ``--world`` ranks (default N; the
tool launches them itself, gloo on CPU), all ranks training on every prompt (one data-parallel replica, as trainer
TP x PP): ``duplicated`` is the old placement (every rank runs its own vLLM and generates all the step's prompts);
``split`` is vLLM at ``tensor_parallel_size`` N with the step's prompts split over the ``world / N`` rollout replicas
(each generated once) and the results sent to every rank (``rollout.exchange.RolloutRouter``). Reported: the rollout
phase's wall time per step (slowest rank, from a barrier to a barrier, exchange included), the best of
``--repeats``, and the prompts generated in the whole job per step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ENGINES = ("hf", "vllm")
PLACEMENTS = ("duplicated", "split")


def _requests(data_file: str, prompts: int) -> list:
    from megatron_vlmr1.data import DataConfig, load_samples
    from megatron_vlmr1.rollout.base import RolloutRequest

    samples = load_samples(DataConfig(files=[data_file], task="rec", shuffle=False, max_samples=prompts))
    if len(samples) < prompts:
        raise ValueError(f"{data_file} has {len(samples)} prompts, --prompts asks for {prompts}")
    return [RolloutRequest(s.messages, list(s.image_paths)) for s in samples]


def _build_engine(engine: str, model: str, args: argparse.Namespace):
    from megatron_vlmr1.rollout.config import RolloutConfig, build_engine

    cfg = RolloutConfig(engine=engine, max_model_len=args.max_model_len, max_batch_size=args.prompts * args.group,
                        max_num_seqs=args.prompts * args.group,
                        sync_bucket_mb=args.sync_bucket_mb)
    return build_engine(cfg, model)


def measure(engine_name: str, model: str, data_file: str, args: argparse.Namespace) -> dict:
    """Rollout and sync timings of one engine (runs in the worker subprocess)."""
    import torch
    from safetensors.torch import load_file

    from megatron_vlmr1.rollout.base import SamplingConfig

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = _build_engine(engine_name, model, args)
    load_s = time.perf_counter() - start
    requests = _requests(data_file, args.prompts)
    sampling = SamplingConfig(n=args.group, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    engine.generate(requests[:1], SamplingConfig(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    best_rollout = None
    for repeat in range(args.repeats):
        start = time.perf_counter()
        results = engine.generate(requests, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.completion_ids) for r in results for c in r.completions)
        if best_rollout is None or tokens / seconds > best_rollout[0] / best_rollout[1]:
            best_rollout = (tokens, seconds)
    weights = load_file(str(Path(model) / "model.safetensors"))
    best_sync = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        synced = engine.update_weights(iter(weights.items()))
        seconds = time.perf_counter() - start
        best_sync = seconds if best_sync is None else min(best_sync, seconds)
    engine.close()
    tokens, seconds = best_rollout
    return {"engine": engine_name, "load_s": load_s, "rollout_tokens": tokens, "rollout_s": seconds,
            "tokens_per_s": tokens / seconds, "sync_gib": synced / 2**30, "sync_s": best_sync,
            "sync_s_per_gib": best_sync / (synced / 2**30)}


def _run_worker(engine: str, model: str, data_file: str, args: argparse.Namespace, out: Path) -> dict:
    options = {"--prompts": args.prompts, "--group": args.group, "--max-new-tokens": args.max_new_tokens,
               "--max-model-len": args.max_model_len, "--sync-bucket-mb": args.sync_bucket_mb,
               "--repeats": args.repeats, "--threads": args.threads, "--model": model, "--data": data_file,
               "--worker": engine, "--worker-out": out}
    command = [sys.executable, __file__, *(str(x) for item in options.items() for x in item)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def measure_placement(placement: str, model: str, data_file: str, args: argparse.Namespace) -> dict | None:
    """One torchrun rank of ``--tp`` mode: time the rollout phase under ``placement``; rank 0 returns the row."""
    import torch
    import torch.distributed as dist

    from megatron_vlmr1.rollout.base import SamplingConfig
    from megatron_vlmr1.rollout.config import RolloutConfig, build_engine
    from megatron_vlmr1.rollout.exchange import RolloutRouter
    from megatron_vlmr1.rollout.placement import RankCoord, prompt_seed

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rollout_tp = 1 if placement == "duplicated" else args.tp
    cfg = RolloutConfig(engine="vllm", max_model_len=args.max_model_len, max_num_seqs=args.prompts * args.group,
                        sync_bucket_mb=args.sync_bucket_mb)
    engine = build_engine(cfg, model, tp=rollout_tp, world_size=world)
    # one data-parallel replica (every rank trains on every prompt), ranks laid out as trainer TP x PP
    router = RolloutRouter(RankCoord(0, rank // args.tp, rank % args.tp), rollout_tp, None, 1, torch.device("cpu"))
    requests = _requests(data_file, args.prompts)
    sampling = SamplingConfig(n=args.group, temperature=1.0, max_new_tokens=args.max_new_tokens)
    engine.generate(requests[:1], SamplingConfig(n=1, temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    best, generated = None, 0
    for step in range(args.repeats):
        def generate(chunk, indices):
            return engine.generate(chunk, sampling, seeds=[prompt_seed(0, step, 0, i) for i in indices])

        dist.barrier()
        start = time.perf_counter()
        if placement == "duplicated":
            results = generate(requests, list(range(len(requests))))
            generated = len(requests) * world
        else:
            results = router.run_round(requests, generate)
            generated = router.last_plan.total
        dist.barrier()
        seconds = time.perf_counter() - start
        assert len(results) == len(requests)
        best = seconds if best is None else min(best, seconds)
    engine.close()
    if rank != 0:
        return None
    return {"placement": placement, "world": world, "rollout_tp": rollout_tp, "replicas": world // rollout_tp,
            "prompts_generated": generated, "rollout_s": best}


def _run_placement(placement: str, model: str, data_file: str, args: argparse.Namespace, out: Path) -> dict:
    options = {"--tp": args.tp, "--world": args.world, "--prompts": args.prompts, "--group": args.group,
               "--max-new-tokens": args.max_new_tokens, "--max-model-len": args.max_model_len,
               "--sync-bucket-mb": args.sync_bucket_mb, "--repeats": args.repeats, "--model": model,
               "--data": data_file, "--placement-worker": placement, "--worker-out": out}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.world), __file__,
               *(str(x) for item in options.items() for x in item)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{placement} ranks failed:\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def format_placement_table(rows: list[dict]) -> str:
    header = ("placement", "world", "rollout tp", "replicas", "prompts generated / step", "rollout s / step")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(f"{r['placement']} | {r['world']} | {r['rollout_tp']} | {r['replicas']} | "
                     f"{r['prompts_generated']} | {r['rollout_s']:.2f}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    header = ("engine", "load s", "tokens", "rollout s", "tokens/s", "sync GiB", "sync s", "sync s/GiB")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(f"{r['engine']} | {r['load_s']:.1f} | {r['rollout_tokens']} | {r['rollout_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['sync_gib']:.4f} | {r['sync_s']:.3f} | {r['sync_s_per_gib']:.1f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--model", help="HF checkpoint directory (default: a tiny Qwen2.5-VL built here)")
    parser.add_argument("--data", help="VLM-R1 jsonl (default: a synthetic REC set built here)")
    parser.add_argument("--sync-bucket-mb", type=float, default=512.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the transformers engine (vLLM's CPU backend binds its own)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--tp", type=int, help="measure the rollout placement at vLLM TP=N in its own torchrun ranks")
    parser.add_argument("--world", type=int, help="ranks of the --tp mode (default: --tp)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--placement-worker", choices=PLACEMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("prompts", "group", "max_new_tokens", "repeats", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.tp is not None:
        args.world = args.world or args.tp
        if args.tp < 1 or args.world % args.tp:
            parser.error(f"--tp {args.tp} must be >= 1 and divide --world {args.world}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(measure(args.worker, args.model, args.data, args)))
        return []
    if args.placement_worker:
        row = measure_placement(args.placement_worker, args.model, args.data, args)
        if row is not None:
            Path(args.worker_out).write_text(json.dumps(row))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tools.make_tiny_model import make_tiny_model

            # --tp: 2 KV heads, so vLLM TP=2 gives each rank its own
            heads = {"num_kv_heads": 2} if args.tp else {}
            model = str(make_tiny_model("qwen2_5_vl", Path(tmp) / "model", seed=0, **heads))
        data_file = args.data
        if data_file is None:
            from megatron_vlmr1.data.synthetic import make_rec_dataset

            data_file = str(make_rec_dataset(Path(tmp) / "data", max(args.prompts, 8), seed=0)["train"])
        if args.tp is not None:
            rows = [_run_placement(p, model, data_file, args, Path(tmp) / f"{p}.json") for p in PLACEMENTS]
        else:
            rows = [_run_worker(engine, model, data_file, args, Path(tmp) / f"{engine}.json")
                    for engine in args.engine]
    print(format_placement_table(rows) if args.tp is not None else format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
