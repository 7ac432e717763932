"""Checks both families' megatron-vs-transformers model tests share: logits at a TP x PP layout, TP=2 x PP=2 gradients
against TP=1, the exporter's bit-exact checkpoint; and the gradients a worker hands back for them."""
from __future__ import annotations

from pathlib import Path

import torch

PADDED_VOCAB = 2048  # qwen_vl_helpers.DIVISIBLE_BY pads the tiny tokenizer's vocabulary to this


def gathered_grads(model) -> dict[str, torch.Tensor]:
    """Full (TP-merged) gradients keyed by global megatron name (this stage's parameters only)."""
    from megatron_vlmr1.vlm.base import shift_layer_index
    from megatron_vlmr1.vlm.stages import gather_full_mcore, stage_info

    _, _, offset = stage_info(model)
    return {shift_layer_index(name, offset): gather_full_mcore(model, name, p.grad)
            for name, p in model.named_parameters()}


def reference_batches(references: list[dict]) -> list[dict]:
    """The model inputs of transformers reference batches (everything but their logits)."""
    return [{k: v for k, v in ref.items() if k != "logits"} for ref in references]


def check_logits(results: list[dict], references: list[dict], tp: int, pp: int) -> None:
    """Every last-stage rank's logits equal transformers' within 1e-4 on real tokens; at TP > 1 the gathered padded
    vocabulary columns are -inf."""
    last_stage = [r["logits"][(tp, pp)] for r in results if r["logits"][(tp, pp)] is not None]
    assert len(last_stage) == len(results) // pp
    for per_rank in last_stage:
        for (shard, full), ref in zip(per_rank, references, strict=True):
            vocab = ref["logits"].shape[-1]
            mask = ref["attention_mask"].bool()
            if tp == 1:
                assert full.shape == ref["logits"].shape
            else:
                assert shard.shape[-1] == PADDED_VOCAB // tp
                assert full.shape[-1] == PADDED_VOCAB
                assert torch.isneginf(full[..., vocab:]).all()
                assert torch.isfinite(full[..., :vocab]).all()
            diff = (full[..., :vocab][mask] - ref["logits"][mask]).abs().max().item()
            assert diff <= 1e-4, f"TP={tp} PP={pp}: max abs logit diff {diff}"


def check_export(results: list[dict], hf_dir: Path) -> None:
    """Every rank's exported tensors are the HF checkpoint's, bit for bit, names included."""
    from safetensors.torch import load_file

    expected = load_file(str(hf_dir / "model.safetensors"))
    for result in results:
        exported = result["export"]
        assert sorted(exported) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), name


def check_grads(results: list[dict], zero_suffixes: tuple[str, ...] = ()) -> None:
    """TP=2 x PP=2 gradients (merged over ranks) equal TP=1's within 1e-5 relative, each non-zero; parameters named
    with ``zero_suffixes`` have a gradient that is mathematically zero, so both sides must be (up to rounding)."""
    reference = results[0]["grads"][(1, 1)]
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        merged.update(result["grads"][(2, 2)])
    assert merged.keys() == reference.keys()
    for name, grad in merged.items():
        ref = reference[name]
        if name.endswith(zero_suffixes):
            assert ref.abs().max() < 1e-6 and grad.abs().max() < 1e-6, name
            continue
        assert ref.abs().sum() > 0, name
        rel = ((grad - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"{name}: relative grad diff {rel}"
