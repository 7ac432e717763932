"""Shared pieces for trainer tests: a tiny easy REC data set and config builders."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlmr1.config import from_dict
from tests.device import TEST_DEVICE


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
        "parallel": {"device": TEST_DEVICE},
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


def check_lora_export(out: Path, base_model: Path, layers_prefix: str, low_token_id: int) -> None:
    """A LoRA run's ``out/hf`` export changes exactly the adapted language-model weights, and its ``out/adapter``
    on the base model (peft) gives the merged model's logits, which differ from the base model's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    exported = load_file(str(out / "hf" / "model.safetensors"))
    original = load_file(str(Path(base_model) / "model.safetensors"))
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, tensor in original.items():
        is_adapted = name.startswith(layers_prefix) and name.split(".")[-2] in adapted and name.endswith("weight")
        assert torch.equal(exported[name], tensor) != is_adapted, name
    merged = AutoModelForImageTextToText.from_pretrained(out / "hf", dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.randint(low_token_id, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (plain - expected).abs().max().item() > 1e-3  # the adapters matter
