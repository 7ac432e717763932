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

What a trainer needs to hand over megatron's LM-head output untouched (no copy of vocabulary size anywhere):
- `seq_first=True`: logits in megatron's `[s, b, V_shard]` layout with targets `[b, s]` (no transpose copy);
- `vocab_end`: the real vocabulary size; the padded columns beyond it are skipped inside the kernel (no -inf fill);
- targets shifted by the caller with `ignore_index` in the last position (no `logits[:, :-1]` slice): rows whose
  target is ignored are never read, and their gradient is written as zeros;
- `inplace_backward=True` when the logits are dead after the loss (the gradient overwrites them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vlmr1.kernels import reference
from megatron_vlmr1.kernels.extension import use_csrc

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_end: int, inv_temp: float,
           ignore_index: int) -> torch.Tensor:
    if use_csrc(logits.device):
        return torch.ops.vlmr1.logprob_stats(logits, targets, vocab_start, vocab_end, inv_temp, ignore_index)
    return reference.logprob_stats_torch(logits, targets, vocab_start, vocab_end, inv_temp, ignore_index)


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
    def forward(ctx, logits, targets, tp_group, inv_temp, ignore_index, inplace_backward, vocab_end):
        """logits `[N..., V_shard]` and targets `[N...]` in the same row order; returns (log-prob, entropy) `[N...]`."""
        vocab_shard = logits.shape[-1]
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * vocab_shard
        rows = logits.reshape(-1, vocab_shard).contiguous()
        flat_targets = targets.reshape(-1).long().contiguous()
        row_max, sum_exp, dot, target_x = _combine(
            _stats(rows, flat_targets, vocab_start, vocab_end, inv_temp, ignore_index), tp_group)
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
        ctx.vocab_range = (vocab_start, vocab_end)
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
        args = (rows, targets, row_max, log_sum, entropy, grad_logprob, grad_entropy, *ctx.vocab_range,
                ctx.inv_temp, ctx.ignore_index)
        grad = rows if ctx.inplace_backward else torch.empty_like(rows)
        if use_csrc(rows.device):
            torch.ops.vlmr1.logprob_grad(*args, grad)
        else:
            grad.copy_(reference.logprob_grad_torch(*args))
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def fused_logprob(logits: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup | None = None,
                  return_entropy: bool = False, temperature: float = 1.0, ignore_index: int = -100,
                  inplace_backward: bool = False, vocab_end: int | None = None, seq_first: bool = False,
                  check_targets: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token under softmax(logits / temperature), optionally with the entropy.

    logits `[..., V_shard]` fp32/bf16/fp16: the full vocabulary, or this rank's shard when `tp_group` is given
    (rank r holds ids [r * V_shard, (r + 1) * V_shard)). targets `[...]` global token ids; `ignore_index` marks
    masked tokens, which get log-prob 0, entropy 0 and zero gradient, and whose logits are never read. Returns
    log-prob `[...]` fp32, or (log-prob, entropy) with `return_entropy`. Differentiable w.r.t. logits.

    - `seq_first=True`: logits `[s, b, V_shard]` (megatron's output layout) with targets `[b, s]`; the outputs are
      `[b, s]` (a transposed view), so no copy of the logits is made.
    - `vocab_end`: global id one past the last real token; columns at or beyond it (padded vocabulary) take no part
      in the softmax and get zero gradient, read by nothing. Default: all columns (V_shard x TP).
    - `inplace_backward=True` writes the gradient into the logits' storage (for callers whose logits are dead after
      the loss; the logits' values are destroyed by backward).
    - `check_targets=False` skips the range check of the targets, a host sync on a GPU (for callers that checked
      their targets on the host already, once per step: ``trainer.policy.check_targets``).
    Logits must be < +inf; -inf columns are fine.
    """
    if seq_first:
        if logits.dim() != 3 or tuple(targets.shape) != (logits.shape[1], logits.shape[0]):
            raise ValueError(f"fused_logprob(seq_first=True): logits must be [s, b, V] and targets [b, s], got "
                             f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}")
    elif logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
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
    padded_vocab = logits.shape[-1] * tp_size
    if vocab_end is None:
        vocab_end = padded_vocab
    elif not 0 < vocab_end <= padded_vocab:
        raise ValueError(f"fused_logprob: vocab_end={vocab_end} must be in [1, {padded_vocab}] (the logits' "
                         f"vocabulary width x TP size)")
    if check_targets:
        out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_end))
        if bool(out_of_range.any()):
            raise ValueError(f"fused_logprob: target id {int(targets[out_of_range][0])} is outside the vocabulary "
                             f"[0, {vocab_end}) and is not ignore_index={ignore_index}")
    if seq_first:  # rows of logits are (s, b)-ordered: order the (small) targets alike, transpose the results back
        logprob, entropy = _FusedLogProb.apply(logits, targets.t(), tp_group, 1.0 / temperature, ignore_index,
                                               inplace_backward, vocab_end)
        logprob, entropy = logprob.t(), entropy.t()
    else:
        logprob, entropy = _FusedLogProb.apply(logits, targets, tp_group, 1.0 / temperature, ignore_index,
                                               inplace_backward, vocab_end)
    return (logprob, entropy) if return_entropy else logprob
