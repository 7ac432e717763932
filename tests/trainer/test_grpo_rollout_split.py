"""GRPO with vLLM at rollout.tp=2 in a world of 4 ranks: each prompt generated once, every training rank fed alike.

Two layouts, each two rollout replicas (ranks 0-1, 2-3): trainer TP=2 x PP=2 (one data-parallel replica, whose two
pipeline stages each host one rollout replica: results cross the pipeline) and TP=2 x DP=2 (each rollout replica
generates its own data-parallel shard). This module's ``__main__`` runs the trainer in each torchrun rank and records,
per step, a digest of the rollout results the rank trains on and how many prompts its engine generated. The TP x PP
run saves every step; a second run resumes from its step-1 checkpoint and must reproduce its step 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REWARD = "tests.trainer.test_grpo_vllm:text_length"


def _digest(results: list) -> str:
    rows = [(r.prompt_ids, [(c.completion_ids, c.logprobs, c.text) for c in r.completions]) for r in results]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _drive(config_path: str, out_path: str, *overrides: str) -> None:
    import torch.distributed as dist

    from megatron_vlmr1.config import load_config
    from megatron_vlmr1.trainer.grpo import GRPORunConfig, GRPOTrainer

    trainer = GRPOTrainer(load_config(GRPORunConfig, config_path, list(overrides)))
    record = {"rank": trainer.env.rank, "dp": trainer.env.dp_rank, "steps": {}}
    collect, generate = trainer.collect, trainer.engine.generate
    generated = []

    def counting_generate(requests, sampling, seeds=None):
        generated.append(len(requests))
        return generate(requests, sampling, seeds=seeds)

    def recording_collect(step, metrics):
        generated.clear()
        out = collect(step, metrics)
        record["steps"][step] = {"data": _digest(out.results), "generated": sum(generated)}
        return out

    trainer.collect, trainer.engine.generate = recording_collect, counting_generate
    try:
        trainer.fit()
    finally:
        trainer.close()
    Path(out_path, f"rank{record['rank']}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


def _launch(model: Path, data: Path, out: Path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    config = {
        "model": {"path": str(model)},
        "parallel": {"device": "cpu", "tp": 2},
        "data": {"files": [str(data)], "task": "rec"},
        "rollout": {"engine": "vllm", "tp": 2, "max_model_len": 256, "max_num_seqs": 8,
                    "sampling": {"max_new_tokens": 6}},
        "algo": {"group_size": 2, "beta": 0.0},
        "rewards": [{"name": REWARD, "weight": 1.0}],
        "optim": {"lr": 1e-2},
        "train": {"output_dir": str(out), "steps": 2, "prompts_per_step": 2, "micro_batch_size": 4,
                  "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m",
               "tests.trainer.test_grpo_rollout_split", str(out / "run.yaml"), str(out), *overrides]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-6000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def _check_split(records: list[dict], ranks: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in records] == steps
    for record in records:
        assert record["rollout_prompts_generated"] == 2, record  # = prompts_per_step: each prompt once
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert record["grad_norm"] > 0, record
    for step in steps:
        # the engines' own count: one generating rank per rollout replica (ranks 0 and 2)
        assert ranks[0]["steps"][str(step)]["generated"] + ranks[2]["steps"][str(step)]["generated"] == 2
        for rank in ranks:  # every rank of a data-parallel replica trains on the same results
            peer = next(r for r in ranks if r["dp"] == rank["dp"])
            assert rank["steps"][str(step)]["data"] == peer["steps"][str(step)]["data"]


def test_tp2_pp2_splits_prompts_over_stages_and_resume_reproduces(tiny_qwen2_5_vl_kv2, rec_data, tmp_path):
    records, ranks = _launch(tiny_qwen2_5_vl_kv2, rec_data, tmp_path / "full",
                             ["parallel.pp=2", "checkpoint.save_interval=1"])
    _check_split(records, ranks, [1, 2])
    assert {r["dp"] for r in ranks} == {0}
    # sync over the pipeline: each rank received its stage's missing shards and the TP halves, not the whole model
    assert all(0 < r["sync_bytes_moved_gib"] < r["sync_gib"] for r in records)
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000001", resumed / "step_00000001")
    (resumed / "latest").write_text("step_00000001")
    again, again_ranks = _launch(tiny_qwen2_5_vl_kv2, rec_data, tmp_path / "resumed", ["parallel.pp=2"])
    _check_split(again, again_ranks, [2])
    assert [r["steps"]["2"]["data"] for r in again_ranks] == [r["steps"]["2"]["data"] for r in ranks]
    for key in ("reward/mean", "pg_loss", "grad_norm"):
        assert again[0][key] == pytest.approx(records[1][key], rel=1e-5, abs=1e-7), key


def test_tp2_dp2_each_rollout_replica_generates_its_own_shard(tiny_qwen2_5_vl_kv2, rec_data, tmp_path):
    records, ranks = _launch(tiny_qwen2_5_vl_kv2, rec_data, tmp_path / "run", [])
    _check_split(records, ranks, [1, 2])
    assert [r["dp"] for r in ranks] == [0, 0, 1, 1]
    assert ranks[0]["steps"]["1"]["data"] != ranks[2]["steps"]["1"]["data"]  # two shards, two different batches


if __name__ == "__main__":
    _drive(*sys.argv[1:])
