"""Golden per-step metrics of short fixed-seed GRPO and SFT runs, at TP=1 and at TP=2 x PP=2.

The numbers below were recorded from the code before the architecture refactor (issue 10); a refactor that is
meant to change no behaviour must reproduce them bit for bit. Every knob the result depends on is set here
explicitly, so a changed default elsewhere does not move them. Each run happens in spawned processes with one
thread per rank (``tests/distributed.py``), so the single-rank numbers do not depend on the machine's core count.

The values are exact for this machine's kernels (the C++ log-prob kernel picks AVX-512/AVX2 at load, and BLAS
reductions differ between instruction sets). When a change is *meant* to alter the numbers (a kernel, the model,
the synthetic data, the tiny-model factory), re-record them: the assertion message prints the new values.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.trainer.conftest import grpo_config, run, sft_config

GRPO_KEYS = ("reward/mean", "reward/format", "reward/iou", "reward/tests.trainer.test_golden_metrics:variety", "pg_loss", "kl", "entropy", "grad_norm",
             "rollout_logprob_gap", "completion_len/mean")
SFT_KEYS = ("loss", "entropy", "grad_norm")

# Everything that shapes the numbers, spelled out (defaults may move under us).
GRPO_SETTINGS = {
    "model": {"dtype": "float32", "train_mode": "full"},
    "data": {"task": "rec", "seed": 0, "shuffle": True, "min_image_side": 28},
    "rollout": {"engine": "hf", "max_model_len": 4096, "max_batch_size": 64,
                "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12, "seed": 0,
                             "stop": []}},
    "algo": {"group_size": 2, "advantage": "grpo", "advantage_scale": "std", "advantage_eps": 1e-4, "beta": 0.04,
             "kl_estimator": "k3", "epsilon_low": 0.2, "epsilon_high": 0.2, "dual_clip_c": None,
             "loss_agg": "seq-mean-token-mean", "loss": "grpo", "mu": 1, "tis_cap": None, "dynamic_sampling": False,
             "shared_prefix": False},
    "rewards": [{"name": "format", "weight": 1.0}, {"name": "iou", "weight": 1.0},
                {"name": "tests.trainer.test_golden_metrics:variety", "weight": 1.0}],
    "box_space": "abs",
    "optim": {"lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_eps": 1e-8, "clip_grad": 1.0, "warmup_steps": 0, "lr_schedule": "constant"},
    "train": {"steps": 3, "prompts_per_step": 2, "micro_batch_size": 2, "seed": 1234},
}
SFT_SETTINGS = {
    "model": {"dtype": "float32", "train_mode": "full"},
    "data": {"task": "rec", "seed": 0, "shuffle": True, "min_image_side": 28},
    "optim": {"lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_eps": 1e-8, "clip_grad": 1.0, "warmup_steps": 0, "lr_schedule": "constant"},
    "train": {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2, "seed": 1234},
    "think": "Let me find it in the image.",
}

# (kind, tp, pp) -> per step, the values of GRPO_KEYS / SFT_KEYS. SFT: recorded at commit 85d0d16, before the
# refactor. GRPO: the refactor reproduced the 85d0d16 values exactly (branch arch); they were re-recorded once
# when issue 11 made rollout seeds per prompt (run seed, step, round, prompt index) instead of per replica, which
# changes the samples (and so every GRPO number) by design.
GOLDEN = {
    ("grpo", 1, 1): [
        [0.44772727272727275, 0.0, 0.0, 0.44772727272727275, 0.0, 0.0, 7.129281679789226, 1.8999733697129246, 1.6887982686360678e-07, 12.0],
        [0.5674603174603174, 0.0, 0.0, 0.5674603174603174, -1.1920928955078126e-08, 0.030851052701473237, 7.129363059997559, 2.125594897305211, 1.5497207641601563e-07, 10.0],
        [0.5020374362479625, 0.0, 0.0, 0.5020374362479625, 0.0, 0.03418316878378391, 7.128281275431315, 1.6362109432119825, 1.1920928955078125e-07, 12.0]],
    ("grpo", 2, 2): [
        [0.44772727272727275, 0.0, 0.0, 0.44772727272727275, 0.0, 0.0, 7.129281361897786, 1.8999799576756309, 1.4901161193847656e-07, 12.0],
        [0.5674603174603174, 0.0, 0.0, 0.5674603174603174, -1.1920928955078126e-08, 0.03085104078054428, 7.1293634414672855, 2.1256075719776755, 1.6689300537109374e-07, 10.0],
        [0.5020374362479625, 0.0, 0.0, 0.5020374362479625, 0.0, 0.03418312408030033, 7.128281911214192, 1.6362209974360313, 2.284844716389974e-07, 12.0]],
    ("sft", 1, 1): [
        [7.125512626733673, 7.129235771264923, 4.748896621244001],
        [6.728502546037946, 7.126908187027816, 3.341556721033664],
        [6.410212877061632, 7.123877631293403, 2.894590884275203]],
    ("sft", 2, 2): [
        [7.125512626733673, 7.129235771264923, 4.74890324830561],
        [6.728502546037946, 7.126908187027816, 3.3415718471047113],
        [6.410213216145833, 7.123877631293403, 2.8945945084180726]],
}


def variety(completions: list[str], **fields) -> list[float]:
    """Distinct characters per character: differs between a random policy's completions, so the advantages, the
    policy loss and the gradients are not all zero (format and IoU are 0 for an untrained tiny model)."""
    return [len(set(text)) / (1 + len(text)) for text in completions]


def _run(rank, world_size, kind, model, data, out, tp, pp, shared_prefix=False):
    from megatron_vlmr1.trainer.grpo import GRPOTrainer
    from megatron_vlmr1.trainer.sft import SFTTrainer

    parallel = {"parallel": {"tp": tp, "pp": pp, "device": "cpu", "distributed_optimizer": True}}
    if kind == "grpo":
        settings = {**GRPO_SETTINGS, "algo": {**GRPO_SETTINGS["algo"], "shared_prefix": shared_prefix}}
        cfg = grpo_config(Path(model), Path(data), Path(out), **settings, **parallel)
        records, keys = run(GRPOTrainer, cfg), GRPO_KEYS
    else:
        cfg = sft_config(Path(model), Path(data), Path(out), **SFT_SETTINGS, **parallel)
        records, keys = run(SFTTrainer, cfg), SFT_KEYS
    return [[r[k] for k in keys] for r in records]


@pytest.mark.parametrize("kind, tp, pp", [("grpo", 1, 1), ("sft", 1, 1),
                                          pytest.param("grpo", 2, 2, marks=pytest.mark.slow),
                                          pytest.param("sft", 2, 2, marks=pytest.mark.slow)])
def test_metrics_equal_the_recorded_run(tiny_qwen2_5_vl_kv2, rec_data, tmp_path, kind, tp, pp):
    # 4 ranks on a shared 2-core machine can take several minutes: a generous limit, this is no hang detector
    results = run_distributed(_run, tp * pp, kind, str(tiny_qwen2_5_vl_kv2), str(rec_data), str(tmp_path), tp, pp,
                              timeout=1800)
    got = results[0]  # rank 0 logs the run's metrics (reduced over every rank)
    expected = GOLDEN[(kind, tp, pp)]
    assert len(got) == len(expected), got
    for step, (row, want) in enumerate(zip(got, expected), start=1):
        for key, value, ref in zip(GRPO_KEYS if kind == "grpo" else SFT_KEYS, row, want):
            assert value == pytest.approx(ref, rel=1e-12, abs=1e-12), \
                f"step {step} {key}: {value!r} != {ref!r}; whole run now: {got!r}"


@pytest.mark.slow
def test_shared_prefix_run_matches_the_recorded_per_row_run(tiny_qwen2_5_vl_kv2, rec_data, tmp_path):
    """The same GRPO run with ``algo.shared_prefix`` (packed rows, the shared-prefix attention) reproduces the
    recorded per-row metrics to float32 rounding: the samples are the same, losses and grad norms 1e-5 relative."""
    got = run_distributed(_run, 1, "grpo", str(tiny_qwen2_5_vl_kv2), str(rec_data), str(tmp_path), 1, 1, True,
                          timeout=1800)[0]
    expected = GOLDEN[("grpo", 1, 1)]
    assert len(got) == len(expected), got
    for step, (row, want) in enumerate(zip(got, expected), start=1):
        for key, value, ref in zip(GRPO_KEYS, row, want):
            # rollout_logprob_gap and the near-zero pg_loss are rounding-level numbers (~1e-7)
            assert value == pytest.approx(ref, rel=1e-5, abs=1e-6), f"step {step} {key}: {value!r} != {ref!r}"
