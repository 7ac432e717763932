"""fused_logprob against the log_softmax + gather reference: values, gradients, TP=2, edge cases."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.distributed as dist

from megatron_vlmr1.kernels import backend, fused_logprob
from megatron_vlmr1.kernels.reference import logprob_reference
from tests.distributed import run_distributed

torch.set_num_threads(1)

FP32_ATOL = 1e-5


def make_case(shape, vocab, dtype=torch.float32, scale=3.0, seed=0, ignore_every=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    grad_lp = torch.randn(shape, generator=gen)
    grad_ent = torch.randn(shape, generator=gen)
    return logits, targets, grad_lp, grad_ent


def run_both(logits, targets, grad_lp, grad_ent, temperature=1.0, **kwargs):
    """Forward + backward of ours and of the reference on copies of `logits`; returns both (lp, ent, grad)."""
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    lp, ent = fused_logprob(ours_in, targets, return_entropy=True, temperature=temperature, **kwargs)
    ref_lp, ref_ent = logprob_reference(ref_in, targets, temperature=temperature)
    (lp * grad_lp + ent * grad_ent).sum().backward()
    (ref_lp * grad_lp + ref_ent * grad_ent).sum().backward()
    return (lp, ent, ours_in.grad), (ref_lp, ref_ent, ref_in.grad)


def test_backend_is_csrc_cpu_after_build():
    # Fails when `python setup.py build_ext --inplace` did not produce a loadable megatron_vlmr1._C.
    assert backend("cpu") == "csrc-cpu"


@pytest.mark.parametrize("shape,vocab,temperature", [
    ((1,), 7, 1.0),            # one token, tiny vocabulary
    ((13,), 2053, 1.0),        # vocabulary not a multiple of the 2048-column chunk
    ((2, 3), 4099, 0.7),       # 3-D logits, several chunks, temperature
    ((5,), 1000, 1.3),
])
def test_fp32_matches_reference(shape, vocab, temperature):
    logits, targets, grad_lp, grad_ent = make_case(shape, vocab, ignore_every=4)
    ours, ref = run_both(logits, targets, grad_lp, grad_ent, temperature=temperature)
    assert ours[0].dtype == torch.float32 and ours[0].shape == targets.shape
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


def test_logprob_only_matches_reference_and_hand_value():
    logits = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    lp = fused_logprob(logits, torch.tensor([2]))
    # log(e^2 / (1 + e + e^2)) by hand
    assert abs(lp.item() - (2.0 - torch.tensor([0.0, 1.0, 2.0]).exp().sum().log().item())) < 1e-6
    lp.sum().backward()
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    torch.testing.assert_close(logits.grad[0], torch.tensor([0.0, 0.0, 1.0]) - p, atol=1e-6, rtol=0)


def test_entropy_gradient_alone():
    logits, targets, _, grad_ent = make_case((6,), 3000, seed=1)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (fused_logprob(ours_in, targets, return_entropy=True)[1] * grad_ent).sum().backward()
    (logprob_reference(ref_in, targets)[1] * grad_ent).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=FP32_ATOL, rtol=0)


def test_all_tokens_masked():
    logits, _, grad_lp, grad_ent = make_case((4,), 500)
    targets = torch.full((4,), -100)
    ours, _ = run_both(logits, targets, grad_lp, grad_ent)
    assert torch.equal(ours[0], torch.zeros(4)) and torch.equal(ours[1], torch.zeros(4))
    assert torch.equal(ours[2], torch.zeros_like(logits))


def test_custom_ignore_index():
    logits, targets, grad_lp, grad_ent = make_case((8,), 300)
    targets[3] = -1
    ours_in = logits.clone().requires_grad_()
    lp = fused_logprob(ours_in, targets, ignore_index=-1)
    lp.sum().backward()
    assert lp[3].item() == 0.0 and torch.count_nonzero(ours_in.grad[3]) == 0
    assert torch.count_nonzero(ours_in.grad[2]) == 300


def test_large_logits_stay_exact():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 2500, generator=gen).sign() * 1e4 + torch.randn(6, 2500, generator=gen)
    targets = torch.randint(0, 2500, (6,), generator=gen)
    targets[0] = int(logits[0].argmax())  # a likely token: log-prob near 0 needs lse without rounding
    ours, ref = run_both(logits, targets, torch.randn(6, generator=gen), torch.randn(6, generator=gen))
    for got, want in zip(ours, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


def test_minus_inf_columns_stay_finite():
    logits, targets, grad_lp, grad_ent = make_case((5,), 3000, seed=3)
    logits[:, 2900:] = float("-inf")  # padded vocabulary rows
    logits[1, :2100] = float("-inf")  # a whole 2048-column chunk of -inf
    targets[1] = 2500
    ours, ref = run_both(logits, targets, grad_lp, grad_ent)
    for got, want in zip(ours, ref):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    assert torch.equal(ours[2][:, 2900:], torch.zeros(5, 100))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(dtype):
    logits, targets, grad_lp, grad_ent = make_case((7,), 2100, dtype=dtype, seed=4, ignore_every=3)
    ours, ref = run_both(logits, targets, grad_lp, grad_ent)
    # Both accumulate in fp32 from the same rounded inputs: outputs agree to fp32 accuracy, grads to one ulp of dtype.
    torch.testing.assert_close(ours[0], ref[0], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ours[1], ref[1], atol=FP32_ATOL, rtol=0)
    assert ours[2].dtype == dtype
    torch.testing.assert_close(ours[2], ref[2])


def test_inplace_backward_writes_into_logits_storage():
    logits, targets, grad_lp, grad_ent = make_case((4,), 2500, seed=5)
    leaf = logits.clone().requires_grad_()
    hidden = leaf + 0.0  # the logits: produced by an op that does not save them
    seen = []
    hidden.register_hook(lambda grad: seen.append(grad.data_ptr()))
    lp, ent = fused_logprob(hidden, targets, return_entropy=True, inplace_backward=True)
    (lp * grad_lp + ent * grad_ent).sum().backward()
    assert seen == [hidden.data_ptr()]
    _, ref = run_both(logits, targets, grad_lp, grad_ent)
    torch.testing.assert_close(leaf.grad, ref[2], atol=FP32_ATOL, rtol=0)


def test_non_contiguous_logits():
    logits, targets, grad_lp, grad_ent = make_case((3,), 600, seed=6)
    strided = logits.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    ours, ref = run_both(strided, targets, grad_lp, grad_ent)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=torch.tensor([0, 10])), "outside the vocabulary"),
    (dict(targets=torch.tensor([0, -5])), "outside the vocabulary"),
    (dict(targets=torch.tensor([0, 1, 2])), "targets shape"),
    (dict(targets=torch.tensor([0.0, 1.0])), "integer token ids"),
    (dict(logits=torch.zeros(2, 10, dtype=torch.float64)), "dtype"),
    (dict(temperature=0.0), "temperature"),
    (dict(vocab_end=11), "vocab_end=11"),
    (dict(vocab_end=5, targets=torch.tensor([0, 7])), r"outside the vocabulary \[0, 5\)"),
    (dict(seq_first=True), "seq_first"),
    (dict(seq_first=True, logits=torch.zeros(2, 3, 10)), "seq_first"),
])
def test_user_errors(kwargs, message):
    args = dict(logits=torch.zeros(2, 10), targets=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fused_logprob(**args)


def run_trainer_layout(logits_sbv, targets_bs, grad_lp, grad_ent, vocab_end, tp_group=None, rank=0, world_size=1):
    """The trainer's call on this rank's shard of [s, b, V] logits: returns (lp, ent, grad of the shard, shared?)."""
    shard = logits_sbv.shape[-1] // world_size
    leaf = logits_sbv[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    hidden = leaf + 0.0  # the LM head's output: produced by an op that does not save it
    seen = []
    hidden.register_hook(lambda grad: seen.append(grad.data_ptr()))
    lp, ent = fused_logprob(hidden, targets_bs, tp_group=tp_group, return_entropy=True, vocab_end=vocab_end,
                            seq_first=True, inplace_backward=True)
    (lp * grad_lp + ent * grad_ent).sum().backward()
    return lp.detach(), ent.detach(), leaf.grad, seen == [hidden.data_ptr()]


def make_trainer_case(dtype, seed, vocab=2 * 1500, vocab_end=2 * 1500 - 213, seq=5, batch=3):
    """[s, b, V] logits whose padded columns hold garbage (finite, large), [b, s] shifted targets ending in ignores."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(seq, batch, vocab, generator=gen) * 3).to(dtype)
    logits[..., vocab_end:] = 50.0  # an unmasked LM head's padded rows: would dominate any softmax reading them
    targets = torch.randint(0, vocab_end, (batch, seq), generator=gen)
    targets[:, -1] = -100  # nothing to predict after the last token
    targets[0, :2] = -100  # prompt tokens
    targets[2, :] = -100   # a row (padding) with nothing in the loss
    targets[1, 0] = vocab_end - 1
    return logits, targets, torch.randn(batch, seq, generator=gen), torch.randn(batch, seq, generator=gen), vocab_end


def reference_trainer_layout(logits_sbv, targets_bs, grad_lp, grad_ent, vocab_end):
    """log_softmax + gather on [b, s, V] with the padded columns sliced off; the gradient mapped back to [s, b, V]."""
    leaf = logits_sbv.clone().requires_grad_()
    lp, ent = logprob_reference(leaf.transpose(0, 1)[..., :vocab_end], targets_bs)
    (lp * grad_lp + ent * grad_ent).sum().backward()
    return lp.detach(), ent.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_layout_tp1_matches_reference(dtype):
    # [s, b, V] logits straight from the LM head, padded columns masked inside the kernel, ignored rows skipped,
    # gradient written in place: the same numbers as log_softmax over [b, s, V][..., :vocab_end].
    logits, targets, grad_lp, grad_ent, vocab_end = make_trainer_case(dtype, seed=11)
    lp, ent, grad, in_place = run_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end)
    want = reference_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end)
    assert in_place and lp.shape == targets.shape
    torch.testing.assert_close(lp, want[0], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ent, want[1], atol=FP32_ATOL, rtol=0)
    assert torch.count_nonzero(grad[..., vocab_end:]) == 0
    assert torch.count_nonzero(grad[:, 2]) == 0 and torch.count_nonzero(grad[-1]) == 0  # ignored rows
    torch.testing.assert_close(grad, want[2], **({"atol": FP32_ATOL, "rtol": 0} if dtype == torch.float32 else {}))


def test_ignored_rows_and_padded_columns_are_not_read():
    # NaN in every place the kernels skip: the results are those of the clean logits.
    logits, targets, grad_lp, grad_ent, vocab_end = make_trainer_case(torch.float32, seed=12)
    dirty = logits.clone()
    dirty[..., vocab_end:] = float("nan")
    dirty.transpose(0, 1)[targets == -100] = float("nan")
    got = run_trainer_layout(dirty, targets, grad_lp, grad_ent, vocab_end)
    want = run_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)


def test_seq_first_equals_batch_first_bit_for_bit():
    # Only the row order differs: per row the same arithmetic, so the same bits.
    logits, targets, grad_lp, grad_ent, vocab_end = make_trainer_case(torch.float32, seed=13)
    lp, ent, grad, _ = run_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end)
    leaf = logits.transpose(0, 1).contiguous()[..., :vocab_end].requires_grad_()
    lp2, ent2 = fused_logprob(leaf, targets, return_entropy=True)
    (lp2 * grad_lp + ent2 * grad_ent).sum().backward()
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
    assert torch.equal(grad.transpose(0, 1)[..., :vocab_end], leaf.grad)


def _trainer_layout_tp_worker(rank, world_size, logits, targets, grad_lp, grad_ent, vocab_end):
    return run_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end, dist.group.WORLD, rank, world_size)


@pytest.mark.parametrize("vocab_end", [2 * 1500 - 213, 1500 - 5])  # padding on rank 1 only / rank 1 all padding
def test_trainer_layout_tp2_matches_reference(vocab_end):
    logits, targets, grad_lp, grad_ent, _ = make_trainer_case(torch.float32, seed=14, vocab_end=vocab_end)
    results = run_distributed(_trainer_layout_tp_worker, 2, logits, targets, grad_lp, grad_ent, vocab_end)
    want = reference_trainer_layout(logits, targets, grad_lp, grad_ent, vocab_end)
    for lp, ent, _, in_place in results:
        assert in_place
        torch.testing.assert_close(lp, want[0], atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(ent, want[1], atol=FP32_ATOL, rtol=0)
    grad = torch.cat([results[0][2], results[1][2]], dim=-1)
    torch.testing.assert_close(grad, want[2], atol=FP32_ATOL, rtol=0)


def _tp_worker(rank, world_size, logits, targets, grad_lp, grad_ent, temperature):
    shard = logits.shape[-1] // world_size
    local = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    lp, ent = fused_logprob(local, targets, tp_group=dist.group.WORLD, return_entropy=True,
                            temperature=temperature)
    (lp * grad_lp + ent * grad_ent).sum().backward()
    return lp.detach(), ent.detach(), local.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp2_matches_unsharded(dtype):
    logits, targets, grad_lp, grad_ent = make_case((3, 4), 2 * 1500, dtype=dtype, seed=7, ignore_every=5)
    logits[..., 2700:] = float("-inf")            # padded vocabulary on rank 1
    logits[0, 0, 1500:] = float("-inf")           # a token whose whole rank-1 shard is -inf
    targets[0, 1] = 1499                          # last id of rank 0
    targets[0, 2] = 1500                          # first id of rank 1
    results = run_distributed(_tp_worker, 2, logits, targets, grad_lp, grad_ent, 0.9)
    _, ref = run_both(logits, targets, grad_lp, grad_ent, temperature=0.9)
    for rank_result in results:
        torch.testing.assert_close(rank_result[0], ref[0], atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(rank_result[1], ref[1], atol=FP32_ATOL, rtol=0)
    grad = torch.cat([results[0][2], results[1][2]], dim=-1)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref[2], atol=FP32_ATOL, rtol=0)
    else:
        torch.testing.assert_close(grad, ref[2])


def test_no_tokens_and_single_unbatched_token():
    empty = torch.zeros(0, 50, requires_grad=True)
    lp = fused_logprob(empty, torch.zeros(0, dtype=torch.long))
    lp.sum().backward()
    assert lp.shape == (0,) and empty.grad.shape == (0, 50)
    logits, _, _, _ = make_case((), 50, seed=8)
    ours, ref = run_both(logits, torch.tensor(3), torch.tensor(1.0), torch.tensor(0.5))
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 4), vocab=st.integers(1, 4500), temperature=st.floats(0.25, 4.0),
       scale=st.sampled_from([0.1, 5.0, 300.0]), pad=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_random_shapes_match_reference(tokens, vocab, temperature, scale, pad, seed):
    logits, targets, grad_lp, grad_ent = make_case((tokens,), vocab, scale=scale, seed=seed)
    if pad and vocab > pad:  # padded vocabulary columns, never the target
        logits[:, -pad:] = float("-inf")
        targets = targets % (vocab - pad)
    ours, ref = run_both(logits, targets, grad_lp, grad_ent, temperature=temperature)
    # rtol 1e-6 (a few fp32 ulps) on top of 1e-5 abs: log-probs reach -1e4 here, where one ulp is ~1e-3.
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=1e-6)


def test_rows_past_2_31_elements():
    # T x V > 2^31 (bf16, 4.3 GB of address space): every row but the last three is ignored, so only those are read
    # and only their pages are ever touched (the rest stays unmapped, costing no memory). The last rows' offsets
    # (row * V) exceed int32; a 32-bit index would read the wrong rows. The backward writes every row (zeros on
    # ignored ones), which would touch all 4.3 GB: its offsets are the same int64 row * V (and the CUDA kernels'
    # row split is checked on CPU in test_row_layout.py).
    vocab = 151936
    rows = 2 ** 31 // vocab + 3
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(15)
    logits[-3:] = (torch.randn(3, vocab, generator=gen) * 3).to(torch.bfloat16)
    targets = torch.full((rows,), -100)
    targets[-3:] = torch.tensor([5, vocab - 1, 77777])
    assert rows * vocab > 2 ** 31
    with torch.no_grad():
        lp, ent = fused_logprob(logits, targets, return_entropy=True)
    ref_lp, ref_ent = logprob_reference(logits[-3:], targets[-3:])
    torch.testing.assert_close(lp[-3:], ref_lp, atol=FP32_ATOL, rtol=0)
    # entropy ~6.7 summed over 152k fp32 terms in different orders: a few ulp apart
    torch.testing.assert_close(ent[-3:], ref_ent, atol=FP32_ATOL, rtol=2e-5)
    assert torch.count_nonzero(lp[:-3]) == 0 and torch.count_nonzero(ent[:-3]) == 0
