"""Shared pieces for trainer tests: a tiny easy REC data set and config builders."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlmr1.config import from_dict


@pytest.fixture(scope="session")
def rec_data(tmp_path_factory) -> Path:
    from megatron_vlmr1.data.synthetic import make_rec_dataset

    out = tmp_path_factory.mktemp("rec_easy")
    make_rec_dataset(out, 64, seed=0, difficulty="easy")
    return out / "train.jsonl"


def sft_config(model_dir: Path, data_file: Path, out: Path, **overrides):
    from megatron_vlmr1.trainer.sft import SFTRunConfig

    base = {
        "model": {"path": str(model_dir)},
        "data": {"files": [str(data_file)], "task": "rec"},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "steps": 3, "prompts_per_step": 4, "micro_batch_size": 2,
                  "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False},
    }
    return from_dict(SFTRunConfig, _merge(base, overrides))


def grpo_config(model_dir: Path, data_file: Path, out: Path, **overrides):
    from megatron_vlmr1.trainer.grpo import GRPORunConfig

    base = {
        "model": {"path": str(model_dir)},
        "data": {"files": [str(data_file)], "task": "rec"},
        "rollout": {"sampling": {"max_new_tokens": 12}},
        "algo": {"group_size": 2, "beta": 0.04},
        "rewards": [{"name": "format", "weight": 1.0}, {"name": "iou", "weight": 1.0}],
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "steps": 2, "prompts_per_step": 2, "micro_batch_size": 2,
                  "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False},
    }
    return from_dict(GRPORunConfig, _merge(base, overrides))


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run(trainer_cls, cfg) -> list[dict]:
    from megatron_vlmr1.trainer.metrics import read_metrics

    trainer = trainer_cls(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
