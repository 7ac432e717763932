"""GRPO with the hybrid engine: vLLM rolls out, the megatron actor trains, weights sync into vLLM every step.

CLI runs in subprocesses (vLLM pins CPU threads and keeps global state): ``python -m megatron_vlmr1 train
--config FILE rollout.engine=vllm ...`` on the tiny Qwen2.5-VL, fp32: one single-rank run with truncated importance
sampling on (shared by the first three tests), and one run with the trainer at TP=2. Then the tiny InternVL, on a
micro-batch that mixes a two-image prompt with single-image ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REWARD = "tests.trainer.test_grpo_vllm:text_length"


def text_length(completions: list, **_) -> list[float]:
    """A reward that differs inside every group of random-model samples, so every step has a non-zero gradient."""
    return [len(str(c)) / 100.0 for c in completions]


def _checkpoint_bytes(model_dir: Path) -> int:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        return sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())


def _train(model: Path, data: Path | list[Path], out: Path, overrides: list[str],
           launcher: list[str]) -> tuple[list[dict], str]:
    files = data if isinstance(data, list) else [data]
    config = {
        "model": {"path": str(model)},
        "parallel": {"device": "cpu"},
        "data": {"files": [str(f) for f in files], "task": "rec"},
        "rollout": {"max_model_len": 512, "max_num_seqs": 8, "sampling": {"max_new_tokens": 12}},
        "algo": {"group_size": 4, "beta": 0.0},
        "rewards": [{"name": REWARD, "weight": 1.0}],
        "optim": {"lr": 1e-2},
        "train": {"output_dir": str(out), "steps": 3, "prompts_per_step": 2, "micro_batch_size": 4,
                  "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": True, "save_interval": 0},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, *launcher, "-m", "megatron_vlmr1", "train", "--config",
                             str(out / "run.yaml"), "rollout.engine=vllm", "rollout.sync_bucket_mb=1", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result.stderr


@pytest.fixture(scope="module")
def vllm_run(tiny_qwen2_5_vl, rec_data, tmp_path_factory) -> tuple[list[dict], str, Path]:
    out = tmp_path_factory.mktemp("grpo_vllm")
    records, stderr = _train(tiny_qwen2_5_vl, rec_data, out, ["rollout.vllm_sleep=true", "algo.tis_cap=2.0"], [])
    return records, stderr, out / "hf"


def test_vllm_rollouts_match_the_trainer_after_every_sync(vllm_run, tiny_qwen2_5_vl):
    records, _, trained = vllm_run
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        # vLLM sampled under the synced weights; the megatron actor re-scores the same tokens (fp32)
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert record["grad_norm"] > 0, record
    # the weights vLLM had to follow really moved (lr 1e-2: far more than the log-prob tolerance)
    before, after = load_file(tiny_qwen2_5_vl / "model.safetensors"), load_file(trained / "model.safetensors")
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-2


def test_tis_weights_are_one_when_rollout_and_trainer_agree(vllm_run):
    records, _, _ = vllm_run
    for record in records:
        assert record["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3) and record["tis_truncated_frac"] == 0.0


def test_sync_metrics_and_cpu_ignores_sleep(vllm_run, tiny_qwen2_5_vl):
    records, stderr, _ = vllm_run
    expected_gib = _checkpoint_bytes(tiny_qwen2_5_vl) / 2**30  # the exporter streams every HF weight once
    for record in records:
        assert record["sync_gib"] == pytest.approx(expected_gib, rel=1e-12)
        assert record["time/sync"] > 0
        assert record["rollout_sleep_freed_gib"] == 0.0  # vLLM cannot sleep on CPU: nothing freed, nothing broken
    assert "Traceback" not in stderr  # vLLM shut down before torch.distributed was torn down


def test_training_tensor_parallelism_is_independent_of_vllm(rec_data, tmp_path):
    """Trainer at TP=2 (two ranks) with rollout.tp=1: two vLLM replicas (external launcher), each holding the full
    model fed by the exporter's gathered tensors, each generating one of the step's two prompts."""
    from tools.make_tiny_model import make_tiny_model

    model = make_tiny_model("qwen2_5_vl", tmp_path / "model", seed=0, num_kv_heads=2)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    records, _ = _train(model, rec_data, tmp_path / "run", ["parallel.tp=2", "rollout.tp=1", "train.steps=2"],
                        launcher)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["rollout_prompts_generated"] == 2
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert record["grad_norm"] > 0 and record["sync_gib"] == pytest.approx(_checkpoint_bytes(model) / 2**30)


def test_internvl_multi_image_rollouts_match_the_trainer_after_every_sync(tiny_internvl, rec_data, tmp_path):
    """InternVL with vLLM: step 1's micro-batch holds a two-image prompt (each image tiled, its own ``<img>`` block)
    beside a single-image one; vLLM's per-token log-probs, sampled under the weights synced that step, equal the
    megatron actor's re-scoring of the same rows (the trainer built them from vLLM's own encoded prompts)."""
    from megatron_vlmr1.data import DataConfig, load_samples
    from megatron_vlmr1.data.synthetic import make_dataset

    two_images = make_dataset("rec", tmp_path / "two_images", n=1, seed=0, n_test=0, images_per_sample=2,
                              difficulty="easy")["train"]
    files = [two_images, rec_data]
    first_step = load_samples(DataConfig(files=[str(f) for f in files], task="rec", shuffle=False))[:2]
    assert [len(s.image_paths) for s in first_step] == [2, 1]  # data.shuffle=false: file order
    records, _ = _train(tiny_internvl, files, tmp_path / "run",
                        ["data.shuffle=false", "train.steps=2", "train.micro_batch_size=8", "rollout.tp=1"], [])
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert record["grad_norm"] > 0, record
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["box_space"] == "norm1000"
    before = load_file(tiny_internvl / "model.safetensors")
    after = load_file(tmp_path / "run" / "hf" / "model.safetensors")
    assert after.keys() == before.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-2  # vLLM followed moving weights
