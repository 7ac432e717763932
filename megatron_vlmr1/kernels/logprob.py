"""Fused (vocab-parallel) log-prob and entropy of target tokens.

GRPO needs log p(target) for every completion token, from the policy, the old policy and the reference model.
`log_softmax` + `gather` materialises full-vocabulary copies (8k tokens x 152k vocab is 5 GB in fp32 per copy);
here each row is streamed once for its softmax statistics (max, sum-exp, and the sum of p * x for the entropy),
and once more in backward to write the gradient, optionally into the logits' own storage.

Tensor parallelism (vocabulary sharded over `tp_group`, rank r holding ids [r * V_shard, (r + 1) * V_shard)):
each rank reduces its shard to three numbers per token; two small all-reduces over `[tokens]` and
`[tokens, 3]` (max, then sum-exp, sum of p * x and the target logit from the rank that owns it) give the
global values. Backward needs no communication: the gradient of a shard only depends on its logits and the
global log-sum-exp and entropy saved in forward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vlmr1.kernels import reference
from megatron_vlmr1.kernels.extension import use_csrc

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float,
           ignore_index: int) -> torch.Tensor:
    if use_csrc(logits.device):
        return torch.ops.vlmr1.logprob_stats(logits, targets, vocab_start, inv_temp, ignore_index)
    return reference.logprob_stats_torch(logits, targets, vocab_start, inv_temp, ignore_index)


def _combine(stats: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-shard statistics `[N, 4]` → global (max, sum-exp, sum of exp * (x - max), target x), each `[N]`.

    A shard's (s, d) relative to its own max m_r move to the global max m as
    s' = exp(m_r - m) s,  d' = exp(m_r - m) (d + s (m_r - m)); shards with s = 0 (all -inf) contribute nothing.
    """
    row_max, sum_exp, dot, target_x = stats.unbind(-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return row_max, sum_exp, dot, target_x
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    has_mass = sum_exp > 0
    delta = torch.where(has_mass, row_max - global_max, torch.zeros_like(row_max))
    scale = torch.where(has_mass, delta.exp(), torch.zeros_like(row_max))
    packed = torch.stack([scale * sum_exp, scale * (dot + sum_exp * delta), target_x], dim=-1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    sum_exp, dot, target_x = packed.unbind(-1)
    return global_max, sum_exp, dot, target_x


class _FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, inv_temp, ignore_index, inplace_backward):
        vocab_shard = logits.shape[-1]
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        rows = logits.reshape(-1, vocab_shard).contiguous()
        flat_targets = targets.reshape(-1).long().contiguous()
        row_max, sum_exp, dot, target_x = _combine(
            _stats(rows, flat_targets, rank * vocab_shard, inv_temp, ignore_index), tp_group)
        row_max = row_max.contiguous()
        # lse = row_max + log_sum is never formed: at |x| ~ 1e4 its fp32 rounding (~1e-3) would swamp log-probs.
        log_sum = sum_exp.log()
        # entropy = lse - sum p x = log(sum_exp) - sum exp(x - max) (x - max) / sum_exp
        entropy = log_sum - dot / sum_exp
        valid = flat_targets != ignore_index
        zero = torch.zeros_like(log_sum)
        logprob = torch.where(valid, (target_x - row_max) - log_sum, zero)
        entropy = torch.where(valid, entropy, zero)
        ctx.save_for_backward(rows, flat_targets, row_max, log_sum, entropy)
        ctx.vocab_start = rank * vocab_shard
        ctx.inv_temp = inv_temp
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.logits_shape = logits.shape
        ctx.set_materialize_grads(False)  # an unused entropy output then comes back as None, not a zeros tensor
        return logprob.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        rows, targets, row_max, log_sum, entropy = ctx.saved_tensors
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(log_sum)
        grad_logprob = grad_logprob.reshape(-1).float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(-1).float().contiguous()
        args = (rows, targets, row_max, log_sum, entropy, grad_logprob, grad_entropy, ctx.vocab_start, ctx.inv_temp,
                ctx.ignore_index)
        grad = rows if ctx.inplace_backward else torch.empty_like(rows)
        if use_csrc(rows.device):
            torch.ops.vlmr1.logprob_grad(*args, grad)
        else:
            grad.copy_(reference.logprob_grad_torch(*args))
        return grad.view(ctx.logits_shape), None, None, None, None, None


def fused_logprob(logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup | None = None,
                  return_entropy: bool = False, temperature: float = 1.0, ignore_index: int = -100,
                  inplace_backward: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token under softmax(logits / temperature), optionally with the entropy.

    logits `[..., V_shard]` fp32/bf16/fp16: the full vocabulary, or this rank's shard when `tp_group` is given
    (rank r holds ids [r * V_shard, (r + 1) * V_shard)). targets `[...]` global token ids; `ignore_index` marks
    masked tokens, which get log-prob 0, entropy 0 and zero gradient. Returns log-prob `[...]` fp32, or
    (log-prob, entropy) with `return_entropy`. Differentiable w.r.t. logits. `inplace_backward=True` writes the
    gradient into the logits' storage (for callers whose logits are dead after the loss; the logits' values are
    destroyed by backward). Logits must be < +inf; -inf columns (padded vocabulary) are fine.
    """
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"fused_logprob: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"{tuple(logits.shape)} without its last (vocabulary) dimension")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"fused_logprob: logits dtype {logits.dtype} not supported, use one of {_DTYPES}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"fused_logprob: targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"fused_logprob: temperature must be > 0, got {temperature}")
    if targets.device != logits.device:
        raise ValueError(f"fused_logprob: targets on {targets.device} but logits on {logits.device}")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    vocab = logits.shape[-1] * tp_size
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(out_of_range.any()):
        raise ValueError(f"fused_logprob: target id {int(targets[out_of_range][0])} is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index={ignore_index}")
    logprob, entropy = _FusedLogProb.apply(logits, targets, tp_group, 1.0 / temperature, ignore_index,
                                           inplace_backward)
    return (logprob, entropy) if return_entropy else logprob
