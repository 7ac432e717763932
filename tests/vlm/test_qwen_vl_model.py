"""Qwen-VL on megatron-core vs transformers: same weights, same image+text batches -> same logits at every TP/PP;
TP=2 x PP=2 gradients equal TP=1 gradients; the exporter gives back the HF checkpoint bit for bit.

All models and layouts run inside one 4-process launch (re-initialising parallel_state between them) because spawning and
importing dominate the cost on a 2-core machine.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers
from tests.vlm.model_checks import check_export, check_grads, check_logits, gathered_grads, reference_batches

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
RAW_LAYOUTS = [(1, 1), (2, 1), (2, 2)]  # where the trainer's path (raw [s, b, V/TP] logits -> kernel) is checked


def _all_models_worker(rank: int, world_size: int, jobs: list[tuple]) -> list[dict]:
    """Several models in one launch: ``jobs`` is a list of ``_worker`` argument tuples."""
    return [_worker(rank, world_size, *job) for job in jobs]


def _worker(rank: int, world_size: int, hf_dir: str, layouts: list, batches: list[dict], backward: bool) -> dict:
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.export import export_hf_weights

    out: dict = {"logits": {}, "grads": {}, "export": None, "trainer_logprobs": {}}
    for tp, pp in layouts:
        helpers.setup(tp, pp)
        model, family = helpers.build_loaded(hf_dir)
        model.eval()
        logits = []
        for batch in batches:
            data = helpers.run_pipeline(model, batch, forward_only=True)
            if parallel_state.is_pipeline_last_stage():
                logits.append((data[0], helpers.gather_vocab(data[0]) if tp > 1 else data[0]))
        out["logits"][(tp, pp)] = logits or None
        if (tp, pp) in RAW_LAYOUTS:
            with torch.no_grad():
                out["trainer_logprobs"][(tp, pp)] = helpers.trainer_logprobs(model, batches[0], tp)
        if (tp, pp) == (2, 2):
            out["export"] = dict(export_hf_weights(model, family))
        parallel_state.destroy_model_parallel()
        if backward and (tp, pp) in ((1, 1), (2, 2)):
            # Same megatron layout at both sizes (2 query groups) so gradients compare name by name.
            helpers.setup(tp, pp)
            model, _ = helpers.build_loaded(hf_dir, num_query_groups=2)
            batch = dict(batches[0], vocab_size=model.layout.vocab_size)
            helpers.run_pipeline(model, batch, forward_only=False)
            out["grads"][(tp, pp)] = gathered_grads(model)
            parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tiny_qwen2_5_vl, tiny_qwen2_vl, tmp_path_factory) -> dict:
    """Qwen2.5-VL at every layout (+ grads, export), Qwen2-VL at TP2xPP2, and a 4-head model at TP=4."""
    from tools.make_tiny_model import make_tiny_model

    heads4 = make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("heads4"), seed=2, num_heads=4, num_kv_heads=2)
    refs = {"qwen2_5": [helpers.hf_reference(tiny_qwen2_5_vl, side) for side in ("left", "right")],
            "qwen2": [helpers.hf_reference(tiny_qwen2_vl, "left")],
            "tp4": [helpers.hf_reference(heads4, "right")]}
    jobs = [(str(tiny_qwen2_5_vl), LAYOUTS, reference_batches(refs["qwen2_5"]), True),
            (str(tiny_qwen2_vl), [(2, 2)], reference_batches(refs["qwen2"]), False),
            (str(heads4), [(4, 1)], reference_batches(refs["tp4"]), False)]
    per_rank = run_distributed(_all_models_worker, 4, jobs)
    return {name: (refs[name], [r[i] for r in per_rank]) for i, name in enumerate(("qwen2_5", "qwen2", "tp4"))}


@pytest.mark.parametrize("tp,pp", RAW_LAYOUTS)
def test_trainer_logprobs_from_raw_logits_match_transformers(runs, tp, pp):
    # The LM head's [s, b, V/TP] output, padded vocabulary included (2048 columns for 1280 tokens), handed to the
    # kernel as it is with vocab_end: the log-probs of log_softmax over HF's logits.
    references, results = runs["qwen2_5"]
    ref = references[0]
    targets = helpers.next_token_targets(ref)
    valid = targets != -100
    want = torch.log_softmax(ref["logits"].double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    got = [r["trainer_logprobs"][(tp, pp)] for r in results if r["trainer_logprobs"][(tp, pp)] is not None]
    assert len(got) == len(results) // pp
    for logprobs in got:
        assert logprobs.shape == targets.shape and torch.equal(logprobs[~valid], torch.zeros(int((~valid).sum())))
        diff = (logprobs[valid].double() - want[valid]).abs().max().item()
        assert diff <= 1e-4, f"TP={tp} PP={pp}: max abs log-prob diff {diff}"


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_qwen2_5_vl_logits_match_transformers(runs, tp, pp):
    references, results = runs["qwen2_5"]
    check_logits(results, references, tp, pp)


def test_qwen2_5_vl_tp2_pp2_grads_match_tp1(runs):
    check_grads(runs["qwen2_5"][1])


def test_export_at_tp2_pp2_is_bit_exact(runs, tiny_qwen2_5_vl):
    check_export(runs["qwen2_5"][1], tiny_qwen2_5_vl)


def test_qwen2_vl_logits_match_transformers(runs, tiny_qwen2_vl):
    references, results = runs["qwen2"]
    check_logits(results, references, 2, 2)
    check_export(results, tiny_qwen2_vl)


def test_tp4_logits_match_transformers(runs):
    """TP=4 needs 4 query heads; 2 KV heads are repeated to one query group per TP rank."""
    references, results = runs["tp4"]
    check_logits(results, references, 4, 1)
