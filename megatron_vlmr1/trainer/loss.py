"""A step's loss as one object: the per-token loss of a micro-batch, the step-wide normaliser it divides by, and
the compensation for how megatron's schedule and DDP average micro-batches and replicas.

Metrics stay on the device: each micro-batch's are detached 0-dim float64 tensors, and the session reads a step's
reduced metrics with one host read (``reduce_token_metrics``), not one sync per metric and micro-batch.

Token losses are normalised by a count over the whole step's batch on every data-parallel replica (micro-batch
exact: the micro-batch losses add up to the full-batch loss, see ``algo/aggregation.py``). megatron's pipeline
schedule divides each micro-batch's loss by the number of micro-batches, and DDP averages gradients over the
data-parallel replicas; ``__call__`` multiplies both back, so the summed gradient is that of the global loss.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch

from megatron_vlmr1.algo import AlgoConfig, loss_normalizer
from megatron_vlmr1.trainer.policy import MicroBatch

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ordered_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of same-shaped tensors, added one by one in list order on their device.

    Bit for bit the number Python's left-to-right ``sum`` of their values gives (Python 3.11 adds floats plainly),
    which ``torch.sum`` over a stack does not promise: it may reorder the additions.
    """
    total = torch.zeros_like(values[0], dtype=torch.float64)
    for value in values:
        total = total + value.to(torch.float64)
    return total


def _metric(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A detached 0-dim float64 tensor on ``like``'s device (the policy loss reports plain 0.0 for an absent term;
    ``torch.full`` fills on the device, where ``torch.tensor`` would copy from the host and synchronise)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


class StepLoss(abc.ABC):
    """``loss(batch, logprobs [b, s-1], entropy [b, s-1]) -> (loss [], metric sums)`` for one step's micro-batches.

    Metrics are sums over the micro-batch's tokens, with the token count under ``tokens``, so the trainer can form
    token-weighted means over micro-batches and replicas. They are detached 0-dim float64 device tensors (no host
    sync per micro-batch): float64, so the products and sums are those the float() values gave before.
    """

    def __init__(self, normalizer: float, num_micro_batches: int, data_parallel_size: int):
        self.normalizer = normalizer
        self.num_micro_batches = num_micro_batches
        self.data_parallel_size = data_parallel_size

    @abc.abstractmethod
    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the step's loss (already divided by ``normalizer``) and its metric sums."""

    def __call__(self, batch: MicroBatch, logprobs: torch.Tensor,
                 entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.micro_batch_loss(batch, logprobs, entropy)
        return loss * (self.num_micro_batches * self.data_parallel_size), metrics


class GRPOLoss(StepLoss):
    """The registered policy loss (``algo.loss``) aggregated over the whole step (``algo.loss_agg``)."""

    def __init__(self, policy_loss: PolicyLossFn, algo: AlgoConfig, micro_batches: list[MicroBatch],
                 data_parallel_size: int, data_parallel_sum: Callable[[float], float]):
        # The aggregation's count over this step's whole batch on every data-parallel replica.
        normalizer = data_parallel_sum(
            ordered_sum([loss_normalizer(mb.loss_mask, algo) for mb in micro_batches]).item())
        super().__init__(normalizer, len(micro_batches), data_parallel_size)
        self.policy_loss = policy_loss
        self.algo = algo

    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        algo, mask, fields = self.algo, batch.loss_mask, batch.fields
        old = fields.get("old_logprobs", logprobs.detach())
        loss, metrics = self.policy_loss(logprobs, old, fields.get("ref_logprobs"), fields["advantages"], mask, algo,
                                         rollout_logprobs=fields.get("rollout_logprobs") if algo.tis_cap else None,
                                         normalizer=self.normalizer)
        tokens = mask.sum().to(torch.float64)
        mismatch = (logprobs.detach() - fields["rollout_logprobs"]).abs() * mask
        out = {k: _metric(v, tokens) * tokens for k, v in metrics.items()}
        out.update(tokens=tokens, entropy=_metric((entropy.detach() * mask).sum(), tokens),
                   rollout_logprob_gap=_metric(mismatch.sum(), tokens),
                   rollout_logprob_gap_max=_metric(mismatch.max(), tokens))
        return loss, out


class NLLLoss(StepLoss):
    """SFT: the token-mean negative log-likelihood of the target tokens over the whole step's batch."""

    def __init__(self, micro_batches: list[MicroBatch], data_parallel_size: int,
                 data_parallel_sum: Callable[[float], float]):
        total_tokens = data_parallel_sum(ordered_sum([mb.loss_mask.sum() for mb in micro_batches]).item())
        super().__init__(max(total_tokens, 1.0), len(micro_batches), data_parallel_size)

    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.loss_mask
        nll = -(logprobs * mask).sum()
        tokens = mask.sum()
        return nll / self.normalizer, {"loss": _metric(nll, tokens), "tokens": _metric(tokens, tokens),
                                       "entropy": _metric((entropy.detach() * mask).sum(), tokens)}
