"""InternVL on megatron-core vs transformers: same weights, same tiled multi-image batches -> same logits at every
TP/PP (also with the batches' [3, b, s] positions and a ready [b, 1, s, s] mask); the trainer's raw-logits log-probs
equal transformers'; TP=2 x PP=2 gradients equal TP=1 gradients; the exporter gives back the HF checkpoint bit for bit
(untied, and tied across two pipeline stages).

Every model and layout runs inside one 4-process launch (spawning and importing dominate on a 2-core machine).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers
from tests.vlm.model_checks import check_export, check_grads, check_logits, gathered_grads, reference_batches

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
RAW_LAYOUTS = [(1, 1), (2, 2)]  # where the trainer's path (raw [s, b, V/TP] logits -> kernel) is checked


def _images():
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    # 224 wide x 112 high -> 2 tiles + thumbnail; 112 x 336 -> 3 tiles + thumbnail; 112 x 112 -> 1 tile.
    sizes = ((112, 224), (336, 112), (112, 112))
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for h, w in sizes]


def hf_reference(hf_dir: str | Path, padding_side: str) -> dict:
    """Two rows (two tiled images + long text; one single-tile image + short text) and transformers' logits.

    Inputs come from transformers' own processor; positions are HF generation's (count of real tokens), passed to
    both models explicitly.
    """
    wide, tall, square = _images()
    model, enc = helpers.encode_two_rows(hf_dir, padding_side, [[wide, tall], [square]])
    assert enc["pixel_values"].shape[0] == 3 + 4 + 1
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids,
                       pixel_values=enc["pixel_values"]).logits
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": position_ids,
            "pixel_values": enc["pixel_values"], "image_grid_thw": None, "logits": logits}


def _all_models_worker(rank: int, world_size: int, jobs: list[tuple]) -> list[dict]:
    return [_worker(rank, world_size, *job) for job in jobs]


def _worker(rank: int, world_size: int, hf_dir: str, layouts: list, batches: list[dict], backward: bool) -> dict:
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.export import export_hf_weights

    from megatron_vlmr1.vlm.gpt_vlm import padding_attention_mask

    out: dict = {"logits": {}, "grads": {}, "export": None, "trainer_logprobs": {}, "batch_layout_diff": None}
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
        if (tp, pp) == (1, 1):
            # The trainer's layout: positions [3, b, s] (equal axes) and a ready [b, 1, s, s] mask (packing's form).
            batch = dict(batches[0], position_ids=batches[0]["position_ids"][None].repeat(3, 1, 1),
                         attention_mask=padding_attention_mask(batches[0]["attention_mask"]))
            data = helpers.run_pipeline(model, batch, forward_only=True)
            out["batch_layout_diff"] = (data[0] - logits[0][0]).abs().max().item()
        if (tp, pp) in RAW_LAYOUTS:
            with torch.no_grad():
                out["trainer_logprobs"][(tp, pp)] = helpers.trainer_logprobs(model, batches[0], tp)
        if (tp, pp) == (2, 2):
            out["export"] = dict(export_hf_weights(model, family))
        if backward and (tp, pp) in ((1, 1), (2, 2)):
            model.train()
            batch = dict(batches[0], vocab_size=model.layout.vocab_size)
            helpers.run_pipeline(model, batch, forward_only=False)
            out["grads"][(tp, pp)] = gathered_grads(model)
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tiny_internvl, tmp_path_factory) -> dict:
    """The tiny InternVL at every layout (+ grads, export) and a tied-embedding one at TP=2 x PP=2."""
    from tools.make_tiny_model import make_tiny_model

    tied = make_tiny_model("internvl", tmp_path_factory.mktemp("internvl_tied"), seed=1, tie_embeddings=True)
    refs = {"untied": [hf_reference(tiny_internvl, side) for side in ("left", "right")],
            "tied": [hf_reference(tied, "right")]}
    batches = {name: reference_batches(value) for name, value in refs.items()}
    jobs = [(str(tiny_internvl), LAYOUTS, batches["untied"], True), (str(tied), [(2, 2)], batches["tied"], False)]
    per_rank = run_distributed(_all_models_worker, 4, jobs)
    return {"paths": {"untied": tiny_internvl, "tied": tied},
            **{name: (refs[name], [r[i] for r in per_rank]) for i, name in enumerate(("untied", "tied"))}}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_internvl_logits_match_transformers(runs, tp, pp):
    references, results = runs["untied"]
    check_logits(results, references, tp, pp)


def test_internvl_tp2_pp2_grads_match_tp1(runs):
    # A key bias adds the same q.b to every score of a query row; softmax cancels it, so its gradient is zero up to
    # rounding at every layout.
    check_grads(runs["untied"][1], zero_suffixes=("attention.k_proj.bias",))


def test_internvl_export_at_tp2_pp2_is_bit_exact(runs):
    check_export(runs["untied"][1], runs["paths"]["untied"])


def test_internvl_tied_embeddings_over_two_stages(runs):
    references, results = runs["tied"]
    check_logits(results, references, 2, 2)
    check_export(results, runs["paths"]["tied"])


def test_internvl_batch_layout_positions_and_4d_mask(runs):
    assert runs["untied"][1][0]["batch_layout_diff"] == 0.0


@pytest.mark.parametrize("tp,pp", RAW_LAYOUTS)
def test_internvl_trainer_logprobs_from_raw_logits_match_transformers(runs, tp, pp):
    references, results = runs["untied"]
    ref = references[0]
    targets = helpers.next_token_targets(ref)
    # Real query positions only: in the left-padded row the last padding column predicts the first real token from a
    # fully masked query (garbage in both models, never read: training rows are right-padded).
    valid = (targets != -100) & ref["attention_mask"].bool()
    want = torch.log_softmax(ref["logits"].double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    got = [r["trainer_logprobs"][(tp, pp)] for r in results if r["trainer_logprobs"][(tp, pp)] is not None]
    assert len(got) == len(results) // pp
    for logprobs in got:
        assert logprobs.shape == targets.shape
        diff = (logprobs[valid].double() - want[valid]).abs().max().item()
        assert diff <= 1e-4, f"TP={tp} PP={pp}: max abs log-prob diff {diff}"
