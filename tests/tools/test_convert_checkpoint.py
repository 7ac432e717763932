"""tools/convert_checkpoint.py: HF -> megatron (TP=2 / PP=2) -> HF is bit-exact and loads in transformers (Qwen-VL
and InternVL); a TP=2 checkpoint loaded at TP=1 gives the transformers logits; bad inputs fail early with a clear
message."""
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

    expected = load_file(str(original / "model.safetensors"))
    actual = {k: v for file in sorted(converted.glob("*.safetensors")) for k, v in load_file(str(file)).items()}
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def _args(**kwargs):
    import argparse

    defaults = dict(tp=1, pp=1, hf_template=None, max_shard_mb=4096)
    return argparse.Namespace(**{**defaults, **kwargs})


def _conversions_worker(rank: int, world_size: int, hf_dir: str, tied_dir: str, out: str, batch: dict) -> dict:
    """Every conversion in one 2-rank launch (spawning dominates the cost here)."""
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.export import build_model_for_checkpoint, load_mcore_checkpoint

    ckpt = os.path.join(out, "mcore_tp2")
    convert_checkpoint.hf_to_mcore(_args(hf=hf_dir, out=ckpt, tp=2))
    # The TP=2 checkpoint at TP=1 (two data-parallel replicas): logits, then back to HF.
    env = helpers.setup(1, 1)
    model, _ = build_model_for_checkpoint(ckpt, env)
    load_mcore_checkpoint(model, ckpt)
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"],
                       batch["image_grid_thw"])
    parallel_state.destroy_model_parallel()
    convert_checkpoint.mcore_to_hf(_args(mcore=ckpt, out=os.path.join(out, "hf_tp1"), max_shard_mb=1))
    # Tied embeddings split over two pipeline stages (the last stage holds its own copy of the embedding).
    tied_ckpt = os.path.join(out, "mcore_tied_pp2")
    convert_checkpoint.hf_to_mcore(_args(hf=tied_dir, out=tied_ckpt, pp=2))
    convert_checkpoint.mcore_to_hf(_args(mcore=tied_ckpt, out=os.path.join(out, "hf_tied"), pp=2,
                                         hf_template=tied_dir))
    return {"logits": logits}


@pytest.fixture(scope="module")
def conversions(tiny_qwen2_5_vl, tmp_path_factory):
    out = tmp_path_factory.mktemp("conversions")
    tied = make_tiny_model("qwen2_5_vl", out / "tied_src", seed=1, tie_embeddings=True)
    reference = helpers.hf_reference(tiny_qwen2_5_vl, "left")
    batch = {k: v for k, v in reference.items() if k != "logits"}
    results = run_distributed(_conversions_worker, 2, str(tiny_qwen2_5_vl), str(tied), str(out), batch)
    return {"out": out, "tied_src": tied, "reference": reference, "results": results}


def test_hf_mcore_hf_round_trip_is_bit_exact(tiny_qwen2_5_vl, conversions):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = conversions["out"] / "hf_tp1"
    # max_shard_mb=1 forces several safetensors files plus an index, as transformers writes for big models.
    assert (out / "model.safetensors.index.json").exists()
    _assert_same_tensors(tiny_qwen2_5_vl, out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    original = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl)
    assert model.state_dict().keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    processor, original_processor = AutoProcessor.from_pretrained(out), AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    assert processor.tokenizer.get_vocab() == original_processor.tokenizer.get_vocab()


def test_tp2_checkpoint_at_tp1_gives_transformers_logits(conversions):
    reference = conversions["reference"]
    mask = reference["attention_mask"].bool()
    for result in conversions["results"]:
        logits = result["logits"]
        assert logits.shape == reference["logits"].shape
        assert (logits[mask] - reference["logits"][mask]).abs().max().item() <= 1e-4


def test_tied_embeddings_round_trip_at_pp2(conversions):
    _assert_same_tensors(conversions["tied_src"], conversions["out"] / "hf_tied")


def test_cli_mcore_to_hf_is_bit_exact(tiny_qwen2_5_vl, conversions, tmp_path):
    stdout = _convert("mcore-to-hf", "--mcore", str(conversions["out"] / "mcore_tp2"), "--out", str(tmp_path))
    assert "peak RSS per rank" in stdout
    _assert_same_tensors(tiny_qwen2_5_vl, tmp_path)


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


@pytest.mark.slow
def test_internvl_cli_round_trip_at_tp2_is_bit_exact(tmp_path):
    """InternVL (tied embeddings, as the small InternVL3 checkpoints): HF -> mcore at TP=2 -> HF at PP=2."""
    from transformers import AutoModelForImageTextToText

    source = make_tiny_model("internvl", tmp_path / "src", seed=3, tie_embeddings=True)
    _convert("hf-to-mcore", "--hf", str(source), "--out", str(tmp_path / "mcore"), "--tp", "2")
    _convert("mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "hf"), "--pp", "2")
    _assert_same_tensors(source, tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    original = AutoModelForImageTextToText.from_pretrained(source)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
