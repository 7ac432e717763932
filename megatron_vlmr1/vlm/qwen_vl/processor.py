"""Qwen-VL prompt side: chat messages + images -> token ids, pixel values and 3-D mrope position ids.

Both engines (HF, vLLM) and the trainer go through these functions, so the prompt a completion was sampled from is
token for token the prompt the trainer scores it under. The transformers processor is used only for what is
model-specific and stable (chat template, image preprocessing); image-token expansion, padding and the mrope index
are done here as small pure functions, tested against transformers.

Layout conventions:
  - a prompt's ``<|image_pad|>`` is expanded to ``t*h*w / merge**2`` copies, one per merged vision patch;
  - generation batches are **left**-padded (every row's next token is at the last column);
  - training batches (prompt + completion) are **right**-padded (a row's tokens start at column 0);
  - pixel values of all images of all rows are concatenated in row order, then image order within a row.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from megatron_vlmr1.data.messages import ChatMessage
from megatron_vlmr1.data.schema import load_image
from megatron_vlmr1.vlm.inputs import (
    EncodedPrompt,
    ImageGeometry,
    ImageInput,
    PromptBatch,
    TrainingBatch,
    cat_or_none,
    generation_rows,
    render_prompt,
    template_ids,
    training_rows,
)

if TYPE_CHECKING:
    from transformers import ProcessorMixin

__all__ = ["EncodedPrompt", "ImageGeometry", "PromptBatch", "TrainingBatch", "build_training_batch",
           "collate_prompts", "encode_prompt", "expand_image_tokens", "image_token_id", "image_tokens_per_image",
           "mrope_position_ids", "render_prompt"]

def image_tokens_per_image(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Merged vision tokens per image: ``t * h * w / merge_size**2`` for each row of ``image_grid_thw`` [n, 3]."""
    return (image_grid_thw.prod(-1) // merge_size**2).tolist()


def expand_image_tokens(input_ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th ``image_token_id`` by ``counts[i]`` copies of it."""
    slots = sum(1 for token in input_ids if token == image_token_id)
    if slots != len(counts):
        raise ValueError(f"prompt has {slots} image slots but {len(counts)} images were given")
    expanded: list[int] = []
    remaining = iter(counts)
    for token in input_ids:
        expanded.extend([token] * next(remaining) if token == image_token_id else [token])
    return expanded


def image_token_id(processor: ProcessorMixin) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def encode_prompt(processor: ProcessorMixin, messages: Sequence[ChatMessage], images: Sequence[ImageInput],
                  open_image: Callable[[ImageInput], Image.Image] = load_image) -> EncodedPrompt:
    """Tokenise the templated prompt, preprocess its images and expand each image slot to its token count.

    ``open_image`` loads a path or PIL image (the family's loader: RGB, upscaled to the minimum side).
    """
    ids = template_ids(processor, messages, images)
    if not images:
        return EncodedPrompt(ids, None, None, [])
    pil_images = [open_image(image) for image in images]
    image_processor = processor.image_processor
    processed = image_processor(images=pil_images, return_tensors="pt")
    grid = processed["image_grid_thw"]
    counts = image_tokens_per_image(grid, image_processor.merge_size)
    geometry = [ImageGeometry(original=(image.height, image.width),
                              resized=(int(g[1]) * image_processor.patch_size, int(g[2]) * image_processor.patch_size))
                for image, g in zip(pil_images, grid)]
    return EncodedPrompt(expand_image_tokens(ids, image_token_id(processor), counts), processed["pixel_values"], grid,
                         geometry)


def mrope_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       image_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL's 3-D rotary positions (temporal, height, width) for text + images.

    ``input_ids``/``attention_mask`` [batch, seq] (padding on either side), ``image_grid_thw`` [images, 3] for all
    images of the batch in row order. Text tokens advance all three axes by 1. An image of ``t x h x w`` merged
    patches starting at position ``p`` gets ``(p + i_t, p + i_h, p + i_w)`` and the text after it resumes at
    ``p + max(h, w)``, so positions can run behind the token count. Padding gets 0.
    Returns ``position_ids`` [3, batch, seq] and ``rope_deltas`` [batch] = (max position + 1) - (number of tokens),
    the offset generation adds to later text positions.
    """
    batch, seq = input_ids.shape
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    for row in range(batch):
        valid = attention_mask[row].bool()
        is_image = (input_ids[row][valid] == image_token_id).tolist()
        pieces, position, start = [], 0, 0
        while start < len(is_image):
            if not is_image[start]:
                end = start
                while end < len(is_image) and not is_image[end]:
                    end += 1
                pieces.append(torch.arange(position, position + end - start).expand(3, -1))
                position += end - start
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(f"row {row}: more image tokens than images in image_grid_thw") from None
                h, w = h // spatial_merge_size, w // spatial_merge_size
                end = start + t * h * w
                if end > len(is_image) or not all(is_image[start:end]):
                    raise ValueError(f"row {row}: image at token {start} has fewer than {t * h * w} image tokens")
                grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pieces.append(torch.stack(grid).reshape(3, -1) + position)
                position += max(h, w)
            start = end
        if pieces:
            positions = torch.cat(pieces, dim=1)
            position_ids[:, row, valid] = positions
            deltas[row] = positions.max() + 1 - len(is_image)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than the batch has image token runs")
    return position_ids, deltas


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_id: int, image_token_id: int,
                    spatial_merge_size: int) -> PromptBatch:
    """Left-pad prompts into one generation batch with mrope positions."""
    input_ids, attention_mask = generation_rows(prompts, pad_id)
    grid = cat_or_none([p.image_grid_thw for p in prompts])
    position_ids, deltas = mrope_position_ids(input_ids, attention_mask, grid, image_token_id, spatial_merge_size)
    return PromptBatch(input_ids, attention_mask, position_ids, deltas, cat_or_none([p.pixel_values for p in prompts]),
                       grid)


def build_training_batch(prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]], pad_id: int,
                         image_token_id: int, spatial_merge_size: int) -> TrainingBatch:
    """Right-padded ``prompt + completion`` rows (row i pairs ``prompts[i]`` with ``completions[i]``).

    Repeat a prompt G times in ``prompts`` for its G completions; its images are then repeated too, which keeps every
    row self-contained (a row can go to any micro-batch or data-parallel rank).
    """
    input_ids, attention_mask, completion_mask, prompt_lengths = training_rows(prompts, completions, pad_id)
    grid = cat_or_none([p.image_grid_thw for p in prompts])
    position_ids, _ = mrope_position_ids(input_ids, attention_mask, grid, image_token_id, spatial_merge_size)
    return TrainingBatch(input_ids, attention_mask, position_ids, completion_mask, prompt_lengths,
                         cat_or_none([p.pixel_values for p in prompts]), grid)
