"""InternVL through the family-generic trainers. SFT: full training learns and exports the HF checkpoint layout,
freeze_vision leaves InternViT + projector untouched, LoRA trains only adapters and exports a PEFT adapter that
agrees with the merged weights. GRPO with the transformers (``hf``) rollout engine: the engine samples under the
weights synced into it every step, which the megatron actor re-scores to the same log-probs; boxes are scored in
InternVL's 0-1000 space."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.trainer.conftest import check_lora_export, grpo_config, run, sft_config

pytestmark = pytest.mark.slow
VISUAL_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def _sft():
    from megatron_vlmr1.trainer.sft import SFTTrainer

    return SFTTrainer


def test_internvl_sft_loss_falls_and_exports_the_hf_layout(tiny_internvl, rec_data, tmp_path):
    cfg = sft_config(tiny_internvl, rec_data, tmp_path, train={"steps": 8}, checkpoint={"export_hf": True})
    losses = [r["loss"] for r in run(_sft(), cfg)]
    assert losses[-1] < 0.8 * losses[0], losses
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(Path(tiny_internvl) / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert not torch.equal(exported["language_model.lm_head.weight"], original["language_model.lm_head.weight"])
    assert not torch.equal(exported["multi_modal_projector.linear_1.weight"],
                           original["multi_modal_projector.linear_1.weight"])


def test_internvl_freeze_vision_changes_only_the_language_model(tiny_internvl, rec_data, tmp_path):
    cfg = sft_config(tiny_internvl, rec_data, tmp_path, train={"steps": 2}, model={"train_mode": "freeze_vision"},
                     checkpoint={"export_hf": True})
    run(_sft(), cfg)
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(Path(tiny_internvl) / "model.safetensors"))
    visual = [k for k in original if k.startswith(VISUAL_PREFIXES)]
    language = [k for k in original if k not in visual]
    assert visual and language
    assert all(torch.equal(exported[k], original[k]) for k in visual)
    assert sum(not torch.equal(exported[k], original[k]) for k in language) > len(language) // 2


def test_internvl_lora_sft_exports_merged_weights_and_a_peft_adapter_that_agree(tiny_internvl, rec_data, tmp_path):
    cfg = sft_config(tiny_internvl, rec_data, tmp_path, model={"train_mode": "lora", "lora_rank": 4,
                                                                 "lora_alpha": 8.0},
                     optim={"lr": 1e-2}, train={"steps": 2}, checkpoint={"export_hf": True})
    run(_sft(), cfg)
    check_lora_export(tmp_path, tiny_internvl, "language_model.model.layers.", low_token_id=20)


def test_internvl_grpo_hf_engine_rollouts_match_the_trainer_after_every_sync(tiny_internvl, rec_data, tmp_path):
    from megatron_vlmr1.trainer.grpo import GRPOTrainer

    cfg = grpo_config(tiny_internvl, rec_data, tmp_path, algo={"group_size": 4, "beta": 0.04},
                      rewards=[{"name": "tests.trainer.test_grpo_vllm:text_length", "weight": 1.0}],
                      optim={"lr": 1e-2}, train={"steps": 3, "micro_batch_size": 4},
                      checkpoint={"export_hf": True})
    records = run(GRPOTrainer, cfg)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        # fp32 transformers sampling vs the megatron actor on the same tokens, after each step's weight sync
        assert record["rollout_logprob_gap"] < 1e-4 and record["rollout_logprob_gap_max"] < 1e-3, record
        assert record["grad_norm"] > 0, record
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["box_space"] == "norm1000"  # box_space: auto resolved to InternVL's own space
    before = load_file(str(Path(tiny_internvl) / "model.safetensors"))
    after = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert after.keys() == before.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-2  # the synced weights really moved
