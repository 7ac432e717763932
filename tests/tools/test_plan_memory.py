"""tools/plan_memory.py: its static terms equal the tensor bytes of a real TP=2 x PP=2 actor; hand-checked formulas;
the shipped 32B config fits 4 x 8 x 80 GiB and a config that cannot fit names its term."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tools import plan_memory
from tools.plan_memory import ModelShapes, layer_activation_elements, layer_params, stage_params, static_bytes

REPO = Path(__file__).resolve().parents[2]
CONFIG_32B = REPO / "examples" / "configs" / "grpo_32b.yaml"


def _real_static_bytes(rank, world_size, model_dir):
    """Build the actor as the trainer does (bf16, frozen vision, distributed optimizer) and sum its tensors."""
    import torch
    from transformers import AutoConfig

    from megatron_vlmr1.trainer.config import ModelConfig, OptimConfig, ParallelConfig
    from megatron_vlmr1.parallel import init_parallel
    from megatron_vlmr1.trainer.policy import ActorModel
    from megatron_vlmr1.vlm.families import get_family

    env = init_parallel(ParallelConfig(tp=2, pp=2, device="cpu"), seed=0)
    hf_config = AutoConfig.from_pretrained(model_dir)
    actor = ActorModel(get_family(hf_config), hf_config, model_dir, env,
                       ModelConfig(path=model_dir, dtype="bfloat16", train_mode="freeze_vision"), OptimConfig(),
                       total_steps=1)
    actor.init_optimizer_state()
    params = list(actor.module.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params if p.requires_grad)
    optimizer = 0
    for inner in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        for group in inner.optimizer.param_groups:
            for main in group["params"]:  # fp32 master shards of the bf16 weights
                assert main.dtype == torch.float32
                optimizer += main.numel() * main.element_size()
                state = inner.optimizer.state[main]
                optimizer += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    from megatron_vlmr1.parallel import destroy_parallel

    destroy_parallel()
    # tensors held in another dtype than the model's bf16 (the planner counts every weight at 2 bytes)
    other_dtype = {n: (p.numel(), p.element_size()) for n, p in actor.module.named_parameters()
                   if p.dtype != torch.bfloat16}
    return env.pp_rank, env.tp_rank, {"weights": weights, "grads": grads, "optimizer": optimizer}, \
        sum(p.numel() for p in params), other_dtype


def test_static_terms_match_a_real_tp2_pp2_actor(tiny_qwen2_5_vl_kv2):
    shapes = plan_memory.shapes_from_hf(tiny_qwen2_5_vl_kv2)
    results = run_distributed(_real_static_bytes, 4, str(tiny_qwen2_5_vl_kv2))
    assert sorted((r[0], r[1]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for pp_rank, _, real, numel, other_dtype in results:
        params = stage_params(shapes, tp=2, pp=2, stage=pp_rank, train_mode="freeze_vision")
        planned = static_bytes(params, "bfloat16", dp=1)
        assert params.total == numel, (pp_rank, params.total, numel)
        assert (planned["grads"], planned["optimizer"]) == (real["grads"], real["optimizer"]), (pp_rank, planned, real)
        extra = sum(n * (size - 2) for n, size in other_dtype.values())
        assert planned["weights"] + extra == real["weights"], (pp_rank, planned, real, other_dtype)
        # megatron's local-backend norms keep fp32 weights (h per norm: negligible at 32B, visible in a tiny model)
        assert all("layernorm" in name for name in other_dtype), other_dtype


SMALL = ModelShapes("hand", hidden=8, layers=4, heads=4, kv_heads=2, head_dim=2, intermediate=16, vocab=100,
                    vision_params=1000)


def test_layer_and_stage_counts_by_hand():
    # qkv out = (4 + 2*2) * 2 = 16: weight 16*8 + bias 16 = 144; proj 8*8 = 64; fc1+fc2 3*16*8 = 384; norms 16
    assert layer_params(SMALL, 1) == 144 + 64 + 384 + 16
    # TP=2 shards all but the norms
    assert layer_params(SMALL, 2) == (144 + 64 + 384) // 2 + 16
    # stage 0 of PP=2: 2 layers + vision tower + embedding (vocab padded to 128) / TP
    first = stage_params(SMALL, tp=2, pp=2, stage=0, train_mode="freeze_vision")
    assert first.total == 2 * layer_params(SMALL, 2) + 1000 + 128 * 8 // 2
    assert first.trainable == first.total - 1000
    last = stage_params(SMALL, tp=2, pp=2, stage=1)
    assert last.total == last.trainable == 2 * layer_params(SMALL, 2) + 8 + 128 * 8 // 2
    # bf16: weights 2 B, fp32 grads 4 B, Adam master + two moments 12 B over DP=2
    assert static_bytes(last, "bfloat16", dp=2) == {"weights": 2 * last.total, "grads": 4 * last.total,
                                                    "optimizer": 12 * last.total // 2}
    # s=10, b=1: 4*s*h + s*(16 + 8 + 3*16) / TP
    assert layer_activation_elements(SMALL, tp=1, seq=10, micro_batch=1) == 4 * 10 * 8 + 10 * (16 + 8 + 48)


def test_builtin_32b_shapes_count_the_published_size():
    total = plan_memory.all_params(plan_memory.SHAPES["qwen2.5-vl-32b"])
    assert 33.2e9 < total < 33.7e9  # Qwen2.5-VL-32B-Instruct: 33.5B parameters


def test_shipped_32b_config_fits_and_a_small_gpu_names_the_term(capsys):
    argv = ["--config", str(CONFIG_32B), "--nodes", "4", "--gpus-per-node", "8"]
    assert plan_memory.main(argv + ["--gpu-gib", "80"]) == 0
    table = capsys.readouterr().out
    assert "| **update peak** |" in table and "(over)" not in table
    assert plan_memory.main(argv + ["--gpu-gib", "40", "rollout.gpu_memory_utilization=0.3"]) == 1
    err = capsys.readouterr().err
    assert "DOES NOT FIT: stage 0, update phase" in err and "largest term: activations (update)" in err
    assert plan_memory.main(argv + ["--gpu-gib", "80", "parallel.pp=3"]) == 2  # 32 GPUs are not a multiple of 24


@pytest.mark.parametrize("mode,ratio", [("full", 0.2), ("none", 1.0)])
def test_full_recompute_keeps_only_layer_inputs(mode, ratio):
    full = plan_memory.update_activation_bytes(SMALL, 1, 1, 0, layers=4, seq=10, micro_batch=1, micro_batches=1,
                                               recompute=mode, act_bytes=2)
    per_layer = layer_activation_elements(SMALL, 1, 10, 1) * 2
    if mode == "none":
        assert full == 4 * per_layer
    else:
        assert full == 4 * 10 * 8 * 2 + per_layer
