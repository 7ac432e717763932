"""The train/sft command line: user errors are one clear line and exit code 2, before any training."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "megatron_vlmr1", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_unknown_config_key_names_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {path: /x}\nalgo: {group_szie: 4}\n")
    done = _cli("train", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert "group_szie" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("override, needle", [
    ("algo.group_size=1", "algo.group_size"),
    ("optim.lr=fast", "optim.lr"),
    ("train.steps=0", "train.steps"),
])
def test_bad_override_values(tmp_path, override, needle):
    done = _cli("sft" if override.startswith(("optim", "train")) else "train", "model.path=/x", override)
    assert done.returncode == 2 and needle in done.stderr, done.stderr


def test_malformed_data_line_names_file_and_line(tiny_qwen2_5_vl, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
                    "{not json\n")
    done = _cli("sft", f"model.path={tiny_qwen2_5_vl}", f"data.files=[{data}]", f"train.output_dir={tmp_path}/run",
                "train.prompts_per_step=1", "train.micro_batch_size=1")
    assert done.returncode == 2, done.stderr
    assert f"{data}:2" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
