"""Data: VLM-R1 jsonl validation and loading, prompt templates, resumable DP batches, synthetic shape data."""
from megatron_vlmr1.data.dataset import (DataConfig, Sample, collate_reward_fields, load_samples, prompt_iterator,
                                         target_image)
from megatron_vlmr1.data.iterator import BatchIterator, epoch_order, shard
from megatron_vlmr1.data.messages import ChatMessage, ContentItem, build_messages, count_images
from megatron_vlmr1.data.schema import (IMAGE_TOKEN, ImageInput, Row, jsonl_lines, load_image, open_image,
                                        read_jsonl, upscale_to_min_side)
from megatron_vlmr1.data.templates import TEMPLATES, format_question, question_template

__all__ = [
    "BatchIterator", "ChatMessage", "ContentItem", "DataConfig", "IMAGE_TOKEN", "ImageInput", "Row", "Sample",
    "TEMPLATES", "build_messages", "collate_reward_fields", "count_images", "epoch_order", "format_question",
    "jsonl_lines", "load_image", "load_samples", "open_image", "prompt_iterator", "question_template", "read_jsonl",
    "shard", "target_image", "upscale_to_min_side",
]
