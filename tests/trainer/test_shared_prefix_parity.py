"""Shared-prefix packing gives the per-row forward's log-probs and gradients (TP=1, TP=2, PP=2, LoRA).

Two groups (a two-image prompt and a one-image prompt) with three completions of different lengths go through
``ScoringModel.run`` (megatron's schedule, two micro-batches) once per row, on the per-row model (megatron's own
attention under a padding mask), and once packed, on a model built with the shared-prefix core attention
(``vlm/prefix_attention.py``) and the same weights. The loss is a fixed random weighting of every completion token's
log-prob, so every parameter's gradient is compared. The packed model runs with activation recompute in some cases
(``selective``: the core attention, ``full``: whole layers), which saves the layout as a tensor and replays the
attention in backward.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.device import TEST_DEVICE
from tests.distributed import run_distributed


def _groups(processor, family):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in ((56, 84), (56, 56))]
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the red circles."}]}],
    ]
    prompts = [family.encode_prompt(processor, messages[0], images),
               family.encode_prompt(processor, messages[1], images[1:])]
    completions = [[torch.randint(100, 1000, (n,), generator=gen).tolist() for n in lengths]
                   for lengths in ((5, 9, 1), (7, 3, 6))]
    return prompts, completions


def _run(model_dir: str, tp: int, pp: int, train_mode: str, recompute: str = "none", device: str = "cpu") -> dict:
    """Per-row and packed log-probs [rows, T] (last stage) and gradients (every rank) of this rank's model."""
    from megatron_vlmr1.trainer.config import ParallelConfig
    from megatron_vlmr1.parallel import init_parallel, teardown_parallel

    env = init_parallel(ParallelConfig(tp=tp, pp=pp, device=device), seed=0)
    try:
        return _compute(model_dir, env, train_mode, recompute)
    finally:
        teardown_parallel(env)


def _compute(model_dir: str, env, train_mode: str, recompute: str) -> dict:
    from transformers import AutoConfig

    from megatron_vlmr1.trainer.batching import make_micro_batches, make_shared_prefix_micro_batches
    from megatron_vlmr1.trainer.config import ModelConfig
    from megatron_vlmr1.trainer.policy import ScoringModel, apply_train_mode
    from megatron_vlmr1.vlm.families import get_family
    from megatron_vlmr1.vlm.lora import lora_adapters

    hf_config = AutoConfig.from_pretrained(model_dir)
    family = get_family(hf_config)
    processor = family.load_processor(model_dir)
    model_cfg = ModelConfig(path=model_dir, train_mode=train_mode)
    models = {}
    for name, shared_prefix in (("rows", False), ("packed", True)):
        scoring = models[name] = ScoringModel(family, hf_config, model_dir, env, model_cfg, shared_prefix=shared_prefix,
                                              recompute=recompute if shared_prefix else "none")
        apply_train_mode(scoring.module, model_cfg)
        if train_mode == "lora":  # non-zero B (the same in both models) so that the adapters change the forward
            gen = torch.Generator().manual_seed(1)
            for adapter in lora_adapters(scoring.module).values():
                adapter.B.data.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.05)
    prompts, completions = _groups(processor, family)
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(len(c), generator=gen).tolist() for group in completions for c in group]
    rows = [(p, c) for p, group in zip(prompts, completions) for c in group]
    per_row = make_micro_batches(family, processor, hf_config, [p for p, _ in rows], [c for _, c in rows], 3,
                                 row_token_values={"weights": weights})
    packed = make_shared_prefix_micro_batches(family, processor, hf_config, prompts, completions, 1,
                                              row_token_values={"weights": weights})
    if env.pp == 1:  # a model with megatron's own attention refuses packed rows instead of misreading them
        with pytest.raises(ValueError, match="shared_prefix_attention"):
            models["rows"].run(packed[:1], lambda batch, logprobs, entropy: (logprobs.sum(), {}), forward_only=True)
    out = {}
    for name, micro_batches in (("rows", per_row), ("packed", packed)):
        kept = []

        def token_loss(batch, logprobs, entropy):
            kept.append(logprobs.detach())
            return (logprobs * batch.fields["weights"]).sum(), {}

        scoring = models[name]
        scoring.module.zero_grad(set_to_none=True)
        scoring.module.train()
        scoring.run(micro_batches, token_loss, forward_only=False)
        grads = {n: p.grad.clone() for n, p in scoring.module.named_parameters() if p.grad is not None}
        logprobs = []
        for batch, values in zip(micro_batches, kept):  # per-completion layout: column k = completion token k
            for row in range(values.shape[0]):
                columns = batch.loss_mask[row].nonzero().flatten()
                logprobs.append(values[row, columns])
        out[name] = {"logprobs": logprobs, "grads": grads}
    return out


def _compare(result: dict) -> None:
    rows, packed = result["rows"], result["packed"]
    assert len(rows["logprobs"]) == len(packed["logprobs"]) == 6
    for a, b in zip(rows["logprobs"], packed["logprobs"]):
        assert a.shape == b.shape and a.numel() > 0
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert rows["grads"].keys() == packed["grads"].keys() and rows["grads"]
    # A key projection's bias has a gradient that is mathematically zero (softmax ignores a shift shared by all keys;
    # InternVL's vision attention has a separate k_proj bias): its float32 noise (~1e-11) is measured against the
    # largest gradient, not against itself.
    floor = 1e-6 * max(grad.norm() for grad in rows["grads"].values())
    for name, grad in rows["grads"].items():
        error = (packed["grads"][name] - grad).norm() / torch.maximum(grad.norm(), floor)
        assert error < 1e-5, (name, float(error))


def _distributed(rank, world_size, model_dir, tp, pp, train_mode, recompute):
    result = _run(model_dir, tp, pp, train_mode, recompute)
    try:
        if result["rows"]["logprobs"]:  # the last pipeline stage
            _compare(result)
    except AssertionError as error:
        return f"rank {rank}: {error}"
    return "ok"


@pytest.mark.parametrize("train_mode,recompute", [("full", "none"), ("lora", "selective")])
def test_shared_prefix_matches_per_row_tp1(tiny_qwen2_5_vl, train_mode, recompute):
    result = _run(str(tiny_qwen2_5_vl), 1, 1, train_mode, recompute, device=TEST_DEVICE)
    _compare(result)
    if train_mode == "full":  # the vision tower is trained too: its gradient goes through the shared prompt
        assert any(name.startswith("visual.") for name in result["rows"]["grads"])


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,recompute", [(2, 1, "none"), (1, 2, "full")])
def test_shared_prefix_matches_per_row_tp2_pp2_lora(tiny_qwen2_5_vl_kv2, tp, pp, recompute):
    results = run_distributed(_distributed, 2, str(tiny_qwen2_5_vl_kv2), tp, pp, "lora", recompute)
    assert results == ["ok", "ok"]


def test_shared_prefix_matches_per_row_internvl(tiny_internvl):
    """InternVL (1-D positions, pixel-shuffled image tokens, its own prompt template) packs the same way."""
    result = _run(str(tiny_internvl), 1, 1, "full", device=TEST_DEVICE)
    _compare(result)
    assert any("vision" in name for name in result["rows"]["grads"])
