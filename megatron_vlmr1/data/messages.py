"""Chat messages: the one place a question and its images become the processor's message format."""
from __future__ import annotations

from typing import Sequence, Union

from megatron_vlmr1.data.schema import IMAGE_TOKEN

ContentItem = dict[str, str]  # {"type": "image"} or {"type": "text", "text": "..."}
ChatMessage = dict[str, Union[str, list[ContentItem]]]  # {"role": "user", "content": [ContentItem, ...]}


def build_messages(text: str, num_images: int, system_prompt: str | None = None) -> list[ChatMessage]:
    """Chat messages for one user turn; each ``<image>`` in ``text`` becomes an image slot, in order.

    Text without ``<image>`` markers gets all its images before the text (VLM-R1's convention, and how training
    data is worded: the loader strips the markers from the question). An empty or missing ``system_prompt`` adds no
    system turn.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    pieces = text.split(IMAGE_TOKEN)
    markers = len(pieces) - 1
    if markers == 0:
        pieces = [""] * num_images + [text]
    elif markers != num_images:
        raise ValueError(f"prompt has {markers} {IMAGE_TOKEN} markers but {num_images} images were given")
    content: list[ContentItem] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def count_images(messages: Sequence[ChatMessage]) -> int:
    """Number of image slots in chat messages (content items of type ``image``)."""
    return sum(1 for message in messages if not isinstance(message["content"], str)
               for item in message["content"] if item.get("type") == "image")
