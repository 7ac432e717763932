"""Throughput of a whole GRPO step on a random-weight Qwen2.5-VL of a named shape, one row per setting.

    python tools/bench_grpo.py [--shape tiny|29m|3b|7b|32b] [--engine hf vllm] [--shared-prefix false true]
        [--tp 1] [--pp 1] [--group-size 4] [--prompts 4] [--max-new-tokens 64] [--steps 2] [--warmup 1]
        [--repeats 1] [--mu 1] [--beta 0.04] [--micro-batch-size 4] [--dtype float32] [--device auto]
        [--threads 2] [--peak-tflops 989] [--difficulty easy|normal|locate] [--json OUT]

The model is built with transformers' Qwen2.5-VL classes and the tiny BPE tokenizer (``tools/make_tiny_model.py``,
so the vocabulary is the tokenizer's ~1.5k at every shape); the data are synthetic REC prompts (one image each,
``--difficulty`` of ``data/synthetic.py``: ``easy`` 112 px images, 16 image tokens; ``normal`` 112-224 px, 16-64).
Every setting (engine x shared prefix) runs in its own subprocess (``torchrun`` when TP*PP > 1), ``--warmup``
steps then ``--steps`` timed steps through ``GRPOTrainer.step``; with ``--repeats R`` the settings run
interleaved (A B A B ...) and each row reports the median step, so a noisy shared machine hits all settings alike.

Columns: mean prompt and completion tokens (the workload: prefix sharing saves more the longer the prompt);
s/step; each phase (sync, rollout, reward, micro-batch building, old/reference log-probs, update);
``train_fwd`` = old + reference log-probs + update (what shared-prefix packing changes); generated tokens/s
(completion tokens / rollout time); trained tokens/s (per-row-equivalent tokens, rows x (prompt + completion),
over the training-forward time, so the same work counts the same in both layouts); model TFLOPs per step and MFU
against ``--peak-tflops`` (H100/H200 dense bf16: 989).

FLOPs are estimated for the work each layout actually executes: 2 x (matmul parameters) per token forward, plus
attention 4 x layers x hidden x (keys attended) per token; the vision tower 2 x its parameters per patch; backward
counts twice the forward (update), log-prob passes are forward only; rollout counts one prefill of each prompt
plus one forward per generated token.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_vlmr1.data.synthetic import DIFFICULTIES  # noqa: E402

# Language model and vision tower sizes; 3b/7b/32b follow Qwen2.5-VL (vision MLP width simplified to 2 x hidden).
SHAPES: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256,
                 vision_depth=2, vision_hidden_size=128, vision_heads=2),
    "29m": dict(num_layers=8, hidden_size=384, num_heads=6, num_kv_heads=2, intermediate_size=1536,
                vision_depth=6, vision_hidden_size=384, vision_heads=6),
    "3b": dict(num_layers=36, hidden_size=2048, num_heads=16, num_kv_heads=2, intermediate_size=11008,
               vision_depth=32, vision_hidden_size=1280, vision_heads=16),
    "7b": dict(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, intermediate_size=18944,
               vision_depth=32, vision_hidden_size=1280, vision_heads=16),
    "32b": dict(num_layers=64, hidden_size=5120, num_heads=40, num_kv_heads=8, intermediate_size=27648,
                vision_depth=32, vision_hidden_size=1280, vision_heads=16),
}
PHASES = ("sync", "rollout", "reward", "micro_batches", "old_logprob", "ref_logprob", "update")
TRAIN_PHASES = ("old_logprob", "ref_logprob", "update")


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="29m")
    parser.add_argument("--engine", nargs="+", choices=("hf", "vllm"), default=["vllm"])
    parser.add_argument("--shared-prefix", nargs="+", type=parse_bool, default=[False, True])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mu", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; MFU is left out without it")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="easy",
                        help="synthetic REC images: easy 112 px (16 image tokens), normal 112-224 px (16-64)")
    parser.add_argument("--workdir", default=None, help="where the model and data go (default: a temp dir)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("tp", "pp", "group_size", "prompts", "max_new_tokens", "steps", "repeats", "mu", "micro_batch_size"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        raise ValueError("--group-size must be >= 2 (GRPO compares completions of one prompt)")
    return args


# -- FLOPs ------------------------------------------------------------------------------------------------------
def matmul_params(hf_config) -> tuple[int, int]:
    """(language-model matmul parameters incl. the LM head, vision-tower parameters) of a Qwen2.5-VL config."""
    text = getattr(hf_config, "text_config", hf_config)
    h, i, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    vision = hf_config.vision_config
    vh, vi = vision.hidden_size, vision.intermediate_size
    merge = vision.spatial_merge_size ** 2
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    # per patch: embedding, layers (qkv + proj + gated MLP), merger MLP (runs once per ``merge`` patches)
    vision_per_patch = patch_dim * vh + vision.depth * (4 * vh * vh + 3 * vh * vi)
    vision_per_patch += (merge * vh * merge * vh + merge * vh * vision.out_hidden_size) // merge
    return layers * per_layer + h * text.vocab_size, vision_per_patch


def attended_keys(prompt_len: int, completion_lens: list[int], shared: bool) -> int:
    """Keys every query of one group attends to (causal), summed: the attention work of the layout."""
    if not shared:
        return sum((prompt_len + c) * (prompt_len + c + 1) // 2 for c in completion_lens)
    head = prompt_len - 1
    return head * (head + 1) // 2 + sum(sum(head + j for j in range(1, c + 2)) for c in completion_lens)


def step_flops(groups: list[dict], hf_config, shared: bool, mu: int, beta: float) -> dict:
    """Forward FLOPs of one training-forward pass and of the rollout, for this step's groups."""
    lm, vision = matmul_params(hf_config)
    text = getattr(hf_config, "text_config", hf_config)
    attention = 4 * text.num_hidden_layers * text.hidden_size
    train = rollout = 0
    for group in groups:
        copies = 1 if shared else len(group["completions"])
        tokens = (group["prompt"] - 1 + sum(c + 1 for c in group["completions"]) if shared
                  else sum(group["prompt"] + c for c in group["completions"]))
        train += 2 * lm * tokens + attention * attended_keys(group["prompt"], group["completions"], shared)
        train += 2 * vision * group["patches"] * copies
        rollout += 2 * lm * (group["prompt"] + sum(group["completions"])) + 2 * vision * group["patches"]
        rollout += attention * attended_keys(group["prompt"], group["completions"], True)
    passes = 3 * mu + (1 if mu > 1 else 0) + (1 if beta > 0 else 0)  # update fwd+bwd per mu; old; reference
    return {"train": train * passes, "rollout": rollout}


# -- one setting (subprocess) -------------------------------------------------------------------------------------
def worker(args: argparse.Namespace, model_dir: str, data_file: str, engine: str, shared: bool) -> dict | None:
    import torch

    from megatron_vlmr1.config import from_dict
    from megatron_vlmr1.trainer.grpo import GRPORunConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    seen: list[dict] = []

    class Recording(GRPOTrainer):
        def build_micro_batches(self, batch, advantages):
            seen.clear()
            for result in batch.results:
                grid = result.prompt.image_grid_thw
                seen.append({"prompt": len(result.prompt.input_ids),
                             "completions": [len(c.completion_ids) for c in result.completions],
                             "patches": 0 if grid is None else int(grid.prod(-1).sum())})
            return super().build_micro_batches(batch, advantages)

    out = tempfile.mkdtemp(prefix="bench_grpo_")
    cfg = from_dict(GRPORunConfig, {
        "model": {"path": model_dir, "dtype": args.dtype},
        "parallel": {"tp": args.tp, "pp": args.pp, "device": args.device},
        "data": {"files": [data_file], "task": "rec"},
        "rollout": {"engine": engine, "max_batch_size": args.prompts * args.group_size,
                    "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}},
        "algo": {"group_size": args.group_size, "beta": args.beta, "mu": args.mu, "shared_prefix": shared},
        "rewards": [{"name": "format", "weight": 1.0}, {"name": "iou", "weight": 1.0}],
        "train": {"output_dir": out, "steps": args.warmup + args.steps, "prompts_per_step": args.prompts,
                  "micro_batch_size": args.micro_batch_size, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False},
    })
    trainer = Recording(cfg)
    try:
        steps = []
        for step in range(1, args.warmup + args.steps + 1):
            start = time.perf_counter()
            metrics = trainer.step(step)
            metrics["time/step"] = time.perf_counter() - start
            if step > args.warmup:
                flops = step_flops(seen, trainer.hf_config, shared, args.mu, args.beta)
                rows_tokens = sum(g["prompt"] * len(g["completions"]) + sum(g["completions"]) for g in seen)
                steps.append({"metrics": metrics, "flops": flops, "row_tokens": rows_tokens,
                              "generated": sum(sum(g["completions"]) for g in seen),
                              "prompt_tokens": statistics.mean(g["prompt"] for g in seen)})
        return steps if trainer.env.is_logging_rank else None
    finally:
        trainer.close()


def summarize(setting: dict, steps: list[dict], args: argparse.Namespace, devices: int) -> dict:
    """Median over the timed steps of every column."""
    median = lambda values: statistics.median(values)  # noqa: E731
    row = dict(setting)
    row["prompt_len"] = median([s["prompt_tokens"] for s in steps])
    row["completion_len"] = median([s["generated"] / (args.prompts * args.group_size) for s in steps])
    row["s_per_step"] = median([s["metrics"]["time/step"] for s in steps])
    for phase in PHASES:
        row[phase] = median([s["metrics"].get(f"time/{phase}", 0.0) for s in steps])
    row["train_fwd"] = median([sum(s["metrics"].get(f"time/{p}", 0.0) for p in TRAIN_PHASES) for s in steps])
    row["gen_tok_s"] = median([s["generated"] / s["metrics"]["time/rollout"] for s in steps])
    passes = args.mu + (args.mu > 1) + (args.beta > 0)
    row["train_tok_s"] = median([s["row_tokens"] * passes / max(
        sum(s["metrics"].get(f"time/{p}", 0.0) for p in TRAIN_PHASES), 1e-9) for s in steps])
    flops = [s["flops"]["train"] + s["flops"]["rollout"] for s in steps]
    row["tflops_per_step"] = median(flops) / 1e12
    if args.peak_tflops:
        row["mfu"] = median([f / s["metrics"]["time/step"] for f, s in zip(flops, steps)]) / (
            args.peak_tflops * 1e12 * devices)
    return row


def run_setting(args: argparse.Namespace, model_dir: str, data_file: str, engine: str, shared: bool) -> list[dict]:
    """One setting in a fresh subprocess (torchrun over TP*PP ranks); returns its timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "steps.json")
        script = [str(Path(__file__).resolve()), *sys.argv[1:], "--worker",
                  json.dumps({"model": model_dir, "data": data_file, "engine": engine, "shared": shared,
                              "out": result})]
        ranks = args.tp * args.pp
        command = ([sys.executable, *script] if ranks == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *script])
        subprocess.run(command, check=True)
        return json.loads(Path(result).read_text())


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    from megatron_vlmr1.data.synthetic import make_rec_dataset
    from tools.make_tiny_model import make_tiny_model

    model_dir = workdir / f"qwen2_5_vl_{args.shape}"
    if not (model_dir / "config.json").exists():
        make_tiny_model("qwen2_5_vl", model_dir, seed=0, **SHAPES[args.shape])
    data = workdir / f"data_{args.difficulty}"
    if not (data / "train.jsonl").exists():
        make_rec_dataset(data, max(64, args.prompts * (args.warmup + args.steps) * args.repeats), seed=0,
                         difficulty=args.difficulty)
    return str(model_dir), str(data / "train.jsonl")


def format_table(rows: list[dict]) -> str:
    columns = ["engine", "shared_prefix", "prompt_len", "completion_len", "s_per_step", *PHASES, "train_fwd",
               "gen_tok_s", "train_tok_s", "tflops_per_step", "mfu"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = [" | ".join(columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        steps = worker(args, job["model"], job["data"], job["engine"], job["shared"])
        if steps is not None:
            Path(job["out"]).write_text(json.dumps(steps))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        model_dir, data_file = prepare(args, workdir)
        settings = [{"engine": e, "shared_prefix": s, "tp": args.tp, "pp": args.pp}
                    for e in args.engine for s in args.shared_prefix]
        collected: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
        for _ in range(args.repeats):  # interleaved: every setting once per round
            for index, setting in enumerate(settings):
                steps = run_setting(args, model_dir, data_file, setting["engine"], setting["shared_prefix"])
                collected[index] += steps
                partial = summarize(setting, steps, args, args.tp * args.pp)  # a long run shows progress
                print(f"[bench_grpo] {setting}: {partial['s_per_step']:.3f} s/step, train_fwd "
                      f"{partial['train_fwd']:.3f} s, rollout {partial['rollout']:.3f} s", flush=True)
    rows = [summarize(setting, collected[i], args, args.tp * args.pp) for i, setting in enumerate(settings)]
    print(f"bench_grpo shape={args.shape} difficulty={args.difficulty} G={args.group_size} prompts={args.prompts} "
          f"max_new_tokens={args.max_new_tokens} steps={args.steps}x{args.repeats} (median; seconds)")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
