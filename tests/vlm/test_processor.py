"""Qwen-VL prompt side: parity with the transformers processor and get_rope_index, padding layouts, geometry."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from megatron_vlmr1.data import build_messages
from megatron_vlmr1.vlm.qwen_vl.processor import (
    ImageGeometry,
    build_training_batch,
    collate_prompts,
    encode_prompt,
    expand_image_tokens,
    image_token_id,
    mrope_position_ids,
    render_prompt,
)


def _image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), colour)
    image.paste((255 - colour[0], 10, 200), (width // 4, height // 3, width // 2, height // 2))
    return image


@pytest.fixture(scope="module", params=["tiny_qwen2_5_vl", "tiny_qwen2_vl"])
def tiny(request):
    path = request.getfixturevalue(request.param)
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


def _samples():
    """(messages, images): single-image, two-image, text-only, system prompt + image after text."""
    return [
        (build_messages("<image>Where is the red circle?", 1), [_image(112, 112, (200, 0, 0))]),
        (build_messages("Compare <image> and <image> please.", 2), [_image(224, 168, (0, 200, 0)),
                                                                     _image(140, 196, (0, 0, 200))]),
        (build_messages("How many shapes are there?", 0), []),
        (build_messages("Find the blue square <image>", 1, system_prompt="Think first."),
         [_image(196, 112, (0, 0, 255))]),
    ]


def test_build_messages_places_images_at_markers():
    assert build_messages("a<image>b", 1) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}]
    assert build_messages("q", 2, system_prompt="s") == [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        build_messages("<image><image>q", 1)


def test_render_prompt_is_the_qwen_chat_template(tiny_qwen2_5_vl):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    text = render_prompt(processor, build_messages("Find <image> now", 1, system_prompt="Be brief."))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFind "
                    "<|vision_start|><|image_pad|><|vision_end|> now<|im_end|>\n<|im_start|>assistant\n")


def test_encode_prompt_matches_transformers_processor(tiny):
    processor, _ = tiny
    for messages, images in _samples():
        encoded = encode_prompt(processor, messages, images)
        reference = processor(text=[render_prompt(processor, messages)], images=images or None, return_tensors="pt")
        assert encoded.input_ids == reference["input_ids"][0].tolist()
        if images:
            assert torch.equal(encoded.image_grid_thw, reference["image_grid_thw"])
            assert torch.equal(encoded.pixel_values, reference["pixel_values"])
        else:
            assert encoded.pixel_values is None and encoded.image_grid_thw is None


def test_image_geometry_is_original_and_processor_size(tiny_qwen2_5_vl):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    images = [_image(196, 140, (1, 2, 3)), _image(150, 100, (1, 2, 3)), _image(640, 480, (1, 2, 3))]
    encoded = encode_prompt(processor, build_messages("q", 3), images)
    expected = [ImageGeometry(original=(image.height, image.width),
                              resized=smart_resize(image.height, image.width, factor=28,
                                                   min_pixels=processor.image_processor.size["shortest_edge"],
                                                   max_pixels=processor.image_processor.size["longest_edge"]))
                for image in images]
    assert encoded.images == expected
    assert encoded.images[0] == ImageGeometry(original=(140, 196), resized=(140, 196))  # multiples of 28 kept
    assert encoded.images[2].resized[0] * encoded.images[2].resized[1] <= 224 * 224


def test_expand_image_tokens_by_hand():
    assert expand_image_tokens([5, 9, 6, 9, 7], 9, [2, 3]) == [5, 9, 9, 6, 9, 9, 9, 7]
    with pytest.raises(ValueError, match="2 image slots but 1 images"):
        expand_image_tokens([9, 9], 9, [4])


def test_mrope_by_hand_one_image():
    # text(2) + image of 1x4x6 patches -> 1x2x3 merged tokens + text(2): image positions start at 2,
    # text after it resumes at 2 + max(2, 3) = 5.
    ids = torch.tensor([[1, 2] + [9] * 6 + [3, 4]])
    position_ids, deltas = mrope_position_ids(ids, torch.ones_like(ids), torch.tensor([[1, 4, 6]]), 9, 2)
    assert position_ids[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert deltas.tolist() == [7 - 10]


def test_mrope_equals_transformers_get_rope_index_with_padding(tiny):
    processor, model = tiny
    prompts = [encode_prompt(processor, messages, images) for messages, images in _samples()]
    image_id = image_token_id(processor)
    merge = model.config.vision_config.spatial_merge_size
    pad = processor.tokenizer.pad_token_id
    left = collate_prompts(prompts, pad, image_id, merge)
    right = build_training_batch(prompts, [[107, 108, 109], [], [110], [111, 112, 113, 114, 115]], pad, image_id, merge)
    for input_ids, attention_mask, grid, ours in ((left.input_ids, left.attention_mask, left.image_grid_thw,
                                                   left.position_ids),
                                                  (right.input_ids, right.attention_mask, right.image_grid_thw,
                                                   right.position_ids)):
        mm_token_type_ids = (input_ids == image_id).int()
        reference, reference_deltas = model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=grid,
                                                                 attention_mask=attention_mask)
        assert torch.equal(ours, reference)
    _, left_deltas = model.model.get_rope_index(left.input_ids, (left.input_ids == image_id).int(),
                                                image_grid_thw=left.image_grid_thw,
                                                attention_mask=left.attention_mask)
    assert torch.equal(left.rope_deltas, left_deltas.view(-1))
    assert left.attention_mask[2].sum() < left.input_ids.shape[1]  # the text-only row really is padded
    assert left.attention_mask[:, -1].all() and right.attention_mask[:, 0].all()


def test_training_batch_layout_by_hand(tiny_qwen2_5_vl):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    short, long = (encode_prompt(processor, build_messages(text, 0), []) for text in ("hi", "a longer prompt here"))
    batch = build_training_batch([short, long], [[105, 106, 107], [108]], pad_id=0, image_token_id=image_token_id(processor),
                                 spatial_merge_size=2)
    n_short, n_long = len(short.input_ids), len(long.input_ids)
    assert batch.input_ids[0, :n_short + 3].tolist() == short.input_ids + [105, 106, 107]
    assert batch.completion_mask[0].tolist() == [0] * n_short + [1] * 3 + [0] * (batch.input_ids.shape[1] - n_short - 3)
    assert batch.completion_mask[1].sum() == 1 and batch.completion_mask[1, n_long] == 1
    assert batch.prompt_lengths.tolist() == [n_short, n_long]
    assert batch.position_ids[:, 0, :n_short + 3].tolist() == [list(range(n_short + 3))] * 3


def test_training_batch_logits_equal_unpadded_forward(tiny):
    """Right padding + our mrope ids reproduce each row's own unpadded HF forward (the trainer's scoring path)."""
    processor, model = tiny
    samples = _samples()[:3]
    prompts = [encode_prompt(processor, messages, images) for messages, images in samples]
    completions = [[40, 41, 42], [43], [44, 45, 46, 47, 48]]
    batch = build_training_batch(prompts, completions, processor.tokenizer.pad_token_id, image_token_id(processor),
                                 model.config.vision_config.spatial_merge_size)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                       image_grid_thw=batch.image_grid_thw).logits
        for row, ((messages, images), completion) in enumerate(zip(samples, completions)):
            text = render_prompt(processor, messages)
            single = processor(text=[text], images=images or None, return_tensors="pt")
            ids = torch.cat([single["input_ids"], torch.tensor([completion])], dim=1)
            single.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=torch.cat([single["mm_token_type_ids"],
                                                       torch.zeros(1, len(completion), dtype=torch.int)], dim=1))
            model.model.rope_deltas = None
            reference = model(**single).logits[0]
            torch.testing.assert_close(logits[row, :ids.shape[1]], reference, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise(tiny_qwen2_5_vl, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    with pytest.raises(ValueError, match="1 image slots but 2 images"):
        encode_prompt(processor, build_messages("q", 1), [_image(112, 112, (0, 0, 0))] * 2)
    with pytest.raises(ValueError, match="image file not found"):
        encode_prompt(processor, build_messages("q", 1), [tmp_path / "missing.png"])
    ids = torch.tensor([[1] + [9] * 4])
    with pytest.raises(ValueError, match="more image tokens than images"):
        mrope_position_ids(ids, torch.ones_like(ids), None, 9, 2)
    with pytest.raises(ValueError, match="fewer than 16 image tokens"):
        mrope_position_ids(ids, torch.ones_like(ids), torch.tensor([[1, 8, 8]]), 9, 2)
