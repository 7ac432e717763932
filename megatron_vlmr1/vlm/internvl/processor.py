"""InternVL prompt side: chat messages + images -> token ids, tiles and 1-D position ids.

The same contract as ``qwen_vl.processor`` (and the same dataclasses), so engines and trainer treat both families
alike: the prompt a completion was sampled from is token for token the prompt the trainer scores.

InternVL specifics:
  - the chat template writes one ``<IMG_CONTEXT>`` per image; it is expanded to ``<img>``, then
    ``image_seq_length`` ``<IMG_CONTEXT>`` tokens per tile, then ``</img>`` (what ``InternVLProcessor`` does);
  - an image is cut into up to ``max_patches`` fixed-size tiles on the grid whose aspect ratio is closest to the
    image's, plus a thumbnail of the whole image when there is more than one tile (transformers' image processor does
    the pixels; ``crop_to_patches`` is always on, as the processor sets it);
  - ``pixel_values`` are [tiles, 3, tile, tile] for all images in order; there is no ``image_grid_thw``;
  - positions are 1-D: 0, 1, 2, ... over a row's real tokens (image tokens count as ordinary tokens), 0 at padding;
    batches hold them as the family-independent [3, b, s] (three equal axes), which the model reads as plain RoPE.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image

from megatron_vlmr1.data.schema import load_image
from megatron_vlmr1.vlm.inputs import (
    ChatMessage,
    EncodedPrompt,
    ImageGeometry,
    ImageInput,
    PromptBatch,
    TrainingBatch,
    cat_or_none,
    generation_rows,
    template_ids,
    training_rows,
)

START_IMAGE, END_IMAGE, IMAGE_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
# Tokens that only ever mark image/video positions; no engine may sample them (the family's vision_placeholders).
PLACEHOLDER_TOKENS = (IMAGE_CONTEXT, START_IMAGE, END_IMAGE, VIDEO)


def token_id(processor: Any, token: str) -> int:
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token (is this an InternVL processor?)")
    return ids[0]


def image_token_id(processor: Any) -> int:
    return token_id(processor, IMAGE_CONTEXT)


def expand_image_tokens(input_ids: Sequence[int], tiles_per_image: Sequence[int], tokens_per_tile: int,
                        context_id: int, start_id: int, end_id: int) -> list[int]:
    """Replace the i-th ``<IMG_CONTEXT>`` by ``<img>`` + ``tiles_per_image[i] * tokens_per_tile`` contexts + ``</img>``."""
    slots = sum(1 for token in input_ids if token == context_id)
    if slots != len(tiles_per_image):
        raise ValueError(f"prompt has {slots} image slots but {len(tiles_per_image)} images were given")
    expanded: list[int] = []
    tiles = iter(tiles_per_image)
    for token in input_ids:
        if token == context_id:
            expanded.extend([start_id] + [context_id] * (next(tiles) * tokens_per_tile) + [end_id])
        else:
            expanded.append(token)
    return expanded


def tile_canvas(image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """(height, width) in pixels of the tile grid the processor resizes an image of ``(height, width)`` to."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    tile = image_processor.size
    columns, rows = get_optimal_tiled_canvas(tuple(image_size), (tile.height, tile.width),
                                             image_processor.min_patches, image_processor.max_patches)
    return rows * tile.height, columns * tile.width


def encode_prompt(processor: Any, messages: Sequence[ChatMessage], images: Sequence[ImageInput],
                  open_image: Callable[[ImageInput], Image.Image] = load_image) -> EncodedPrompt:
    """Tokenise the templated prompt, tile its images and expand each image slot to its tiles' tokens.

    ``open_image`` loads a path or PIL image (the family's loader: RGB, upscaled to the minimum side).
    """
    ids = template_ids(processor, messages, images)
    if not images:
        if image_token_id(processor) in ids:
            raise ValueError("the rendered prompt holds <IMG_CONTEXT> but no images were given")
        return EncodedPrompt(ids, None, None, [])
    pil_images = [open_image(image) for image in images]
    image_processor = processor.image_processor
    processed = image_processor(images=pil_images, crop_to_patches=True, return_tensors="pt")
    tiles = [int(n) for n in processed["num_patches"]]
    geometry = [ImageGeometry(original=(image.height, image.width),
                              resized=tile_canvas((image.height, image.width), image_processor))
                for image in pil_images]
    expanded = expand_image_tokens(ids, tiles, processor.image_seq_length, image_token_id(processor),
                                   token_id(processor, START_IMAGE), token_id(processor, END_IMAGE))
    return EncodedPrompt(expanded, processed["pixel_values"], None, geometry)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions [b, s]: 0, 1, ... over each row's real tokens (either padding side), 0 at padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()


def batch_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``position_ids`` on the three axes batches carry: [3, b, s] (the model and packing read this layout)."""
    return position_ids(attention_mask)[None].repeat(3, 1, 1)


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_id: int) -> PromptBatch:
    """Left-pad prompts into one generation batch; 1-D positions as [3, b, s] (``rope_deltas`` 0: positions count
    tokens)."""
    input_ids, attention_mask = generation_rows(prompts, pad_id)
    return PromptBatch(input_ids, attention_mask, batch_position_ids(attention_mask),
                       torch.zeros(len(prompts), dtype=torch.long), cat_or_none([p.pixel_values for p in prompts]),
                       None)


def build_training_batch(prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]],
                         pad_id: int) -> TrainingBatch:
    """Right-padded ``prompt + completion`` rows with 1-D positions (row i pairs ``prompts[i]``, ``completions[i]``).

    As for Qwen-VL, a prompt repeated G times repeats its tiles, so every row is self-contained.
    """
    input_ids, attention_mask, completion_mask, prompt_lengths = training_rows(prompts, completions, pad_id)
    return TrainingBatch(input_ids, attention_mask, batch_position_ids(attention_mask), completion_mask, prompt_lengths,
                         cat_or_none([p.pixel_values for p in prompts]), None)
