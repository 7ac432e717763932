"""Data: VLM-R1 jsonl validation and loading, prompt templates, resumable DP batches, synthetic shape data."""
from megatron_vlmr1.data.dataset import (DataConfig, Sample, build_messages, collate_reward_fields, load_samples,
                                         prompt_iterator)
from megatron_vlmr1.data.iterator import BatchIterator, epoch_order, shard
from megatron_vlmr1.data.schema import Row, load_image, read_jsonl, upscale_to_min_side
from megatron_vlmr1.data.templates import TEMPLATES, format_question, question_template

__all__ = [
    "BatchIterator", "DataConfig", "Row", "Sample", "TEMPLATES", "build_messages", "collate_reward_fields",
    "epoch_order", "format_question", "load_image", "load_samples", "prompt_iterator", "question_template",
    "read_jsonl", "shard", "upscale_to_min_side",
]
