"""Preemption mid-step: the step is abandoned before its update, the previous step is saved with the data position
before the abandoned step, and the resumed run reproduces an uninterrupted run's losses exactly."""
from __future__ import annotations

import json
import os
import signal

import pytest

from megatron_vlmr1.trainer.preemption import PreemptionGuard, Preempted
from tests.trainer.conftest import grpo_config, run

# Armed by the test: the reward call (one per step here) at which this process sends itself SIGUSR1, i.e. after
# the rollout of that step and before its log-probs and update.
SIGNAL_AT_CALL = {"call": 0, "count": 0}


def signal_reward(completions, **fields) -> list[float]:
    """A zero-weight reward whose only effect is to deliver a preemption signal in the middle of a chosen step."""
    SIGNAL_AT_CALL["count"] += 1
    if SIGNAL_AT_CALL["count"] == SIGNAL_AT_CALL["call"]:
        os.kill(os.getpid(), signal.SIGUSR1)
    return [0.0] * len(completions)


REWARDS = [{"name": "format", "weight": 1.0}, {"name": "iou", "weight": 1.0},
           {"name": "tests.trainer.test_preemption:signal_reward", "weight": 0.0}]
COMPARED = ("pg_loss", "kl", "grad_norm", "reward/mean", "entropy")


def _grpo():
    from megatron_vlmr1.trainer.grpo import GRPOTrainer

    return GRPOTrainer


def _config(model, data, out):
    return grpo_config(model, data, out, rewards=REWARDS, train={"steps": 3})


def test_guard_flags_only_after_a_signal_and_restores_handlers():
    guard = PreemptionGuard()
    before = signal.getsignal(signal.SIGUSR1)
    guard.install()
    try:
        guard.check()  # nothing received: no exception
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.name == "SIGUSR1"
        try:
            guard.check()
            raise AssertionError("check() did not raise after SIGUSR1")
        except Preempted as err:
            assert str(err) == "SIGUSR1"
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.slow
def test_signal_mid_step_abandons_the_step_and_resume_is_exact(tiny_qwen2_5_vl, rec_data, tmp_path, capsys):
    SIGNAL_AT_CALL.update(call=0, count=0)
    reference = run(_grpo(), _config(tiny_qwen2_5_vl, rec_data, tmp_path / "plain"))
    assert [r["step"] for r in reference] == [1, 2, 3]

    out = tmp_path / "preempted"
    SIGNAL_AT_CALL.update(call=2, count=0)  # in step 2, between rollout and update
    first = run(_grpo(), _config(tiny_qwen2_5_vl, rec_data, out))
    assert "SIGUSR1: abandoned step 2 before its update, saved step 1, exiting" in capsys.readouterr().out
    assert [r["step"] for r in first] == [1]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000001"
    state = json.loads((checkpoints / "step_00000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["data"]["position"] == 2  # one step of prompts_per_step=2 consumed

    SIGNAL_AT_CALL.update(call=0, count=0)
    resumed = run(_grpo(), _config(tiny_qwen2_5_vl, rec_data, out))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for want, got in zip(reference, resumed):
        for key in COMPARED:
            assert got[key] == want[key] or abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), \
                (want["step"], key, want[key], got[key])
