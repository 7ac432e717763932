"""Will this GRPO config fit? Per-rank GPU memory of each phase, step time and checkpoint estimates, before a run.

    python tools/plan_memory.py --config examples/configs/grpo_32b.yaml --nodes 4 --gpus-per-node 8 --gpu-gib 80
    python tools/plan_memory.py --config FILE --nodes N --gpus-per-node G --gpu-gib M --model-config HF_DIR [k=v ...]

Per pipeline stage (the TP ranks of a stage hold the same amounts) and per phase of a GRPO step:

- rollout: trainer weights + gradient buffer + optimizer state + reference model + vLLM's share of the GPU
  (``rollout.gpu_memory_utilization``: its weights at rollout TP, the rest KV cache);
- log-prob: the trainer's static state + one layer's forward working set + the last stage's logits (vLLM asleep with
  ``rollout.vllm_sleep``, else still holding its share);
- update: the static state + the activations 1F1B keeps in flight (stage p holds min(PP - p, micro-batches)
  micro-batches; ``parallel.recompute=full`` keeps only each layer's input) + logits.

Static terms mirror what the trainer allocates: bf16/fp32 weights; megatron DDP's fp32 gradient buffer for the
trainable parameters; Adam (fp32 master copy unless the model is fp32, two fp32 moments) divided over data-parallel
ranks by the distributed optimizer; a full reference model unless ``algo.beta`` is 0 or LoRA (adapters off) serves
as reference. The vision tower is a transformers module, replicated on every TP rank of the first stage. Activations
assume flash attention (no s x s scores; so ``selective``, which recomputes the attention core, saves little) and
the longest sequence ``rollout.max_model_len``. Exit status 1 names the stage, phase and largest term that do not
fit. Model shapes: ``--model-config`` (an HF directory) or the built-in table ``SHAPES``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The shapes that size a Qwen-VL model; ``vision_params`` is the whole vision tower (with its merger)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vision_params: int
    tied: bool = False


def qwen25_vision_params(depth: int, hidden: int, intermediate: int, out_hidden: int, patch: int = 14,
                         temporal_patch: int = 2, in_channels: int = 3, merge: int = 2) -> int:
    """Qwen2.5-VL vision tower: conv patch embed, ``depth`` blocks (fused qkv + proj with bias, SwiGLU MLP with
    bias, two RMSNorms) and the patch merger (RMSNorm + two linears with bias)."""
    block = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) \
        + 2 * (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + 2 * hidden
    merged = hidden * merge * merge
    merger = hidden + (merged * merged + merged) + (merged * out_hidden + out_hidden)
    return in_channels * temporal_patch * patch * patch * hidden + depth * block + merger


# The one place model shapes are written down (from the published HF configs).
SHAPES = {
    "qwen2.5-vl-32b": ModelShapes("Qwen2.5-VL-32B", hidden=5120, layers=64, heads=40, kv_heads=8, head_dim=128,
                                  intermediate=27648, vocab=152064,
                                  vision_params=qwen25_vision_params(32, 1280, 3456, 5120)),
    "qwen2.5-vl-7b": ModelShapes("Qwen2.5-VL-7B", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                                 intermediate=18944, vocab=152064,
                                 vision_params=qwen25_vision_params(32, 1280, 3420, 3584)),
}
DEFAULT_MODEL = "qwen2.5-vl-32b"


def shapes_from_hf(path: str | Path) -> ModelShapes:
    """Shapes of an HF Qwen-VL checkpoint directory; the vision tower is counted exactly on the meta device."""
    import torch
    from transformers import AutoConfig

    from megatron_vlmr1.vlm.qwen_vl.model import hf_config_text, vision_class

    config = AutoConfig.from_pretrained(str(path))
    text = hf_config_text(config)
    with torch.device("meta"):
        tower = vision_class(config.model_type)._from_config(config.vision_config)
    heads = text.num_attention_heads
    return ModelShapes(
        name=Path(path).name, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=text.num_key_value_heads or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, intermediate=text.intermediate_size,
        vocab=text.vocab_size, vision_params=sum(p.numel() for p in tower.parameters()),
        tied=bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)),
    )


# -- parameters per rank ------------------------------------------------------------------------------------------
def query_groups(shapes: ModelShapes, tp: int) -> int:
    """KV heads as megatron holds them: repeated up to TP when TP exceeds them (as the trainer's layout does)."""
    if shapes.kv_heads % tp == 0:
        return shapes.kv_heads
    if tp % shapes.kv_heads == 0:
        return tp
    raise ValueError(f"num_key_value_heads={shapes.kv_heads} and parallel.tp={tp}: one must divide the other")


def padded_vocab(shapes: ModelShapes, divisible_by: int = 128) -> int:
    return -(-shapes.vocab // divisible_by) * divisible_by


def layer_params(shapes: ModelShapes, tp: int) -> int:
    """One decoder layer on one TP rank: sharded qkv (+bias), proj, SwiGLU fc1/fc2; replicated RMSNorms."""
    h, hd = shapes.hidden, shapes.head_dim
    qkv_out = (shapes.heads + 2 * query_groups(shapes, tp)) * hd
    return (qkv_out * h + qkv_out) // tp + h * shapes.heads * hd // tp + 3 * shapes.intermediate * h // tp + 2 * h


def lora_layer_params(shapes: ModelShapes, tp: int, rank: int, targets: list[str]) -> int:
    """LoRA adapters of one layer on one TP rank (column-parallel: B sharded; row-parallel: A sharded)."""
    h, hd, r = shapes.hidden, shapes.head_dim, rank
    qkv_out = (shapes.heads + 2 * query_groups(shapes, tp)) * hd
    sizes = {"linear_qkv": r * h + qkv_out // tp * r, "linear_proj": r * shapes.heads * hd // tp + h * r,
             "linear_fc1": r * h + 2 * shapes.intermediate // tp * r, "linear_fc2": r * shapes.intermediate // tp + h * r}
    return sum(sizes[t] for t in targets)


@dataclasses.dataclass(frozen=True)
class StageParams:
    total: int       # parameters held by one TP rank of this stage
    trainable: int   # of which the optimizer updates
    layers: int


def stage_params(shapes: ModelShapes, tp: int, pp: int, stage: int, train_mode: str = "full",
                 lora_rank: int = 8, lora_targets: list[str] | None = None) -> StageParams:
    """What the trainer's megatron model holds on one rank of pipeline stage ``stage``."""
    if shapes.layers % pp:
        raise ValueError(f"parallel.pp={pp} does not divide the {shapes.layers} layers")
    if shapes.heads % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the {shapes.heads} attention heads")
    layers = shapes.layers // pp
    vocab_shard = padded_vocab(shapes) * shapes.hidden // tp
    first, last = stage == 0, stage == pp - 1
    total = layers * layer_params(shapes, tp)
    vision = shapes.vision_params if first else 0
    total += vision + (vocab_shard if first else 0)
    if last:
        total += shapes.hidden  # final norm
        if not shapes.tied or pp > 1:  # untied head, or the last stage's copy of tied embeddings
            total += vocab_shard
    if train_mode == "lora":
        trainable = layers * lora_layer_params(shapes, tp, lora_rank, lora_targets or
                                               ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
        total += trainable
    else:
        trainable = total - (vision if train_mode == "freeze_vision" else 0)
    return StageParams(total=total, trainable=trainable, layers=layers)


def all_params(shapes: ModelShapes) -> int:
    """The whole model (HF count: unpadded vocabulary, one vision tower)."""
    emb = shapes.vocab * shapes.hidden
    return shapes.layers * layer_params(shapes, 1) + shapes.vision_params + emb * (1 if shapes.tied else 2) \
        + shapes.hidden


def static_bytes(params: StageParams, dtype: str, dp: int, distributed_optimizer: bool = True) -> dict[str, int]:
    """Weights, megatron DDP's fp32 gradient buffer, Adam state (fp32 master copy unless fp32 weights, two fp32
    moments), sharded over data-parallel ranks by the distributed optimizer."""
    weight = DTYPE_BYTES[dtype]
    per_param_optim = 8 + (0 if dtype == "float32" else 4)
    optimizer = params.trainable * per_param_optim
    return {"weights": params.total * weight, "grads": params.trainable * 4,
            "optimizer": -(-optimizer // dp) if distributed_optimizer else optimizer}


# -- activations ----------------------------------------------------------------------------------------------------
def layer_activation_elements(shapes: ModelShapes, tp: int, seq: int, micro_batch: int) -> int:
    """Elements one decoder layer keeps for backward for one micro-batch (flash attention: no s x s scores): the
    two norm inputs and two linear inputs [s,b,h] (replicated over TP), q/k/v and the attention context, the SwiGLU
    fc1 output (2F) and activation output (F), sharded over TP."""
    sb = seq * micro_batch
    qkv_out = (shapes.heads + 2 * query_groups(shapes, tp)) * shapes.head_dim
    return 4 * sb * shapes.hidden + sb * (qkv_out + shapes.heads * shapes.head_dim + 3 * shapes.intermediate) // tp


def update_activation_bytes(shapes: ModelShapes, tp: int, pp: int, stage: int, layers: int, seq: int,
                            micro_batch: int, micro_batches: int, recompute: str, act_bytes: int) -> int:
    """What 1F1B keeps alive on ``stage``: min(PP - stage, micro-batches) micro-batches in flight, each with every
    layer's saved activations, or with ``full`` recompute each layer's input plus one layer's working set."""
    in_flight = min(pp - stage, micro_batches)
    per_layer = layer_activation_elements(shapes, tp, seq, micro_batch) * act_bytes
    if recompute == "full":
        return in_flight * layers * seq * micro_batch * shapes.hidden * act_bytes + per_layer
    return in_flight * layers * per_layer


def logits_bytes(shapes: ModelShapes, tp: int, seq: int, micro_batch: int, act_bytes: int) -> int:
    """The last stage's vocabulary-parallel logits of one micro-batch and the fp32 log-prob/gradient work."""
    return seq * micro_batch * padded_vocab(shapes) // tp * (act_bytes + 4)


def kv_bytes_per_token(shapes: ModelShapes, rollout_tp: int, kv_bytes: int = 2) -> int:
    """vLLM's K and V for one token on one rank of a rollout TP group (KV heads replicated when TP exceeds them)."""
    heads = max(shapes.kv_heads // rollout_tp, 1)
    return 2 * shapes.layers * heads * shapes.head_dim * kv_bytes


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Assumptions:
    reserve_gib: float = 4.0           # CUDA context, NCCL buffers, allocator fragmentation
    vllm_overhead_gib: float = 2.0     # vLLM's activations/sampler inside its share
    prompt_tokens: int = 512           # mean prompt length (text + image tokens) for the time estimates
    completion_tokens: int | None = None   # default rollout.sampling.max_new_tokens (worst case)
    peak_tflops: float = 989.0         # H100/H200 dense bf16
    mfu: float = 0.35
    hbm_gbps: float = 3350.0
    hbm_efficiency: float = 0.6        # share of peak HBM bandwidth a decode step achieves
    fs_gbps_per_node: float = 2.0      # checkpoint write bandwidth per node
    sync_gbps: float = 50.0            # trainer -> vLLM weight streaming


@dataclasses.dataclass
class StagePlan:
    stage: int
    terms: dict[str, int]                  # bytes per term
    phases: dict[str, list[str]]           # phase -> the terms it holds at its peak

    def phase_bytes(self, phase: str) -> int:
        return sum(self.terms[t] for t in self.phases[phase])


@dataclasses.dataclass
class Plan:
    summary: str
    gpu_bytes: int
    stages: list[StagePlan]
    times: dict[str, float]
    checkpoint_bytes: int
    checkpoint_s: float
    notes: list[str]

    def failures(self) -> list[str]:
        out = []
        for stage in self.stages:
            for phase in stage.phases:
                need = stage.phase_bytes(phase)
                if need > self.gpu_bytes:
                    largest = max(stage.phases[phase], key=lambda t: stage.terms[t])
                    out.append(f"stage {stage.stage}, {phase} phase: {need / GIB:.1f} GiB > {self.gpu_bytes / GIB:.0f} "
                               f"GiB; largest term: {largest} ({stage.terms[largest] / GIB:.1f} GiB)")
        for stage in self.stages:
            if stage.terms["vLLM KV cache"] < 0:
                out.append(f"stage {stage.stage}: vLLM KV cache: rollout.gpu_memory_utilization leaves "
                           f"{stage.terms['vLLM KV cache'] / GIB:.1f} GiB after vLLM's weights")
        return out


def make_plan(cfg: Any, shapes: ModelShapes, nodes: int, gpus_per_node: int, gpu_gib: float,
              assumptions: Assumptions | None = None) -> Plan:
    a = assumptions or Assumptions()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise ValueError(f"{nodes} x {gpus_per_node} = {world} GPUs is not a multiple of parallel.tp x parallel.pp = "
                         f"{tp * pp}")
    dp = world // (tp * pp)
    notes = []
    rollout_tp = getattr(cfg.rollout, "tp", None)
    if rollout_tp is None:
        rollout_tp = tp
        notes.append("rollout.tp is not in this tree's RolloutConfig: assumed rollout TP = parallel.tp")
    if world % rollout_tp:
        raise ValueError(f"rollout TP {rollout_tp} does not divide the world size {world}")
    group = cfg.algo.group_size
    prompts = cfg.train.prompts_per_step
    if prompts % dp:
        raise ValueError(f"train.prompts_per_step={prompts} is not divisible by the data-parallel size {dp}")
    sequences = prompts // dp * group
    micro_batch = cfg.train.micro_batch_size
    micro_batches = -(-sequences // micro_batch)
    seq = cfg.rollout.max_model_len
    dtype = cfg.model.dtype
    act_bytes = DTYPE_BYTES[dtype]
    lora = cfg.model.train_mode == "lora"
    reference_on = cfg.algo.beta > 0 and not lora
    vllm_share = int(cfg.rollout.gpu_memory_utilization * gpu_gib * GIB) if cfg.rollout.engine == "vllm" else 0
    vllm_weights = all_params(shapes) * 2 // rollout_tp if vllm_share else 0
    asleep = cfg.rollout.vllm_sleep and cfg.parallel.device != "cpu"

    stages = []
    for stage in range(pp):
        params = stage_params(shapes, tp, pp, stage, cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_targets)
        terms = static_bytes(params, dtype, dp, cfg.parallel.distributed_optimizer)
        terms["reference"] = params.total * act_bytes if reference_on else 0
        terms["activations (update)"] = update_activation_bytes(
            shapes, tp, pp, stage, params.layers, seq, micro_batch, micro_batches, cfg.parallel.recompute, act_bytes)
        terms["activations (log-prob)"] = layer_activation_elements(shapes, tp, seq, micro_batch) * act_bytes
        terms["logits"] = logits_bytes(shapes, tp, seq, micro_batch, act_bytes) if stage == pp - 1 else 0
        terms["vLLM weights"] = vllm_weights
        terms["vLLM KV cache"] = vllm_share - vllm_weights - int(a.vllm_overhead_gib * GIB) if vllm_share else 0
        terms["vLLM other"] = int(a.vllm_overhead_gib * GIB) if vllm_share else 0
        terms["reserve"] = int(a.reserve_gib * GIB)
        static = ["weights", "grads", "optimizer", "reference"]
        vllm = ["vLLM weights", "vLLM KV cache", "vLLM other"]
        idle_vllm = [] if asleep else vllm
        stages.append(StagePlan(stage, terms, {
            "rollout": static + vllm + ["reserve"],
            "log-prob": static + ["activations (log-prob)", "logits"] + idle_vllm + ["reserve"],
            "update": static + ["activations (update)", "logits"] + idle_vllm + ["reserve"],
        }))

    # -- time (order of magnitude: what dominates a step, not a benchmark) --
    completion = a.completion_tokens or cfg.rollout.sampling.max_new_tokens
    tokens = prompts * group * min(a.prompt_tokens + completion, seq)
    lm_params = all_params(shapes) - shapes.vision_params
    flops_rate = world * a.peak_tflops * 1e12 * a.mfu
    bubble = 1 + (pp - 1) / micro_batches
    recompute_factor = 4 / 3 if cfg.parallel.recompute == "full" else 1.0
    update_s = cfg.algo.mu * 6 * lm_params * tokens * recompute_factor / flops_rate * bubble
    logprob_s = ((cfg.algo.mu > 1) + reference_on) * 2 * lm_params * tokens / flops_rate * bubble
    replicas = world // rollout_tp
    per_replica = prompts * group / replicas
    kv_tokens = max(stages[0].terms["vLLM KV cache"], 0) // kv_bytes_per_token(shapes, rollout_tp) if vllm_share else 0
    concurrency = max(1, min(cfg.rollout.max_batch_size, kv_tokens // max(a.prompt_tokens + completion, 1)))
    waves = math.ceil(per_replica / concurrency)
    # a decode step reads this rank's weights and the KV cache of every running sequence (half-finished on average)
    kv_read = concurrency * (a.prompt_tokens + completion / 2) * kv_bytes_per_token(shapes, rollout_tp)
    decode_iter_s = (all_params(shapes) * 2 / rollout_tp + kv_read) / (a.hbm_gbps * 1e9 * a.hbm_efficiency)
    prefill_s = 2 * lm_params * per_replica * a.prompt_tokens / (rollout_tp * a.peak_tflops * 1e12 * a.mfu)
    rollout_s = waves * completion * decode_iter_s + prefill_s
    sync_s = all_params(shapes) * 2 / (a.sync_gbps * 1e9)
    times = {"rollout": rollout_s, "sync": sync_s, "log-prob": logprob_s, "update": update_s}
    times["step"] = sum(times.values())

    total = all_params(shapes)
    if lora:
        trainable = shapes.layers * lora_layer_params(shapes, 1, cfg.model.lora_rank, cfg.model.lora_targets)
    else:
        trainable = total - (shapes.vision_params if cfg.model.train_mode == "freeze_vision" else 0)
    checkpoint = total * DTYPE_BYTES[dtype] + trainable * (8 + (0 if dtype == "float32" else 4))
    checkpoint_s = checkpoint / (nodes * a.fs_gbps_per_node * 1e9)

    summary = (f"{shapes.name} ({total / 1e9:.2f}B params, {cfg.model.dtype}, {cfg.model.train_mode}) on {nodes} x "
               f"{gpus_per_node} GPUs x {gpu_gib:g} GiB: TP={tp} PP={pp} DP={dp}, rollout TP={rollout_tp} "
               f"({replicas} replicas), recompute={cfg.parallel.recompute}, reference="
               f"{'model' if reference_on else 'none'}, seq {seq}, micro-batch {micro_batch} x {micro_batches} per "
               f"update, vLLM sleep={'on' if asleep else 'off'}")
    notes.append(f"rollout: up to {concurrency} sequences at once per replica ({kv_tokens} KV tokens), "
                 f"{waves} wave(s) of {completion} tokens")
    return Plan(summary, int(gpu_gib * GIB), stages, times, checkpoint, checkpoint_s, notes)


def format_plan(plan: Plan) -> str:
    """A markdown table: terms and phase peaks (GiB) per pipeline stage, then times and the checkpoint."""
    names = [f"stage {s.stage}" for s in plan.stages]
    lines = [plan.summary, "", "| GiB per rank | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for term in plan.stages[0].terms:
        lines.append(f"| {term} | " + " | ".join(f"{s.terms[term] / GIB:.1f}" for s in plan.stages) + " |")
    for phase in plan.stages[0].phases:
        cells = []
        for s in plan.stages:
            need = s.phase_bytes(phase)
            cells.append(f"**{need / GIB:.1f}**" + ("" if need <= plan.gpu_bytes else " (over)"))
        lines.append(f"| **{phase} peak** | " + " | ".join(cells) + " |")
    t = plan.times
    lines += ["", f"step time ~ {t['step']:.0f} s: rollout {t['rollout']:.0f} s, weight sync {t['sync']:.0f} s, "
                  f"log-prob {t['log-prob']:.0f} s, update {t['update']:.0f} s",
              f"checkpoint ~ {plan.checkpoint_bytes / 1e9:.0f} GB, ~ {plan.checkpoint_s:.0f} s to write"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megatron_vlmr1.config import load_config
    from megatron_vlmr1.trainer.grpo import GRPORunConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="GRPO YAML config")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-gib", type=float, required=True, help="memory of one GPU in GiB")
    parser.add_argument("--model-config", help="HF checkpoint directory (default: the built-in shapes)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(SHAPES), help="built-in shapes")
    for field in dataclasses.fields(Assumptions):
        parser.add_argument("--" + field.name.replace("_", "-"), type=float, default=None,
                            help=f"assumption (default {field.default})")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.recompute=full")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(GRPORunConfig, args.config, args.overrides)
        shapes = shapes_from_hf(args.model_config) if args.model_config else SHAPES[args.model]
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)
                 if getattr(args, f.name) is not None}
        for key in ("prompt_tokens", "completion_tokens"):
            if key in given:
                given[key] = int(given[key])
        plan = make_plan(cfg, shapes, args.nodes, args.gpus_per_node, args.gpu_gib, Assumptions(**given))
    except ValueError as err:
        print(f"plan_memory: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    failures = plan.failures()
    for failure in failures:
        print(f"DOES NOT FIT: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
