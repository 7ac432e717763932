"""Per-micro-batch metrics stay on the device: a step reads them to the host once, however many micro-batches.

On a GPU every ``item()`` / ``float()`` / ``tolist()`` of a device tensor is a host sync that stalls the stream; the
test counts those calls on CPU (the same Python calls) during one real update and compares 1 with 4 micro-batches.
Calls are attributed to the module that makes them: the log-prob, loss and metrics path (``megatron_vlmr1/trainer``,
``megatron_vlmr1/kernels``) must not grow with the micro-batches. The model's forward still reads per micro-batch
when images are present (transformers' Qwen-VL vision tower lists ``image_grid_thw``; ``gpt_vlm.embed`` checks the
image-token count); those are outside this path and reported in the counts, not asserted.
"""
from __future__ import annotations

import contextlib
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from tests.distributed import run_distributed
from tests.trainer.conftest import sft_config

READS = ("item", "tolist", "__float__", "__int__", "__bool__")
PACKAGE = Path(__file__).resolve().parents[2] / "megatron_vlmr1"
LOSS_PATH = ("trainer", "kernels")


def _caller(depth: int = 2) -> str:
    """The calling file, relative to the package when it is ours (else its name)."""
    path = Path(sys._getframe(depth).f_code.co_filename).resolve()
    return str(path.relative_to(PACKAGE)) if path.is_relative_to(PACKAGE) else path.name


@contextlib.contextmanager
def counting_host_reads():
    """Counts calls of the tensor methods that copy a value to the host, by (method, calling file)."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            calls[(name, _caller())] += 1
            return original(self, *args, **kwargs)

        return method

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_ordered_sum_adds_like_python_not_like_torch_sum():
    from megatron_vlmr1.trainer.loss import ordered_sum

    rng = random.Random(0)
    # magnitudes over many decades: a reordered sum rounds differently
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 8) for _ in range(64)]
    rows = [torch.tensor([v, 2 * v], dtype=torch.float64) for v in values]
    got = ordered_sum(rows).tolist()
    assert got == [sum(values), sum(2 * v for v in values)]
    assert torch.stack(rows).sum(0).tolist() != got  # why the plain reduction is not used (exact on this data)


def _reads_per_update(rank, world_size, model, data, out):
    from megatron_vlmr1.algo import AlgoConfig, get_policy_loss
    from megatron_vlmr1.trainer.loss import GRPOLoss
    from megatron_vlmr1.trainer.sft import SFTTrainer

    cfg = sft_config(Path(model), Path(data), Path(out), train={"prompts_per_step": 4, "micro_batch_size": 1})
    trainer = SFTTrainer(cfg)
    algo = AlgoConfig(group_size=2, beta=0.0)
    samples = next(trainer.data)
    counts, metrics = {}, {}
    try:
        for count in (1, 4):  # the same 4 rows as 1 micro-batch of 4, then 4 of 1
            trainer.cfg.train.micro_batch_size = 4 // count
            micro_batches = trainer.micro_batches(samples)
            assert len(micro_batches) == count
            with counting_host_reads() as calls:
                metrics[("sft", count)] = trainer.update(micro_batches)
            counts[("sft", count)] = dict(calls)
            for mb in micro_batches:  # GRPO fields on the same rows: an advantage per row, the rollout's log-probs
                rows = mb.loss_mask.shape[0]
                mb.fields["advantages"] = torch.linspace(-1, 1, rows)[:, None] * mb.loss_mask
                mb.fields["rollout_logprobs"] = torch.full(mb.loss_mask.shape, -7.0) * mb.loss_mask
            with counting_host_reads() as calls:
                loss = GRPOLoss(get_policy_loss("grpo"), algo, micro_batches, trainer.env.dp,
                                trainer.data_parallel_sum)
                outputs, _ = trainer.actor.train_step(micro_batches, loss)
                metrics[("grpo", count)] = trainer.reduce_token_metrics(outputs)
            counts[("grpo", count)] = dict(calls)
            assert all(v.dtype == torch.float64 and v.dim() == 0 for out in outputs for v in out.values())
    finally:
        trainer.close()
    return counts, metrics


def _loss_path(counts: dict) -> dict:
    return {key: n for key, n in counts.items() if key[1].startswith(LOSS_PATH)}


def test_one_update_reads_metrics_once_whatever_the_micro_batch_count(tiny_qwen2_5_vl, rec_data, tmp_path):
    counts, metrics = run_distributed(_reads_per_update, 1, str(tiny_qwen2_5_vl), str(rec_data), str(tmp_path))[0]
    for kind in ("sft", "grpo"):
        one, four = _loss_path(counts[(kind, 1)]), _loss_path(counts[(kind, 4)])
        assert one == four, counts
        # a fixed few per step: the targets' range check, the loss normaliser, the grad norm, the metrics' one read
        assert sum(one.values()) <= 6, one
        assert ("tolist", "trainer/session.py") in one, one
        assert metrics[(kind, 4)]["entropy"] > 0
    assert {"pg_loss", "kl", "entropy", "rollout_logprob_gap", "rollout_logprob_gap_max"} <= metrics[("grpo", 4)].keys()
    assert metrics[("grpo", 4)]["rollout_logprob_gap_max"] >= metrics[("grpo", 4)]["rollout_logprob_gap"] > 0
