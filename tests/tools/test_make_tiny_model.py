"""The tiny-model factory: deterministic files, real Qwen tokens/template, loads and generates with transformers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tools.make_tiny_model import SUPPORTED_ARCHS, make_tiny_model

REPO = Path(__file__).resolve().parents[2]


def _messages(text: str, num_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def check_forward_and_generate(model, inputs) -> None:
    """The loaded model gives finite logits of the full vocabulary for one prompt and generates past it."""
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("fixture", ["tiny_qwen2_5_vl", "tiny_qwen2_vl"])
def test_loads_forwards_and_generates_with_an_image(fixture, request):
    path = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    text = processor.apply_chat_template(_messages("Where is the red circle?"), add_generation_prompt=True,
                                         tokenize=False)
    image = Image.new("RGB", (112, 112), (255, 0, 0))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # 112x112 -> 8x8 patches of 14 -> 4x4 = 16 merged image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 16
    check_forward_and_generate(model, inputs)


def test_image_token_budget_spans_a_few_dozen_tokens(tiny_qwen2_5_vl):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    grids = processor.image_processor([Image.new("RGB", (224, 224)), Image.new("RGB", (640, 480))],
                                      return_tensors="pt")["image_grid_thw"]
    tokens = (grids.prod(-1) // 4).tolist()
    assert tokens[0] == 64
    assert tokens[1] <= 64


def test_special_tokens_roles_and_chat_template(tiny_qwen2_5_vl):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    tokenizer = processor.tokenizer
    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"):
        assert tokenizer.convert_tokens_to_ids(name) < len(tokenizer)
        assert tokenizer.decode(tokenizer.convert_tokens_to_ids([name])) == name
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.vocab_size % 128 == 0 and config.text_config.vocab_size >= len(tokenizer)
    assert 1000 <= len(tokenizer) <= 2048
    text = processor.apply_chat_template(_messages("hi", num_images=2), add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>hi"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_digits_are_single_tokens_and_text_round_trips(tiny_qwen2_5_vl):
    tokenizer = AutoProcessor.from_pretrained(tiny_qwen2_5_vl).tokenizer
    text = '<think> red circle </think> <answer> {"bbox_2d": [12, 345, 6, 78], "label": "red circle"} </answer>'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("[12, 345]")["input_ids"])
    assert pieces == ["[", "1", "2", ",", "Ġ", "3", "4", "5", "]"]


def test_same_seed_same_files_other_seed_other_weights_same_tokenizer(tmp_path):
    first = make_tiny_model("qwen2_vl", tmp_path / "a", seed=3)
    second = make_tiny_model("qwen2_vl", tmp_path / "b", seed=3)
    third = make_tiny_model("qwen2_vl", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # One tokenizer for every seed, so weights of one tiny model can be streamed into another.
    assert (first / "tokenizer.json").read_bytes() == (third / "tokenizer.json").read_bytes()
    a, c = load_file(first / "model.safetensors"), load_file(third / "model.safetensors")
    assert a.keys() == c.keys()
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_cli_layers_and_tied_embeddings(tmp_path):
    out = tmp_path / "tied"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--arch", "qwen2_5_vl", "--out",
                    str(out), "--layers", "4", "--tie-embeddings", "--seed", "1"], check=True, cwd=REPO,
                   capture_output=True)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_unsupported_arch_lists_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="supported: qwen2_5_vl, qwen2_vl, internvl"):
        make_tiny_model("llava", tmp_path)
    assert SUPPORTED_ARCHS == ("qwen2_5_vl", "qwen2_vl", "internvl")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--arch", "llava",
                             "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "supported: qwen2_5_vl, qwen2_vl, internvl" in result.stderr


def test_vocab_size_widens_the_model_not_the_tokenizer(tmp_path):
    # Benchmarks need Qwen's LM-head width with tiny layers; 1700 is not a multiple of 128 (megatron pads it).
    out = make_tiny_model("qwen2_5_vl", tmp_path / "wide", vocab_size=1700)
    config = AutoConfig.from_pretrained(out)
    weights = load_file(str(out / "model.safetensors"))
    assert config.text_config.vocab_size == 1700
    assert weights["lm_head.weight"].shape[0] == 1700
    assert len(AutoProcessor.from_pretrained(out).tokenizer) < 1700
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_model("qwen2_5_vl", tmp_path / "narrow", vocab_size=100)


# --- InternVL ----------------------------------------------------------------------------------------------------

def test_internvl_loads_tiles_a_wide_image_and_generates(tiny_internvl):
    processor = AutoProcessor.from_pretrained(tiny_internvl)
    model = AutoModelForImageTextToText.from_pretrained(tiny_internvl).eval()
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert type(processor).__name__ == "InternVLProcessor"
    text = processor.apply_chat_template(_messages("Where is the red circle?"), add_generation_prompt=True,
                                         tokenize=False)
    # 224 wide x 112 high: a 2x1 grid of 112x112 tiles plus a 112x112 thumbnail; 16 tokens per tile.
    wide = Image.new("RGB", (224, 112), (255, 0, 0))
    square = Image.new("RGB", (112, 112), (0, 0, 255))
    inputs = processor(text=[text], images=[wide], return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 112, 112)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 3 * 16
    assert processor(text=[text], images=[square], return_tensors="pt")["pixel_values"].shape[0] == 1
    tokenizer = processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(tokenizer.convert_tokens_to_ids("<img>"))
    assert ids[start + 1:start + 49] == [model.config.image_token_id] * 48
    assert ids[start + 49] == tokenizer.convert_tokens_to_ids("</img>")
    check_forward_and_generate(model, inputs)


def test_internvl_tokens_template_and_sizes(tiny_internvl):
    processor = AutoProcessor.from_pretrained(tiny_internvl)
    tokenizer = processor.tokenizer
    config = AutoConfig.from_pretrained(tiny_internvl)
    assert (tokenizer.start_image_token, tokenizer.end_image_token, tokenizer.context_image_token) == (
        "<img>", "</img>", "<IMG_CONTEXT>")
    assert config.image_token_id == tokenizer.context_image_token_id
    for name in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<box>", "</box>"):
        assert tokenizer.decode(tokenizer.convert_tokens_to_ids([name])) == name
    assert tokenizer.eos_token == "<|im_end|>" and config.text_config.eos_token_id == tokenizer.eos_token_id
    text = processor.apply_chat_template(_messages("hi", num_images=2), add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n"
    # CPU vLLM needs head_dim 64; 2 KV heads let TP=2 train without repeated KV heads.
    text_config = config.text_config
    assert text_config.model_type == "qwen2"
    assert text_config.hidden_size // text_config.num_attention_heads == 64
    assert text_config.num_key_value_heads == 2
    assert config.vision_config.hidden_size // config.vision_config.num_attention_heads == 64
    weights = load_file(tiny_internvl / "model.safetensors")
    # The hub layout of the *-hf checkpoints; the CLS token and position embeddings are drawn, not zero.
    assert "language_model.model.embed_tokens.weight" in weights and "language_model.lm_head.weight" in weights
    assert weights["vision_tower.embeddings.position_embeddings"].abs().sum() > 0
