"""GRPO through the megatron model with the transformers rollout engine."""
from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.trainer.conftest import grpo_config, run

CONTRACT_KEYS = {"step", "reward/mean", "reward/std", "reward/format", "reward/iou", "kl", "clip_frac", "entropy",
                 "completion_len/mean", "time/rollout", "time/reward", "time/update", "time/sync", "tokens_per_s",
                 "sync_gib", "sync_bytes_moved_gib", "rollout_prompts_generated", "rollout_logprob_gap", "grad_norm",
                 "lr"}


def _grpo():
    from megatron_vlmr1.trainer.grpo import GRPOTrainer

    return GRPOTrainer


def test_grpo_logs_the_contract_and_trainer_matches_rollout_logprobs(tiny_qwen2_5_vl, rec_data, tmp_path):
    records = run(_grpo(), grpo_config(tiny_qwen2_5_vl, rec_data, tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert CONTRACT_KEYS <= record.keys(), CONTRACT_KEYS - record.keys()
        # the megatron model re-scores the HF engine's samples: same weights, same numbers
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert 0 < record["completion_len/mean"] <= 12
        assert record["rollout_prompts_generated"] == 2 and record["sync_bytes_moved_gib"] == 0.0  # one rank
    # step 1: policy == reference, so every KL estimate is exactly zero; on-policy ratios are exactly 1
    assert records[0]["kl"] == 0.0 and records[0]["ratio_mean"] == 1.0 and records[0]["clip_frac"] == 0.0
    assert (tmp_path / "reward_curve.png").exists()
    # box_space: auto resolves to Qwen2.5-VL's convention and the saved config holds the resolved value
    assert "box_space: resized" in (tmp_path / "config.yaml").read_text()


def test_grpo_mu_and_dynamic_sampling(tiny_qwen2_5_vl, rec_data, tmp_path):
    records = run(_grpo(), grpo_config(tiny_qwen2_5_vl, rec_data, tmp_path,
                                       algo={"mu": 2, "beta": 0.0, "dynamic_sampling": True,
                                             "dynamic_sampling_max_rounds": 2},
                                       rewards=[{"name": "repetition", "weight": 1.0}],
                                       rollout={"sampling": {"max_new_tokens": 8}}))
    assert len(records) == 2
    for record in records:
        assert record.get("skipped_no_signal") or record["ratio_max"] >= 1.0


def test_group_size_one_is_rejected(tiny_qwen2_5_vl, rec_data, tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        grpo_config(tiny_qwen2_5_vl, rec_data, tmp_path, algo={"group_size": 1})


def _parallel_grpo(rank, world_size, model, data, out, tp):
    from pathlib import Path

    records = run(_grpo(), grpo_config(Path(model), Path(data), Path(out), parallel={"tp": tp, "device": "cpu"}))
    return [(r["reward/mean"], r["pg_loss"], r["kl"], r["grad_norm"], r["rollout_prompts_generated"])
            for r in records]


def test_tensor_parallel_grpo_reproduces_single_rank(tiny_qwen2_5_vl_kv2, rec_data, tmp_path):
    single = run(_grpo(), grpo_config(tiny_qwen2_5_vl_kv2, rec_data, tmp_path / "single", parallel={"device": "cpu"}))
    results = run_distributed(_parallel_grpo, 2, str(tiny_qwen2_5_vl_kv2), str(rec_data), str(tmp_path / "tp2"), 2)
    # the two ranks split the step's prompts (each generated once, with its own seed) and share the results
    for (reward, pg_loss, kl, grad_norm, generated), ref in zip(results[0], single):
        assert generated == ref["rollout_prompts_generated"] == 2
        assert reward == pytest.approx(ref["reward/mean"], abs=1e-6)
        assert pg_loss == pytest.approx(ref["pg_loss"], abs=1e-5)
        assert kl == pytest.approx(ref["kl"], abs=1e-6)
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4, abs=1e-6)


def test_resized_size_follows_the_target_image():
    from types import SimpleNamespace

    from megatron_vlmr1.trainer.grpo import resized_size
    from megatron_vlmr1.vlm.qwen_vl.processor import ImageGeometry

    result = SimpleNamespace(images=[ImageGeometry((100, 200), (112, 224)), ImageGeometry((50, 60), (56, 56))])
    assert resized_size(SimpleNamespace(extra={}), result) == [224, 112]          # (w, h) of image 0
    assert resized_size(SimpleNamespace(extra={"target_image": 1}), result) == [56, 56]
    assert resized_size(SimpleNamespace(extra={}), SimpleNamespace(images=[])) is None


@pytest.mark.slow
def test_shared_prefix_grpo_matches_per_row(tiny_qwen2_5_vl, rec_data, tmp_path):
    """Three GRPO steps (old + reference log-probs, two micro-batches) give the same losses and grad norms
    (frozen vision and LoRA are covered by tests/trainer/test_shared_prefix_parity.py)."""
    runs = {}
    for shared in (False, True):
        runs[shared] = run(_grpo(), grpo_config(
            tiny_qwen2_5_vl, rec_data, tmp_path / str(shared),
            algo={"group_size": 4, "beta": 0.04, "mu": 2, "shared_prefix": shared},
            train={"output_dir": str(tmp_path / str(shared)), "steps": 3, "prompts_per_step": 2,
                   "micro_batch_size": 4, "tensorboard": False, "progress_bar": False}))
    assert len(runs[False]) == len(runs[True]) == 3
    for per_row, shared in zip(runs[False], runs[True]):
        assert shared["rollout_tokens"] == per_row["rollout_tokens"]
        for key in ("pg_loss", "kl", "grad_norm", "entropy", "ratio_mean"):
            assert shared[key] == pytest.approx(per_row[key], rel=1e-5, abs=1e-7), key
        # the engine-vs-trainer log-prob gap is float32 rounding (~1e-7) either way; the two layouts' attention
        # kernels round differently, so it agrees only to the rounding level
        assert shared["rollout_logprob_gap"] == pytest.approx(per_row["rollout_logprob_gap"], abs=1e-6)
