"""Plain-PyTorch references for the csrc kernels.

Two layers, both eager torch:
- `logprob_reference` / `group_advantage_reference`: the textbook computation (`log_softmax` + `gather`,
  per-group mean/std) on the full, unsharded vocabulary. Tests compare the fused kernels against these.
- `logprob_stats_torch` / `logprob_grad_torch`: the same contract as the csrc ops `vlmr1::logprob_stats` and
  `vlmr1::logprob_grad`. They are the fallback when the extension is unavailable for a device; they materialise
  full-vocabulary temporaries, so they cost the memory the fused kernels exist to save.
"""
from __future__ import annotations

import torch


def logprob_reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of each softmax, both fp32, differentiable.

    logits `[..., vocab]` (full vocabulary), targets `[...]` → (log-prob `[...]`, entropy `[...]`); tokens whose
    target is `ignore_index` get 0 for both. Columns at -inf (padded vocabulary) contribute 0 to the entropy.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprob = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    probs = logp.exp()
    # where() on logp itself (not on the product) keeps 0 * -inf out of both the value and its gradient.
    entropy = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
    zero = torch.zeros_like(logprob)
    return torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)


def group_advantage_reference(rewards: torch.Tensor, group_size: int, scale: str = "std",
                              eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards `[num_prompts * G]` → `[num_prompts * G]` fp32, (r - mean) / (std + eps) per group.

    Unbiased std, as VLM-R1 and TRL compute it; scale="none" only subtracts the mean (Dr.GRPO).
    """
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def valid_columns(vocab_shard: int, vocab_start: int, vocab_end: int) -> int:
    """Real (non-padded) columns of a shard holding global ids [vocab_start, vocab_start + vocab_shard)."""
    return max(0, min(vocab_shard, vocab_end - vocab_start))


def logprob_stats_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_end: int,
                        inv_temp: float, ignore_index: int) -> torch.Tensor:
    """Torch twin of `vlmr1::logprob_stats`: logits `[N, V_shard]`, targets `[N]` → `[N, 4]` fp32.

    Columns: max x, sum exp(x - max), sum exp(x - max) * (x - max), and the target's x when this shard holds it
    (else 0), with x = logits * inv_temp over the shard's real columns (global ids < vocab_end). A row of only -inf
    (or a shard of padding only) gives (-inf, 0, 0, .); a row whose target is ignore_index gives (0, 1, 0, 0).
    """
    valid = valid_columns(logits.shape[-1], vocab_start, vocab_end)
    ignored = targets == ignore_index
    if valid == 0:
        out = torch.tensor([float("-inf"), 0.0, 0.0, 0.0]).expand(logits.shape[0], 4).clone()
    else:
        x = logits[:, :valid].float() * inv_temp
        row_max = x.max(dim=-1).values
        finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        shifted = x - finite_max.unsqueeze(-1)
        e = shifted.exp()
        dot = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
        local = targets - vocab_start
        owned = ~ignored & (local >= 0) & (local < valid)
        target_x = x.gather(-1, torch.where(owned, local, torch.zeros_like(local)).unsqueeze(-1)).squeeze(-1)
        target_x = torch.where(owned, target_x, torch.zeros_like(target_x))
        out = torch.stack([row_max, e.sum(-1), dot, target_x], dim=-1)
    out[ignored] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    return out.to(logits.device)


def logprob_grad_torch(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                       entropy: torch.Tensor,
                       grad_logprob: torch.Tensor, grad_entropy: torch.Tensor | None, vocab_start: int,
                       vocab_end: int, inv_temp: float, ignore_index: int) -> torch.Tensor:
    """Torch twin of `vlmr1::logprob_grad`; returns the gradient `[N, V_shard]` in the logits' dtype.

    grad_j = inv_temp * (g_lp * (onehot_j - p_j) - g_ent * p_j * (logp_j + H)), zero on ignored rows and on the
    padded columns (global id >= vocab_end), with logp_j = (x_j - row_max) - log_sum.
    """
    valid = valid_columns(logits.shape[-1], vocab_start, vocab_end)
    logp = (logits.float() * inv_temp - row_max.unsqueeze(-1)) - log_sum.unsqueeze(-1)
    p = logp.exp()
    grad = -grad_logprob.unsqueeze(-1) * p
    if grad_entropy is not None:
        ent = grad_entropy.unsqueeze(-1) * p * (logp + entropy.unsqueeze(-1))
        grad = grad - torch.where(p > 0, ent, torch.zeros_like(ent))
    local = targets - vocab_start
    owned = (local >= 0) & (local < valid)
    onehot_rows = torch.nonzero(owned).squeeze(-1)
    grad[onehot_rows, local[onehot_rows]] += grad_logprob[onehot_rows]
    grad = grad * inv_temp
    grad[targets == ignore_index] = 0
    grad[:, valid:] = 0
    return grad.to(logits.dtype)
