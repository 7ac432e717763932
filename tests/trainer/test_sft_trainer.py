"""SFT through the megatron model: learning, resume, TP/PP parity, frozen vision, crash-safe checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run_distributed
from tests.trainer.conftest import run, sft_config


def _sft():
    from megatron_vlmr1.trainer.sft import SFTTrainer

    return SFTTrainer


def test_sft_target_wraps_boxes_in_r1_format():
    from megatron_vlmr1.trainer.sft import sft_target

    assert sft_target("<answer> [1, 2, 3, 4] </answer>", "Look.") == \
        '<think>Look.</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    assert sft_target("<answer> yes </answer>", "t") == "<think>t</think><answer>yes</answer>"
    kept = "<think>a</think><answer>b</answer>"
    assert sft_target(kept, "t") == kept


def test_sft_loss_falls_and_run_writes_its_files(tiny_qwen2_5_vl, rec_data, tmp_path):
    cfg = sft_config(tiny_qwen2_5_vl, rec_data, tmp_path, train={"steps": 8}, checkpoint={"export_hf": True})
    records = run(_sft(), cfg)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "config.yaml").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000008"
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(Path(tiny_qwen2_5_vl) / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert not torch.equal(exported["lm_head.weight"], original["lm_head.weight"])


def test_resume_gives_the_uninterrupted_next_step(tiny_qwen2_5_vl, rec_data, tmp_path):
    straight = run(_sft(), sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / "a", train={"steps": 4}))
    first = sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / "b", train={"steps": 2})
    run(_sft(), first)
    resumed = run(_sft(), sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / "b", train={"steps": 4}))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_freeze_vision_changes_only_the_language_model(tiny_qwen2_5_vl, rec_data, tmp_path):
    cfg = sft_config(tiny_qwen2_5_vl, rec_data, tmp_path, train={"steps": 2},
                     model={"train_mode": "freeze_vision"}, checkpoint={"export_hf": True})
    run(_sft(), cfg)
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(Path(tiny_qwen2_5_vl) / "model.safetensors"))
    visual = [k for k in original if k.startswith("visual.") or ".visual." in k]
    language = [k for k in original if k not in visual]
    assert visual and language
    assert all(torch.equal(exported[k], original[k]) for k in visual)
    assert sum(not torch.equal(exported[k], original[k]) for k in language) > len(language) // 2


def _parallel_sft(rank, world_size, model, data, out, tp, pp):
    cfg = sft_config(Path(model), Path(data), Path(out), parallel={"tp": tp, "pp": pp},
                     train={"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2})
    records = run(_sft(), cfg)
    return [(r["loss"], r["grad_norm"]) for r in records]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_model_parallel_reproduces_single_rank_losses(tiny_qwen2_5_vl_kv2, rec_data, tmp_path, tp, pp):
    single = run(_sft(), sft_config(tiny_qwen2_5_vl_kv2, rec_data, tmp_path / "single",
                                    train={"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2}))
    results = run_distributed(_parallel_sft, 2, str(tiny_qwen2_5_vl_kv2), str(rec_data), str(tmp_path / "par"), tp, pp)
    for (loss, grad_norm), ref in zip(results[0], single):
        assert loss == pytest.approx(ref["loss"], rel=1e-4), (loss, ref["loss"])
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4), (grad_norm, ref["grad_norm"])


def _train_at_tp2(rank, world_size, model, data, out):
    from megatron_vlmr1.trainer.sft import SFTTrainer

    with pytest.raises(ValueError, match="num_key_value_heads"):
        SFTTrainer(sft_config(Path(model), Path(data), Path(out), parallel={"tp": 2}))
    from megatron_vlmr1.parallel import destroy_parallel

    destroy_parallel()
    return True


def test_training_refuses_tp_above_kv_heads(tiny_qwen2_5_vl, rec_data, tmp_path):
    """TP=2 on a 1-KV-head model would replicate the KV head and let the copies drift apart."""
    assert run_distributed(_train_at_tp2, 2, str(tiny_qwen2_5_vl), str(rec_data), str(tmp_path)) == [True, True]


def test_sigterm_saves_and_exits_cleanly(tiny_qwen2_5_vl, rec_data, tmp_path):
    """Slurm preemption: SIGTERM mid-run → a complete checkpoint at the current step, exit code 0."""
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "model": {"path": str(tiny_qwen2_5_vl)}, "data": {"files": [str(rec_data)], "task": "rec"},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 10_000, "prompts_per_step": 2,
                  "micro_batch_size": 2, "tensorboard": False, "progress_bar": False},
    }))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_vlmr1", "sft", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    state = json.loads((tmp_path / "run" / "checkpoints" / latest / "trainer_state.json").read_text())
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert state["step"] == logged[-1] >= 2


def _resume_sft_at_dp2(rank, world_size, model, data, out):
    records = run(_sft(), sft_config(Path(model), Path(data), Path(out), train={"steps": 4}))
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def test_resume_at_another_data_parallel_size(tiny_qwen2_5_vl, rec_data, tmp_path):
    """Save at DP=1, resume at DP=2: the distributed optimizer's state reshards, the data position is global."""
    straight = run(_sft(), sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / "a", train={"steps": 4}))
    run(_sft(), sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / "b", train={"steps": 2}))
    resumed = run_distributed(_resume_sft_at_dp2, 2, str(tiny_qwen2_5_vl), str(rec_data), str(tmp_path / "b"))[0]
    assert [step for step, _, _ in resumed] == [1, 2, 3, 4]
    for (step, loss, grad_norm), ref in zip(resumed[2:], straight[2:]):
        assert loss == pytest.approx(ref["loss"], rel=1e-5), (step, loss, ref["loss"])
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4), (step, grad_norm, ref["grad_norm"])
