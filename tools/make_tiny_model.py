"""Build a tiny, randomly initialised Qwen-VL or InternVL checkpoint in Hugging Face format.

No weights can be downloaded on CI machines, so every test that needs a vision-language model builds one here with
the real transformers classes: seeded random weights, a byte-level BPE tokenizer trained on the fly that carries the
real special tokens and chat template, and an image processor whose pixel budget turns a 112x112 to 224x224
image into 16 to 64 image tokens. The result loads with ``from_pretrained`` (model, ``AutoProcessor``) and in vLLM.

InternVL (``--arch internvl``: transformers' ``InternVLForConditionalGeneration``, InternViT + pixel-shuffle MLP
projector + Qwen2 language model) tiles images as its processor does: 112x112 tiles (1 to 4 of them, plus a
thumbnail when there are several), 16 ``<IMG_CONTEXT>`` tokens per tile.

    python tools/make_tiny_model.py --arch qwen2_5_vl --out /tmp/tiny [--seed 0] [--layers 4] [--tie-embeddings]
        [--vocab-size 151936]   # the model's embedding / LM head width (Qwen's real one here); the tokenizer stays tiny
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SUPPORTED_ARCHS = ("qwen2_5_vl", "qwen2_vl", "internvl")

# Qwen's special tokens in Qwen's order; ids are assigned from 0 here (the real checkpoints put them after the
# 151k BPE entries, which only matters to code that hard-codes ids, and none of ours may).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# InternVL's own tokens, after Qwen's (its language model is a Qwen2 with these added).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                   "<video>")
# The named multimodal tokens transformers' InternVLProcessor reads from the tokenizer.
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

# Qwen2's pre-tokenizer split: digits (\p{N}) are isolated one by one, so numbers are sequences of digit tokens.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template shipped with Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (identical in both).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The chat template of the transformers-native InternVL3 checkpoints (``OpenGVLab/InternVL3-*-hf``): ChatML turns,
# one ``<IMG_CONTEXT>`` per image (the processor expands it to ``<img>`` + tokens + ``</img>``).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PATCH_SIZE = 14
MERGE_SIZE = 2
# 4 to 64 merged image tokens per image: 112x112 -> 4x4 = 16 tokens, 224x224 -> 8x8 = 64 tokens.
MIN_PIXELS = (2 * PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 64 * (PATCH_SIZE * MERGE_SIZE) ** 2
# InternVL: 112x112 tiles of 8x8 patches, pixel-shuffled (downsample 0.5) to 4x4 = 16 tokens per tile.
INTERNVL_TILE = 8 * PATCH_SIZE
INTERNVL_MAX_TILES = 4
INTERNVL_TOKENS_PER_TILE = (INTERNVL_TILE // PATCH_SIZE // 2) ** 2

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "pink", "brown", "cyan")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "ellipse", "cross", "diamond")
_POSITIONS = ("left", "right", "top", "bottom", "center", "top left", "top right", "bottom left", "bottom right",
              "above", "below", "next to", "middle")
_PHRASES = (
    "Please provide the bounding box coordinate of the region this sentence describes: {c} {s}.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    "Output the final answer in JSON format.",
    "How many {s}s are there in the image?",
    "What is the colour of the {s} on the {p}?",
    "Locate every object in the image and output the bounding boxes as JSON.",
    "The {c} {s} is at the {p} of the image.",
    "There is a {c} {s} {p} the {c2} {s2}.",
    "Find the {c} {s} in the picture and answer with its coordinates.",
    "First think about the question, then give the answer.",
)
_WORDS = (
    "the a an of in on at to from with without and or but not is are was were be been being has have had do does did "
    "this that these those there here it its they them their we our you your he she his her which what where when why "
    "how who whom whose all any some none each every both either neither one two three four five six seven eight nine "
    "ten first second third last next previous left right top bottom upper lower middle center corner edge side front "
    "back inside outside near far close large small big tiny little long short tall wide narrow thin thick bright dark "
    "light heavy round flat sharp smooth rough image picture photo scene region area object objects box boxes person "
    "people man woman child dog cat car bus truck bicycle bird horse sheep cow table chair cup bottle book phone laptop "
    "tree sky road building window door wall floor grass water sign clock ball kite plane train boat umbrella bag "
    "count number answer question reason think because therefore so then first finally step result output coordinate "
    "coordinates bounding label labels detect locate find describe identify select choose compare measure estimate "
    "width height size position location distance angle area colour color shape pattern line point pixel pixels "
    "above below beside between behind under over around across along toward away holding sitting standing walking "
    "running wearing looking"
).split()


def tokenizer_corpus(seed: int = 0, num_lines: int = 3000) -> list[str]:
    """Synthetic text close to what tiny GRPO runs produce: R1 tags, box JSON, colour/shape/position words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        c, c2 = rng.sample(_COLOURS, 2)
        s, s2 = rng.sample(_SHAPES, 2)
        p = rng.choice(_POSITIONS)
        x1, y1 = rng.randint(0, 200), rng.randint(0, 200)
        box = [x1, y1, x1 + rng.randint(1, 200), y1 + rng.randint(1, 200)]
        question = rng.choice(_PHRASES).format(c=c, s=s, p=p, c2=c2, s2=s2)
        answer = json.dumps({"bbox_2d": box, "label": f"{c} {s}"})
        lines.append(question)
        lines.append(f"<think> The {c} {s} is in the {p} part of the image. </think> <answer> {answer} </answer>")
        lines.append(f"<answer>[{answer}]</answer> <answer> {rng.randint(0, 20)} </answer>")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))).capitalize() + ".")
    return lines


def train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder, special tokens at ids 0, 1, ...

    The corpus is fixed, so every tiny model shares one tokenizer whatever its weight seed: weights of one tiny
    model can be streamed into another of the same sizes.
    """
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _model_config(arch: str, vocab_size: int, token_ids: dict[str, int], num_layers: int, tie_embeddings: bool,
                  hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int, vision_depth: int,
                  vision_hidden_size: int, vision_heads: int):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = hidden_size // num_heads
    if head_dim % 8:
        raise ValueError(f"hidden_size/num_heads = {head_dim} must be a multiple of 8 for the 3-D mrope split")
    # Qwen's [16, 24, 24] for head_dim 128, scaled: temporal/height/width rotary frequencies summing to head_dim/2.
    half = head_dim // 2
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"], tie_word_embeddings=tie_embeddings,
    )
    ids = dict(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
               vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])
    if arch == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                      num_heads=vision_heads, out_hidden_size=hidden_size, patch_size=PATCH_SIZE,
                      spatial_merge_size=MERGE_SIZE, temporal_patch_size=2, window_size=4 * PATCH_SIZE * MERGE_SIZE,
                      fullatt_block_indexes=[vision_depth - 1], hidden_act="silu", tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_embeddings,
                                dtype="float32", **ids)
    vision = dict(depth=vision_depth, embed_dim=vision_hidden_size, hidden_size=hidden_size, mlp_ratio=2,
                  num_heads=vision_heads, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
                  hidden_act="quick_gelu")
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_embeddings,
                         dtype="float32", **ids)


def _save_tokenizer_and_processor(arch: str, tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, additional_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=4096,
        chat_template=QWEN_VL_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    pixels = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                  temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels)
    processor_cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=hf_tokenizer,
                              video_processor=video_processor, chat_template=QWEN_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    # AutoTokenizer then builds Qwen's own tokenizer class from tokenizer.json, as for the real checkpoints.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))


def _internvl_config(vocab_size: int, token_ids: dict[str, int], num_layers: int, tie_embeddings: bool,
                     hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int, vision_depth: int,
                     vision_hidden_size: int, vision_heads: int):
    from transformers import InternVLConfig

    text = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"], tie_word_embeddings=tie_embeddings,
    )
    # InternViT-300M's shape, scaled down: pre-norm layers with layer scale, CLS token, absolute position embeddings.
    vision = dict(hidden_size=vision_hidden_size, num_hidden_layers=vision_depth, num_attention_heads=vision_heads,
                  intermediate_size=2 * vision_hidden_size, hidden_act="gelu", attention_bias=True,
                  image_size=INTERNVL_TILE, patch_size=PATCH_SIZE, norm_type="layer_norm", use_qk_norm=False,
                  use_mean_pooling=True, layer_scale_init_value=0.1)
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["<IMG_CONTEXT>"],
                          image_seq_length=INTERNVL_TOKENS_PER_TILE, downsample_ratio=0.5,
                          projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=tie_embeddings,
                          dtype="float32")


def _save_internvl_processor(tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import (GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor,
                              PreTrainedTokenizerFast)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, extra_special_tokens=INTERNVL_NAMED_TOKENS, model_max_length=4096,
        chat_template=INTERNVL_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    tile = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    image_processor = GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1,
                                            max_patches=INTERNVL_MAX_TILES)
    video_processor = InternVLVideoProcessor(size=tile)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                  video_processor=video_processor, image_seq_length=INTERNVL_TOKENS_PER_TILE,
                                  chat_template=INTERNVL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))


def make_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, *, num_layers: int = 2,
                    tie_embeddings: bool = False, hidden_size: int = 128, num_heads: int = 2,
                    num_kv_heads: int | None = None, intermediate_size: int = 256, vision_depth: int = 2,
                    vision_hidden_size: int = 128, vision_heads: int = 2, tokenizer_vocab_size: int = 1536,
                    vocab_size: int | None = None) -> Path:
    """Write a tiny HF checkpoint (config, safetensors, tokenizer, processor) for ``arch`` into ``out_dir``.

    The same arguments always produce the same files (weights from ``torch.manual_seed(seed)``; the BPE tokenizer
    is trained on a fixed corpus, so it is the same for every seed of an architecture).
    The model vocabulary is the tokenizer's rounded up to a multiple of 128, as real Qwen pads its embedding, or
    ``vocab_size`` (at least the tokenizer's): memory and kernel benchmarks use Qwen's 151,936 with tiny layers.
    ``num_kv_heads`` defaults to 1 for Qwen-VL and 2 for InternVL (trainable at TP=2 without repeated KV heads).
    Returns ``out_dir`` as a Path.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported --arch {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    from transformers import (GenerationConfig, InternVLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    internvl = arch == "internvl"
    if num_kv_heads is None:
        num_kv_heads = 2 if internvl else 1
    tokenizer = train_tokenizer(tokenizer_vocab_size, SPECIAL_TOKENS + INTERNVL_TOKENS if internvl else SPECIAL_TOKENS)
    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS + (INTERNVL_TOKENS if internvl else ())}
    if vocab_size is None:
        vocab_size = _round_up(tokenizer.get_vocab_size(), 128)
    elif vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()} tokens")
    sizes = (num_layers, tie_embeddings, hidden_size, num_heads, num_kv_heads, intermediate_size, vision_depth,
             vision_hidden_size, vision_heads)
    if internvl:
        config = _internvl_config(vocab_size, token_ids, *sizes)
        model_cls = InternVLForConditionalGeneration
    else:
        config = _model_config(arch, vocab_size, token_ids, *sizes)
        model_cls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if internvl:
        # InternViT initialises its CLS token and position embeddings to zero; draw them so parity tests see them.
        with torch.no_grad():
            for param in (model.model.vision_tower.embeddings.cls_token,
                          model.model.vision_tower.embeddings.position_embeddings):
                param.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"], pad_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
    )
    model.save_pretrained(out_dir)
    if internvl:
        _save_internvl_processor(tokenizer, out_dir)
    else:
        _save_tokenizer_and_processor(arch, tokenizer, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help=f"one of: {', '.join(SUPPORTED_ARCHS)}")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="model vocabulary (embedding/LM-head rows); default: the tokenizer's, rounded up to 128")
    args = parser.parse_args(argv)
    try:
        path = make_tiny_model(args.arch, args.out, args.seed, num_layers=args.layers,
                               tie_embeddings=args.tie_embeddings, vocab_size=args.vocab_size)
    except ValueError as err:
        parser.error(str(err))
    print(path)


if __name__ == "__main__":
    main()
