"""tools/convert_checkpoint.py: HF -> megatron (TP=2 / PP=2) -> HF is bit-exact and loads in transformers; a TP=2
checkpoint loaded at TP=1 gives the transformers logits; bad inputs fail early with a clear message."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers
from tools import convert_checkpoint
from tools.make_tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[2]


def _convert(*argv: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *argv],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _assert_same_tensors(original: Path, converted: Path) -> None:
    from safetensors.torch import load_file

    expected, actual = load_file(str(original / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def tp2_checkpoint(tiny_qwen2_5_vl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcore_tp2") / "ckpt"
    stdout = _convert("hf-to-mcore", "--hf", str(tiny_qwen2_5_vl), "--out", str(out), "--tp", "2")
    assert "peak RSS per rank" in stdout
    return out


def test_hf_mcore_hf_round_trip_is_bit_exact(tiny_qwen2_5_vl, tp2_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "hf"
    _convert("mcore-to-hf", "--mcore", str(tp2_checkpoint), "--out", str(out))
    _assert_same_tensors(tiny_qwen2_5_vl, out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    original = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl)
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert AutoProcessor.from_pretrained(out).tokenizer.vocab == AutoProcessor.from_pretrained(tiny_qwen2_5_vl).tokenizer.vocab


def _tp1_logits_worker(rank: int, world_size: int, ckpt: str, batch: dict) -> torch.Tensor:
    from megatron_vlmr1.vlm.export import build_model_for_checkpoint, load_mcore_checkpoint

    helpers.setup(1, 1)
    model, _ = build_model_for_checkpoint(ckpt)
    load_mcore_checkpoint(model, ckpt)
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"],
                     batch["image_grid_thw"])


def test_tp2_checkpoint_at_tp1_gives_transformers_logits(tiny_qwen2_5_vl, tp2_checkpoint):
    reference = helpers.hf_reference(tiny_qwen2_5_vl, "left")
    batch = {k: v for k, v in reference.items() if k != "logits"}
    (logits,) = run_distributed(_tp1_logits_worker, 1, str(tp2_checkpoint), batch)
    mask = reference["attention_mask"].bool()
    assert logits.shape == reference["logits"].shape
    assert (logits[mask] - reference["logits"][mask]).abs().max().item() <= 1e-4


def test_tied_embeddings_round_trip_at_pp2(tmp_path):
    hf_dir = make_tiny_model("qwen2_5_vl", tmp_path / "tied", seed=1, tie_embeddings=True)
    _convert("hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mcore"), "--pp", "2")
    _convert("mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "back"), "--pp", "2",
             "--hf-template", str(hf_dir))
    _assert_same_tensors(hf_dir, tmp_path / "back")


def _expect_error(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        convert_checkpoint.main(argv)
    assert message in str(info.value), str(info.value)


def test_wrong_architecture_is_rejected(tiny_qwen2_5_vl, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_qwen2_5_vl, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    _expect_error(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")], "unsupported architecture")


def test_missing_shard_is_rejected(tiny_qwen2_5_vl, tmp_path):
    bad = tmp_path / "sharded"
    shutil.copytree(tiny_qwen2_5_vl, bad)
    os.rename(bad / "model.safetensors", bad / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                             "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")], "is missing")


def test_mismatched_shape_is_rejected(tiny_qwen2_5_vl, tmp_path):
    bad = tmp_path / "shape"
    shutil.copytree(tiny_qwen2_5_vl, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 64
    (bad / "config.json").write_text(json.dumps(config))
    _expect_error(["hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")], "config.json implies")


def test_not_a_megatron_checkpoint_is_rejected(tiny_qwen2_5_vl, tmp_path):
    _expect_error(["mcore-to-hf", "--mcore", str(tiny_qwen2_5_vl), "--out", str(tmp_path / "o")],
                  "not a megatron distributed checkpoint")
