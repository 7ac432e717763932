"""Qwen-VL on megatron-core vs transformers: same weights, same image+text batch -> same logits (TP/PP)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers


def _logits_worker(rank: int, world_size: int, hf_dir: str, tp: int, pp: int, batches: list[dict]) -> list:
    from megatron.core import parallel_state

    helpers.setup(tp, pp)
    model, _ = helpers.build_loaded(hf_dir)
    model.eval()
    out = []
    for batch in batches:
        data = helpers.run_pipeline(model, batch, forward_only=True)
        if parallel_state.is_pipeline_last_stage():
            logits = data[0]
            out.append((logits, helpers.gather_vocab(logits) if tp > 1 else logits))
        else:
            out.append(None)
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def reference_25(tiny_qwen2_5_vl):
    return [helpers.hf_reference(tiny_qwen2_5_vl, side) for side in ("left", "right")]


def _check(results: list, references: list[dict], tp: int, pp: int) -> None:
    last_stage = [r for r in results if r[0] is not None]
    assert len(last_stage) == tp * (len(results) // (tp * pp))
    for per_rank in last_stage:
        for (shard, full), ref in zip(per_rank, references):
            vocab = ref["logits"].shape[-1]
            mask = ref["attention_mask"].bool()
            if tp == 1:
                assert full.shape == ref["logits"].shape
            else:
                assert shard.shape[-1] == 2048 // tp
                assert torch.isneginf(full[..., vocab:]).all()
                assert torch.isfinite(full[..., :vocab]).all()
            diff = (full[..., :vocab][mask] - ref["logits"][mask]).abs().max().item()
            assert diff <= 1e-4, f"TP={tp} PP={pp}: max abs logit diff {diff}"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_qwen2_5_vl_logits_match_transformers(tiny_qwen2_5_vl, reference_25, tp, pp):
    batches = [{k: v for k, v in ref.items() if k != "logits"} for ref in reference_25]
    results = run_distributed(_logits_worker, tp * pp, str(tiny_qwen2_5_vl), tp, pp, batches)
    _check(results, reference_25, tp, pp)


def test_qwen2_vl_logits_match_transformers(tiny_qwen2_vl):
    references = [helpers.hf_reference(tiny_qwen2_vl, "left")]
    batches = [{k: v for k, v in ref.items() if k != "logits"} for ref in references]
    results = run_distributed(_logits_worker, 4, str(tiny_qwen2_vl), 2, 2, batches)
    _check(results, references, 2, 2)
