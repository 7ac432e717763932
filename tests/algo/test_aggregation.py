"""Loss aggregation: hand values per mode, and micro-batch sums equal to the full-batch loss (values and grads)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_vlmr1.algo import AlgoConfig, aggregate, get_policy_loss, loss_normalizer

MODES = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
INF = math.inf

# Three sequences: lengths 3, 2 and 0 (a padding row). Padding positions hold inf / junk that must not leak.
VALUES = torch.tensor([[1.0, 2.0, 3.0, INF], [4.0, 5.0, INF, -INF], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


def config(mode: str) -> AlgoConfig:
    return AlgoConfig(loss_agg=mode, max_response_length=4)


@pytest.mark.parametrize(
    "mode, expected, count",
    [
        # Per-sequence means 6/3 = 2 and 9/2 = 4.5, averaged over the 2 non-empty sequences: 3.25.
        ("seq-mean-token-mean", 3.25, 2.0),
        # All 5 response tokens weigh the same: (6 + 9) / 5 = 3.
        ("token-mean", 3.0, 5.0),
        # Per-sequence sums over the constant 4 = max_response_length: (6/4 + 9/4) / 2 = 1.875.
        ("seq-mean-token-sum-norm", 1.875, 2.0),
    ],
)
def test_hand_values(mode, expected, count):
    assert float(aggregate(VALUES, MASK, config(mode))) == pytest.approx(expected, abs=1e-6)
    assert float(loss_normalizer(MASK, config(mode))) == count


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zero(mode):
    values = torch.ones(2, 3, requires_grad=True)
    out = aggregate(values, torch.zeros(2, 3), config(mode))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 3))
    assert aggregate(values, torch.zeros(2, 3), config(mode), normalizer=0.0).item() == 0.0


def test_explicit_normalizer_is_used_as_given():
    # seq-mean-token-mean total is 2 + 4.5 = 6.5; a fractional normaliser (e.g. 2 / (num_microbatches * dp_size)
    # with 4 micro-batches) must not be rounded or clamped: 6.5 / 0.5 = 13.
    assert aggregate(VALUES, MASK, config("seq-mean-token-mean"), normalizer=0.5).item() == pytest.approx(13.0)
    assert aggregate(VALUES, MASK, config("token-mean"), normalizer=torch.tensor(3.0)).item() == pytest.approx(5.0)


def test_sum_norm_constant_does_not_depend_on_padding_width():
    # The same two sequences padded to width 4 and to width 9: identical result (verl's default divides by
    # the padded width instead, which would change 1.875 to 0.833).
    wide_values = torch.cat([VALUES[:2].nan_to_num(posinf=0, neginf=0), torch.zeros(2, 5)], dim=1)
    wide_mask = torch.cat([MASK[:2], torch.zeros(2, 5, dtype=MASK.dtype)], dim=1)
    cfg = config("seq-mean-token-sum-norm")
    assert float(aggregate(wide_values, wide_mask, cfg)) == pytest.approx(1.875, abs=1e-6)


def random_batch(generator: torch.Generator, batch: int = 7, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[4] = 0  # one padding row
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return torch.randn(batch, width, generator=generator, dtype=torch.float64), mask


def micro_batches(*tensors: torch.Tensor, sizes: list[int]) -> list[list[torch.Tensor]]:
    """Split along the batch and trim each piece to its own longest response (as a packing trainer would)."""
    pieces, start = [], 0
    mask = tensors[-1]
    for size in sizes:
        rows = slice(start, start + size)
        width = max(int(mask[rows].sum(dim=1).max()), 1)
        pieces.append([t[rows, :width] for t in tensors])
        start += size
    return pieces


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_sum_equals_full_batch(mode):
    values, mask = random_batch(torch.Generator().manual_seed(1))
    cfg = config(mode)
    full = aggregate(values, mask, cfg)
    pieces = micro_batches(values, mask, sizes=[3, 1, 3])
    normalizer = loss_normalizer(mask, cfg)
    # The normaliser is additive over micro-batches (what a data-parallel all-reduce SUM relies on).
    assert float(sum(loss_normalizer(m, cfg) for _, m in pieces)) == float(normalizer)
    summed = sum(aggregate(v, m, cfg, normalizer=normalizer) for v, m in pieces)
    torch.testing.assert_close(summed, full, rtol=1e-12, atol=1e-12)
    # Averaging each micro-batch by its own count instead is wrong (what the global normaliser is for).
    local_mean = sum(aggregate(v, m, cfg) for v, m in pieces) / len(pieces)
    assert abs(float(local_mean) - float(full)) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_grpo_loss_micro_batches_match_full_batch_with_grads(mode):
    generator = torch.Generator().manual_seed(2)
    _, mask = random_batch(generator)
    shape = mask.shape
    old = -torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    rollout = old + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    adv = torch.randn(shape[0], 1, generator=generator, dtype=torch.float64) * mask
    cfg = AlgoConfig(loss_agg=mode, max_response_length=6, beta=0.05, epsilon_high=0.28, dual_clip_c=3.0, tis_cap=2.0)
    loss_fn = get_policy_loss(cfg.loss)

    full, _ = loss_fn(logp, old, ref, adv, mask, cfg, rollout_logprobs=rollout)
    (full_grad,) = torch.autograd.grad(full, logp)

    normalizer = loss_normalizer(mask, cfg)
    summed = torch.zeros((), dtype=torch.float64)
    for lp, o, r, a, ro, m in micro_batches(logp, old, ref, adv, rollout, mask, sizes=[2, 4, 1]):
        loss, _ = loss_fn(lp, o, r, a, m, cfg, rollout_logprobs=ro, normalizer=normalizer)
        summed = summed + loss
    (summed_grad,) = torch.autograd.grad(summed, logp)
    torch.testing.assert_close(summed, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed_grad, full_grad, rtol=1e-12, atol=1e-12)
    assert full_grad.abs().sum() > 0
