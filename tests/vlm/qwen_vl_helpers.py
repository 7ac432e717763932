"""Shared pieces of the Qwen-VL megatron tests: HF reference inputs/logits, and running our model at any TP/PP.

Inputs come from transformers' own processor and ``get_rope_index`` (independent of our processor module), so a
parity failure points at the model, not at prompt building.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

# Vocabulary padded to 2048 (the tiny tokenizer has 1280): at TP=2 the second rank's shard is [1024, 2048), so the
# padded columns (-inf) are exercised; at TP=1 they are sliced off.
DIVISIBLE_BY = 1024


def _images():
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    arrays = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8) for h, w in ((112, 112), (112, 168))]
    return [Image.fromarray(a.numpy()) for a in arrays]


def encode_two_rows(hf_dir: str | Path, padding_side: str, images: list) -> tuple:
    """transformers' model and its processor's batch of two rows: ``images[0]`` (list) + a long question, and
    ``images[1]`` (list) + a short one, padded on ``padding_side``. Shared by the Qwen-VL and InternVL model tests."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    messages = [
        [{"role": "user", "content": [{"type": "image"}] * len(images[0])
          + [{"type": "text", "text": "Where is the red circle next to the blue square?"}]}],
        [{"role": "user", "content": [{"type": "image"}] * len(images[1]) + [{"type": "text", "text": "Count."}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    processor.tokenizer.padding_side = padding_side
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side)
    return model, enc


def hf_reference(hf_dir: str | Path, padding_side: str) -> dict:
    """A batch of two rows (two images + long text; one image + short text) and HF's logits for it."""
    first, second = _images()
    model, enc = encode_two_rows(hf_dir, padding_side, [[first, second], [second]])
    position_ids, _ = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                                 image_grid_thw=enc["image_grid_thw"],
                                                 attention_mask=enc["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=position_ids,
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "position_ids": position_ids,
            "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"], "logits": logits}


_ENV = []  # the ParallelEnv of the last ``setup`` in this process


def setup(tp: int, pp: int):
    """Megatron's groups for a TP x PP layout on CPU; returns (and remembers) the ``ParallelEnv``."""
    from megatron_vlmr1.parallel import ParallelConfig, initialize_parallel

    _ENV[:] = [initialize_parallel(ParallelConfig(tp=tp, pp=pp), torch.device("cpu"))]
    return _ENV[0]


def env():
    return _ENV[0]


def build_loaded(hf_dir: str, num_query_groups: int | None = None):
    from megatron_vlmr1.vlm.export import build_model_from_hf

    return build_model_from_hf(hf_dir, env(), num_query_groups=num_query_groups,
                               make_vocab_size_divisible_by=DIVISIBLE_BY)


def _forward_step(batch: dict, data_iterator, model):
    next(data_iterator)
    output = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"],
                   batch["image_grid_thw"], raw_logits=batch.get("raw_logits", False))
    return output, partial(_loss_or_logits, batch)


def _loss_or_logits(batch: dict, logits: torch.Tensor, non_loss_data: bool = False):
    if non_loss_data:
        return logits.detach()
    # Loss over the full vocabulary of real tokens: gather the TP shards first, so every TP size computes the same.
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(logits)[..., :batch["vocab_size"]]
    mask = batch["attention_mask"].bool()
    loss = torch.log_softmax(full, dim=-1)[mask].square().mean()
    return loss, {"loss": loss.detach()}


def run_pipeline(model, batch: dict, forward_only: bool):
    """One micro-batch through megatron's schedule; returns last-stage logits (forward_only) or loss dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = batch["input_ids"].shape[1]
    model.config.pipeline_dtype = torch.float32
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, batch), data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=seq, micro_batch_size=batch["input_ids"].shape[0],
        forward_only=forward_only, collect_non_loss_data=forward_only)


def trainer_logprobs(model, batch: dict, tp: int) -> torch.Tensor | None:
    """Log-probs [b, s] of the next tokens the way the trainer computes them: the LM head's raw [s, b, V/TP]
    output straight into the fused kernel, padded columns excluded by ``vocab_end``. None off the last stage."""
    from megatron.core import parallel_state

    from megatron_vlmr1.kernels import fused_logprob

    data = run_pipeline(model, dict(batch, raw_logits=True), forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    targets = next_token_targets(batch)
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    return fused_logprob(data[0], targets, tp_group=group, vocab_end=model.vocab_size, seq_first=True)


def next_token_targets(batch: dict) -> torch.Tensor:
    """[b, s] next-token ids; -100 at the last position and where this or the next token is padding (a padded
    query row's output is garbage, see ``padding_attention_mask``)."""
    mask = batch["attention_mask"].bool()
    targets = torch.full_like(batch["input_ids"], -100)
    targets[:, :-1] = batch["input_ids"][:, 1:].masked_fill(~(mask[:, :-1] & mask[:, 1:]), -100)
    return targets


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)
