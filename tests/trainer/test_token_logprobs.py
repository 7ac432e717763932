"""The trainer's logits -> log-prob path: shifted targets, and the raw [s, b, V] LM-head output into the kernel."""
import torch

from megatron_vlmr1.kernels import fused_logprob
from megatron_vlmr1.kernels.reference import logprob_reference
from megatron_vlmr1.trainer.policy import MicroBatch, shifted_targets, token_logprobs


def _batch(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> MicroBatch:
    b, s = input_ids.shape
    return MicroBatch(input_ids, torch.ones(b, s, dtype=torch.long), torch.zeros(3, b, s, dtype=torch.long), loss_mask)


def test_shifted_targets_by_hand():
    batch = _batch(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 1, 1]]))
    assert shifted_targets(batch).tolist() == [[-100, 7, 8, -100]]


def test_token_logprobs_from_raw_logits_equal_the_sliced_batch_first_computation():
    gen = torch.Generator().manual_seed(0)
    seq, rows, vocab, real = 6, 3, 300, 290
    raw = torch.randn(seq, rows, vocab, generator=gen) * 2
    raw[..., real:] = 40.0  # padded LM-head columns, unmasked: the kernel must not read them
    input_ids = torch.randint(0, real, (rows, seq), generator=gen)
    loss_mask = (torch.rand(rows, seq - 1, generator=gen) > 0.3).long()
    batch = _batch(input_ids, loss_mask)
    leaf = raw.clone().requires_grad_()
    logprobs, entropy = token_logprobs(leaf * 1.0, batch, None, real)
    assert logprobs.shape == (rows, seq - 1) and logprobs.is_contiguous()
    # the previous path: [b, s, V] copy, padded columns cut off, last position sliced away
    ref_leaf = raw.clone().requires_grad_()
    sliced = ref_leaf.transpose(0, 1)[:, :-1, :real]
    targets = input_ids[:, 1:].masked_fill(~loss_mask.bool(), -100)
    want_lp, want_ent = fused_logprob(sliced, targets, return_entropy=True)
    assert torch.equal(logprobs, want_lp) and torch.equal(entropy, want_ent)
    assert torch.equal((logprobs * loss_mask).sum(), (want_lp * loss_mask).sum())
    ref_lp, _ = logprob_reference(sliced.detach(), targets)
    torch.testing.assert_close(logprobs, ref_lp, atol=1e-5, rtol=0)
    (logprobs.sum() + 0.1 * entropy.sum()).backward()
    (want_lp.sum() + 0.1 * want_ent.sum()).backward()
    assert torch.equal(leaf.grad, ref_leaf.grad)
    assert torch.count_nonzero(leaf.grad[..., real:]) == 0 and torch.count_nonzero(leaf.grad[-1]) == 0
