"""What a model family's input side produces, independent of the family: the typed hand-off between the data,
the rollout engines and the trainer.

A prompt is chat messages (``ChatMessage``, with one ``{"type": "image"}`` slot per image) plus its images; a
family encodes it once into an ``EncodedPrompt`` (token ids with the image tokens expanded, preprocessed pixels,
each image's geometry). Engines generate from it and hand it back with their completions, and the trainer builds
its ``TrainingBatch`` rows from the same object, so nothing is encoded twice and the trainer scores exactly the
prompt that was sampled from.

Layout conventions (every family follows them):
  - generation batches (``PromptBatch``) are **left**-padded: every row's next token is at the last column;
  - training batches (``TrainingBatch``: prompt + completion) are **right**-padded: a row starts at column 0;
  - pixel values of all images of all rows are concatenated in row order, then image order within a row.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import torch

from megatron_vlmr1.data.messages import ChatMessage, ContentItem, count_images
from megatron_vlmr1.data.schema import ImageInput

if TYPE_CHECKING:
    from transformers import ProcessorMixin

__all__ = ["ChatMessage", "ContentItem", "EncodedPrompt", "ImageGeometry", "ImageInput", "PromptBatch",
           "TrainingBatch", "cat_or_none", "count_images", "generation_rows", "pad_rows", "render_prompt",
           "template_ids", "training_rows"]


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """Original image size and the size the processor resized it to (what the model's coordinates refer to).

    Sizes are ``(height, width)`` in pixels. Boxes predicted in resized pixels map to the original image by
    multiplying x by ``original[1] / resized[1]`` and y by ``original[0] / resized[0]``.
    """

    original: tuple[int, int]
    resized: tuple[int, int]


@dataclasses.dataclass
class EncodedPrompt:
    """One prompt ready for a model: image tokens expanded, images preprocessed.

    ``input_ids`` [seq] (list of ints), ``pixel_values`` [num_patches, patch_dim] or None, ``image_grid_thw``
    [num_images, 3] (the family's image grid, e.g. Qwen-VL's patches before merging) or None, ``images`` one
    geometry per image.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images: list[ImageGeometry]


@dataclasses.dataclass
class PromptBatch:
    """Left-padded prompts for generation.

    ``input_ids``/``attention_mask`` [batch, seq], ``position_ids`` [3, batch, seq] (0 at padding),
    ``rope_deltas`` [batch] (next text position minus next column index), ``pixel_values`` [patches, dim] or None,
    ``image_grid_thw`` [images, 3] or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


@dataclasses.dataclass
class TrainingBatch:
    """Right-padded prompt + completion rows for scoring/training.

    ``input_ids``/``attention_mask`` [batch, seq]; ``position_ids`` [3, batch, seq] (0 at padding);
    ``completion_mask`` [batch, seq] is 1 where the *token* at that column is a completion token, so the log-prob of
    token ``t`` comes from the logits at column ``t - 1``; ``prompt_lengths`` [batch]; pixel fields as in PromptBatch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def render_prompt(processor: ProcessorMixin, messages: Sequence[ChatMessage]) -> str:
    """The processor's chat template applied with ``add_generation_prompt=True``: one vision block per image slot."""
    return processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def template_ids(processor: ProcessorMixin, messages: Sequence[ChatMessage], images: Sequence[ImageInput]) -> list[int]:
    """The rendered prompt's token ids, one unexpanded image token per slot (checked against ``images``)."""
    if count_images(messages) != len(images):
        raise ValueError(f"messages have {count_images(messages)} image slots but {len(images)} images were given")
    return processor.tokenizer(render_prompt(processor, messages), add_special_tokens=False)["input_ids"]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask) [len(rows), longest], padded on the left or the right."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[index, columns] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, columns] = 1
    return input_ids, attention_mask


def generation_rows(prompts: Sequence[EncodedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a generation batch: the prompts left-padded."""
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    return pad_rows([p.input_ids for p in prompts], pad_id, left=True)


def training_rows(prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]],
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask, prompt_lengths) of right-padded ``prompt + completion`` rows
    (row i pairs ``prompts[i]`` with ``completions[i]``); the family adds its position ids and pixels."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("build_training_batch needs at least one row")
    rows = [list(p.input_ids) + list(c) for p, c in zip(prompts, completions)]
    input_ids, attention_mask = pad_rows(rows, pad_id, left=False)
    completion_mask = torch.zeros_like(attention_mask)
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        completion_mask[index, len(prompt.input_ids):len(prompt.input_ids) + len(completion)] = 1
    prompt_lengths = torch.tensor([len(p.input_ids) for p in prompts], dtype=torch.long)
    return input_ids, attention_mask, completion_mask, prompt_lengths


def cat_or_none(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The present tensors concatenated along dim 0 (a batch's pixels in row order), or None if there are none."""
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None
