"""A step's loss as one object: the per-token loss of a micro-batch, the step-wide normaliser it divides by, and
the compensation for how megatron's schedule and DDP average micro-batches and replicas.

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


class StepLoss(abc.ABC):
    """``loss(batch, logprobs [b, s-1], entropy [b, s-1]) -> (loss [], metric sums)`` for one step's micro-batches.

    Metrics are sums over the micro-batch's tokens, with the token count under ``tokens``, so the trainer can form
    token-weighted means over micro-batches and replicas.
    """

    def __init__(self, normalizer: float, num_micro_batches: int, data_parallel_size: int):
        self.normalizer = normalizer
        self.num_micro_batches = num_micro_batches
        self.data_parallel_size = data_parallel_size

    @abc.abstractmethod
    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss (already divided by ``normalizer``) and its metric sums."""

    def __call__(self, batch: MicroBatch, logprobs: torch.Tensor,
                 entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.micro_batch_loss(batch, logprobs, entropy)
        return loss * (self.num_micro_batches * self.data_parallel_size), metrics


class GRPOLoss(StepLoss):
    """The registered policy loss (``algo.loss``) aggregated over the whole step (``algo.loss_agg``)."""

    def __init__(self, policy_loss: PolicyLossFn, algo: AlgoConfig, micro_batches: list[MicroBatch],
                 data_parallel_size: int, data_parallel_sum: Callable[[float], float]):
        # The aggregation's count over this step's whole batch on every data-parallel replica.
        normalizer = data_parallel_sum(sum(float(loss_normalizer(mb.loss_mask, algo)) for mb in micro_batches))
        super().__init__(normalizer, len(micro_batches), data_parallel_size)
        self.policy_loss = policy_loss
        self.algo = algo

    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        algo, mask, fields = self.algo, batch.loss_mask, batch.fields
        old = fields.get("old_logprobs", logprobs.detach())
        loss, metrics = self.policy_loss(logprobs, old, fields.get("ref_logprobs"), fields["advantages"], mask, algo,
                                         rollout_logprobs=fields.get("rollout_logprobs") if algo.tis_cap else None,
                                         normalizer=self.normalizer)
        tokens = mask.sum()
        mismatch = (logprobs.detach() - fields["rollout_logprobs"]).abs() * mask
        out = {k: float(v) * float(tokens) for k, v in metrics.items()}
        out.update(tokens=float(tokens), entropy=float((entropy.detach() * mask).sum()),
                   rollout_logprob_gap=float(mismatch.sum()), rollout_logprob_gap_max=float(mismatch.max()))
        return loss, out


class NLLLoss(StepLoss):
    """SFT: the token-mean negative log-likelihood of the target tokens over the whole step's batch."""

    def __init__(self, micro_batches: list[MicroBatch], data_parallel_size: int,
                 data_parallel_sum: Callable[[float], float]):
        total_tokens = data_parallel_sum(sum(float(mb.loss_mask.sum()) for mb in micro_batches))
        super().__init__(max(total_tokens, 1.0), len(micro_batches), data_parallel_size)

    def micro_batch_loss(self, batch: MicroBatch, logprobs: torch.Tensor,
                         entropy: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.loss_mask
        nll = -(logprobs * mask).sum()
        return nll / self.normalizer, {"loss": float(nll), "tokens": float(mask.sum()),
                                       "entropy": float((entropy.detach() * mask).sum())}
