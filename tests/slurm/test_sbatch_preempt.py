"""examples/run_grpo_32b.sh under a real Slurm (slurmctld + slurmd on localhost, tools/slurm_local_cluster.sh).

The job (2 ranks from the allocation's 2 GPUs, TP=2 on CPU) is sent the preemption signal mid-run the way Slurm's
``--signal=B:USR1@N`` does (``scancel --signal=USR1 --batch``); the script makes the ranks save, requeues the job,
and the requeued run (SLURM_RESTART_COUNT=1) resumes from ``checkpoints/latest`` and reproduces the per-step losses
of the same config launched by the same script without Slurm.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tools" / "slurm_local_cluster.sh"
SCRIPT = REPO / "examples" / "run_grpo_32b.sh"
STEPS = 16
COMPARED = ("pg_loss", "kl", "grad_norm", "entropy", "reward/mean", "completion_len/mean")


def _slurm_missing() -> str | None:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue")
               if shutil.which(tool) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); `make test` installs Debian's slurm-wlm "
                "when it runs as root with apt-get")
    if os.geteuid() != 0:
        return "a local slurmd must run as root (it starts job processes as their user)"
    return None


@pytest.fixture()
def slurm_cluster(tmp_path):
    """A fresh single-node cluster (8 CPUs, 2 GPUs advertised); yields the environment its clients need."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "cluster"
    subprocess.run(["bash", str(CLUSTER), "start", str(state), "8", "2"], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], env=env, timeout=120)


def _config(tmp_path: Path, model: Path) -> Path:
    from megatron_vlmr1.data.synthetic import make_rec_dataset

    make_rec_dataset(tmp_path / "data", 64, seed=0, difficulty="easy")
    config = {
        "model": {"path": str(model)},
        "parallel": {"tp": 2, "device": "cpu"},
        "data": {"files": [str(tmp_path / "data" / "train.jsonl")], "task": "rec"},
        "rollout": {"sampling": {"max_new_tokens": 12}},
        "algo": {"group_size": 2, "beta": 0.04},
        "rewards": [{"name": "format", "weight": 1.0}, {"name": "fuzzy", "weight": 1.0}],
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(tmp_path / "run_slurm"), "steps": STEPS, "prompts_per_step": 2,
                  "micro_batch_size": 2, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"export_hf": False},
    }
    path = tmp_path / "tiny_grpo.yaml"
    path.write_text(json.dumps(config))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _job_state(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.mark.slow
def test_sbatch_preemption_saves_requeues_and_resumes_exactly(slurm_cluster, tiny_qwen2_5_vl_kv2, tmp_path):
    env = dict(slurm_cluster, CONFIG=str(_config(tmp_path, tiny_qwen2_5_vl_kv2)), VENV=sys.prefix,
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    # the same config launched by the same script without Slurm: the uninterrupted reference
    from megatron_vlmr1.parallel import free_port

    plain_env = {k: v for k, v in env.items() if k != "SLURM_CONF"}
    plain = subprocess.run(["bash", str(SCRIPT), f"train.output_dir={tmp_path / 'run_plain'}"],
                           env=dict(plain_env, NPROC_PER_NODE="2", MASTER_PORT=str(free_port())), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 0, plain.stdout[-4000:] + plain.stderr[-4000:]
    reference = _records(tmp_path / "run_plain")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    out_file = tmp_path / "slurm-%j.out"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=2",
                          f"--output={out_file}", str(SCRIPT)], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip().split(";")[0]
    slurm_out = tmp_path / f"slurm-{job}.out"
    run_dir = tmp_path / "run_slurm"
    deadline = time.monotonic() + 600
    while not ((run_dir / "metrics.jsonl").exists() and len(_records(run_dir)) >= 2):
        state = _job_state(job, env).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, slurm_out.read_text() if slurm_out.exists() else "")
        assert time.monotonic() < deadline, "no training step within 600 s"
        time.sleep(0.2)
    # what Slurm does --signal=B:USR1@900 before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)

    while True:
        info = _job_state(job, env)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        assert time.monotonic() < deadline, f"job {job} did not finish: {info.get('JobState')}"
        time.sleep(1)
    log = slurm_out.read_text()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, log)
    assert "USR1: asking the ranks to save" in log and f"requeueing job {job}" in log, log
    assert f"job {job} attempt 1" in log, log  # the requeued run saw SLURM_RESTART_COUNT=1

    logs = run_dir / "logs"
    first_node = (logs / f"job_{job}_attempt_0").glob("*.log")
    first = "".join(p.read_text() for p in first_node)
    saved = re.search(r"SIGTERM: (?:abandoned step \d+ before its update, )?saved step (\d+), exiting", first)
    assert saved, first[-4000:]
    second = "".join(p.read_text() for p in (logs / f"job_{job}_attempt_1").glob("*.log"))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{int(saved.group(1)):08d}'}" in second, second[-4000:]
    for attempt in (0, 1):  # one log per rank under the run directory
        rank_logs = sorted((logs / f"job_{job}_attempt_{attempt}" / "node_0").glob("*/attempt_0/*/stdout.log"))
        assert [p.parent.name for p in rank_logs] == ["0", "1"], rank_logs

    resumed = _records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert int(saved.group(1)) < STEPS, "the preemption signal arrived after the last step"
    for want, got in zip(reference, resumed):
        for key in COMPARED:
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (want["step"], key, want[key], got[key])
