"""LoRA through the trainers: only adapters train, exports (merged HF + PEFT) agree, GRPO's reference is the base
model without a second copy, and TP=2 reproduces TP=1."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run_distributed
from tests.trainer.conftest import check_lora_export, grpo_config, run, sft_config

LORA = {"train_mode": "lora", "lora_rank": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def sft_lora_run(tiny_qwen2_5_vl, rec_data, tmp_path_factory):
    """A 4-step LoRA SFT run with exports: (output dir, parameters before, parameters after)."""
    from megatron_vlmr1.trainer.sft import SFTTrainer

    out = tmp_path_factory.mktemp("sft_lora")
    trainer = SFTTrainer(sft_config(tiny_qwen2_5_vl, rec_data, out, model=LORA, optim={"lr": 1e-2},
                                    train={"steps": 4}, checkpoint={"export_hf": True}))
    try:
        before = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()}
        trainer.fit()
        after = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()}
    finally:
        trainer.close()
    return out, before, after


def test_sft_lora_trains_only_adapters(sft_lora_run):
    out, before, after = sft_lora_run
    adapters = [n for n in before if ".lora." in n]
    assert len(adapters) == 2 * 4 * 2  # layers x targets x (A, B)
    for name, tensor in before.items():
        if name in adapters:
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"frozen {name} changed"
    losses = [r["loss"] for r in _records(out)]
    assert losses[-1] < losses[0], losses


def test_sft_lora_resume_gives_the_uninterrupted_next_step(sft_lora_run, tiny_qwen2_5_vl, rec_data, tmp_path):
    from megatron_vlmr1.trainer.sft import SFTTrainer

    straight = _records(sft_lora_run[0])
    for steps in (2, 4):
        run(SFTTrainer, sft_config(tiny_qwen2_5_vl, rec_data, tmp_path, model=LORA, optim={"lr": 1e-2},
                                   train={"steps": steps}))
    resumed = _records(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sft_lora_exports_merged_weights_and_a_peft_adapter_that_agree(sft_lora_run, tiny_qwen2_5_vl):
    out = sft_lora_run[0]
    exported = load_file(str(out / "hf" / "model.safetensors"))
    original = load_file(str(Path(tiny_qwen2_5_vl) / "model.safetensors"))
    assert exported.keys() == original.keys()
    check_lora_export(out, tiny_qwen2_5_vl, "model.layers.", low_token_id=0)


def _records(out: Path) -> list[dict]:
    from megatron_vlmr1.trainer.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def text_hash_reward(completions: list[str], **_) -> list[float]:
    """Differs between random completions (the built-in rewards give a random tiny model all zeros), so GRPO's
    groups carry a learning signal and the adapters move."""
    return [(sum(map(ord, text)) % 7) / 7 for text in completions]


def test_grpo_lora_reference_is_the_base_model(tiny_qwen2_5_vl, rec_data, tmp_path):
    from megatron_vlmr1.trainer.config import ModelConfig
    from megatron_vlmr1.trainer.grpo import GRPOTrainer
    from megatron_vlmr1.trainer.policy import AdapterFreeReference, ScoringModel

    cfg = grpo_config(tiny_qwen2_5_vl, rec_data, tmp_path, model=LORA, algo={"beta": 0.04}, optim={"lr": 1e-2},
                      rewards=[{"name": "tests.trainer.test_lora_training:text_hash_reward", "weight": 1.0}])
    trainer = GRPOTrainer(cfg)
    scored: list[list] = []

    def record(name, micro_batches, values):
        GRPOTrainer.attach(name, micro_batches, values)
        if name == "ref_logprobs":
            scored.append(micro_batches)

    trainer.attach = record
    try:
        assert isinstance(trainer.reference, AdapterFreeReference)
        trainer.fit()
        last = scored[-1]
        base = ScoringModel(trainer.family, trainer.hf_config, cfg.model.path, trainer.env,
                            ModelConfig(path=cfg.model.path), shared_prefix=trainer.shared_prefix).logprobs(last)
        actor = trainer.actor.logprobs(last)
    finally:
        trainer.close()
    assert len(scored) == 2
    for batch, base_lp, actor_lp in zip(last, base, actor):
        assert torch.equal(batch.fields["ref_logprobs"], base_lp * batch.loss_mask)
        # the adapters trained for two steps, so the policy itself has moved away from the reference
        assert ((actor_lp - base_lp) * batch.loss_mask).abs().max() > 1e-4
    records = _records(tmp_path)
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0.0
    # the rollout engine received the merged (adapted) weights: its log-probs match the trainer's at step 2 too
    assert records[1]["rollout_logprob_gap_max"] < 1e-3, records[1]


def _parallel_lora_sft(rank, world_size, model, data, out, layouts):
    """LoRA SFT losses and grad norms at each (tp, pp), one run after the other in the same processes."""
    results = {}
    for tp, pp in layouts:
        cfg = sft_config(Path(model), Path(data), Path(out) / f"tp{tp}pp{pp}", parallel={"tp": tp, "pp": pp},
                         model=LORA, optim={"lr": 1e-2},
                         train={"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2})
        results[(tp, pp)] = [(r["loss"], r["grad_norm"]) for r in run(_sft(), cfg)]
    return results


def _sft():
    from megatron_vlmr1.trainer.sft import SFTTrainer

    return SFTTrainer


def test_model_parallel_lora_sft_reproduces_single_rank(rec_data, tmp_path):
    from tools.make_tiny_model import make_tiny_model

    # Two KV heads: TP=2 shards them instead of repeating one, so the fused qkv adapter (and hence the gradient
    # norm) is the same tensor at both sizes.
    model = str(make_tiny_model("qwen2_5_vl", tmp_path / "model", seed=0, num_kv_heads=2))
    single = _parallel_lora_sft(0, 1, model, str(rec_data), str(tmp_path / "single"), [(1, 1)])[(1, 1)]
    layouts = [(2, 1), (1, 2)]
    results = run_distributed(_parallel_lora_sft, 2, model, str(rec_data), str(tmp_path / "par"), layouts)
    for tp, pp in layouts:
        last_stage = results[-1][(tp, pp)]
        for (loss, grad_norm), (ref_loss, ref_norm) in zip(last_stage, single, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-4), (tp, pp)
            assert grad_norm == pytest.approx(ref_norm, rel=1e-3), (tp, pp)
