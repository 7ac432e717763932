"""InternVL family, single process: prompt encoding equals transformers' InternVLProcessor (tiles + thumbnail, several
images), 1-D positions, pixel shuffle equals transformers', weight names and specs cover the HF model exactly, the
typed family interface (placeholders, end of turn, box space, transformers positions)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_vlmr1.data import build_messages
from megatron_vlmr1.vlm.families import get_family
from megatron_vlmr1.vlm.internvl import processor as inputs
from megatron_vlmr1.vlm.internvl import weights


def _image(width: int, height: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def processor(tiny_internvl):
    return get_family(tiny_internvl).load_processor(tiny_internvl)


def test_family_is_registered_with_norm1000_boxes(tiny_internvl):
    from megatron_vlmr1.vlm.base import VLMFamily

    family = get_family(tiny_internvl)
    assert type(family).__name__ == "InternVLFamily" and isinstance(family, VLMFamily)
    assert family.default_box_space("internvl") == "norm1000"
    assert family.end_of_turn == "<|im_end|>"


def test_family_encodes_through_its_own_image_loader(processor, tiny_internvl):
    # A 20x10 image is upscaled to the family's minimum side (28) before tiling, as on the training path
    # (then 2:1 -> a 2x1 grid + thumbnail).
    family = get_family(tiny_internvl)
    encoded = family.encode_prompt(processor, build_messages("<image>Where?", 1), [_image(20, 10, 0)])
    assert encoded.images[0].original == (28, 56)
    assert encoded.pixel_values.shape[0] == 3


@pytest.mark.parametrize("sizes", [[(224, 112)], [(224, 112), (112, 336)], [(112, 112)]])
def test_encode_prompt_matches_the_transformers_processor(processor, sizes):
    images = [_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    messages = build_messages("<image>" * len(images) + "Where is the red circle?", len(images))
    encoded = inputs.encode_prompt(processor, messages, images)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = processor(text=[text], images=images, return_tensors="pt")
    assert encoded.input_ids == reference["input_ids"][0].tolist()
    assert torch.equal(encoded.pixel_values, reference["pixel_values"])
    assert encoded.image_grid_thw is None
    # Tiles: 224x112 -> 2x1 grid + thumbnail; 112x336 -> 1x3 grid + thumbnail; 112x112 -> one tile, no thumbnail.
    tiles = {(224, 112): 3, (112, 336): 4, (112, 112): 1}
    assert encoded.pixel_values.shape[0] == sum(tiles[size] for size in sizes)
    context = inputs.image_token_id(processor)
    assert encoded.input_ids.count(context) == 16 * encoded.pixel_values.shape[0]
    canvases = {(224, 112): (112, 224), (112, 336): (336, 112), (112, 112): (112, 112)}
    assert [g.resized for g in encoded.images] == [canvases[size] for size in sizes]
    assert [g.original for g in encoded.images] == [(h, w) for w, h in sizes]


def test_text_only_prompt_and_slot_mismatch(processor):
    encoded = inputs.encode_prompt(processor, build_messages("Count.", 0), [])
    assert encoded.pixel_values is None
    assert inputs.image_token_id(processor) not in encoded.input_ids
    with pytest.raises(ValueError, match="1 image slots but 2 images"):
        inputs.encode_prompt(processor, build_messages("<image>hi", 1), [_image(112, 112, 0)] * 2)


def test_expand_image_tokens_by_hand():
    ids = [7, 3, 9, 3]
    assert inputs.expand_image_tokens(ids, [1, 2], tokens_per_tile=2, context_id=3, start_id=1, end_id=2) == [
        7, 1, 3, 3, 2, 9, 1, 3, 3, 3, 3, 2]
    with pytest.raises(ValueError, match="2 image slots but 1 images"):
        inputs.expand_image_tokens(ids, [1], 2, 3, 1, 2)


def test_placeholders_are_the_vision_markers(processor, tiny_internvl):
    tokenizer = processor.tokenizer
    expected = sorted(tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>", "<video>"]))
    assert get_family(tiny_internvl).banned_token_ids(tokenizer) == expected


def test_position_ids_count_real_tokens_on_either_side():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert inputs.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]


def test_training_batch_and_collate(processor, tiny_internvl):
    images = [_image(224, 112, 0)]
    first = inputs.encode_prompt(processor, build_messages("<image>Where?", 1), images)
    second = inputs.encode_prompt(processor, build_messages("Count.", 0), [])
    pad = processor.tokenizer.pad_token_id
    batch = inputs.build_training_batch([first, second], [[5, 6, 7], [8]], pad)
    # 1-D positions on the three axes every batch carries (all equal).
    assert batch.position_ids.shape == (3, *batch.input_ids.shape)
    assert torch.equal(batch.position_ids[1], batch.position_ids[0]) and torch.equal(batch.position_ids[2],
                                                                                      batch.position_ids[0])
    length = len(first.input_ids)
    assert batch.position_ids[0, 0, :length + 3].tolist() == list(range(length + 3))
    assert batch.completion_mask[0].nonzero().flatten().tolist() == [length, length + 1, length + 2]
    assert batch.completion_mask[1].sum() == 1 and batch.input_ids[1, len(second.input_ids)] == 8
    assert torch.equal(batch.pixel_values, first.pixel_values) and batch.image_grid_thw is None
    generation = inputs.collate_prompts([first, second], pad)
    assert generation.input_ids[1, -len(second.input_ids):].tolist() == second.input_ids
    assert generation.position_ids[:, 1, -1].tolist() == [len(second.input_ids) - 1] * 3
    assert generation.rope_deltas.tolist() == [0, 0]
    family = get_family(tiny_internvl)
    assert torch.equal(family.transformers_position_ids(generation.position_ids), generation.position_ids[0])


def test_pixel_shuffle_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from megatron_vlmr1.vlm.internvl.model import pixel_shuffle

    features = torch.randn(3, 8, 8, 6)
    expected = InternVLModel.pixel_shuffle(None, features.clone(), scale_factor=0.5)
    assert torch.equal(pixel_shuffle(features, 0.5), expected)
    with pytest.raises(ValueError, match="does not downsample"):
        pixel_shuffle(torch.randn(1, 7, 7, 4), 0.5)


def test_weight_names_round_trip_and_specs_cover_the_hf_model(tiny_internvl):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_internvl)
    family = get_family(config)
    with torch.device("meta"):
        in_memory = AutoModelForImageTextToText.from_config(config).state_dict()
    stored = load_file(tiny_internvl / "model.safetensors")
    assert sorted(family.checkpoint_name(name) for name in in_memory) == sorted(stored)
    for name in in_memory:
        assert family.transformers_name(family.checkpoint_name(name)) == name
    for name in stored:
        assert family.checkpoint_name(name) == name
    specs = family.weight_specs(config)
    assert sorted(n for spec in specs for n in spec.hf_names) == sorted(stored)
    assert all(spec.mcore_name.startswith(("visual.vision_tower.", "visual.multi_modal_projector.",
                                           "language_model.")) for spec in specs)
    assert weights.to_checkpoint_name("lm_head.weight") == "language_model.lm_head.weight"


def test_unsupported_text_model_is_a_clear_error():
    from transformers import InternVLConfig

    from megatron_vlmr1.vlm.internvl.model import check_supported

    config = InternVLConfig(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="text_config.model_type='llama' is not supported"):
        check_supported(config)
