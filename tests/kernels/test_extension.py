"""The csrc ops against their torch twins, and the fallback path (what runs when the extension is missing)."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from megatron_vlmr1.kernels import extension, fused_logprob, group_advantage
from megatron_vlmr1.kernels import reference as ref


def make_stats_inputs(rows=5, vocab=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    logits[0, :] = float("-inf")        # a row with nothing on this shard
    logits[1, 100:2500] = float("-inf")
    targets = torch.randint(0, 2 * vocab, (rows,), generator=gen)  # about half live on another shard
    targets[2] = -100
    return logits, targets


def test_cpu_kernel_is_registered():
    assert extension.has_kernel("cpu")
    assert not extension.has_kernel("xla")


def test_stats_op_matches_torch_twin():
    logits, targets = make_stats_inputs()
    got = torch.ops.vlmr1.logprob_stats(logits, targets, 3000, 6000, 0.8, -100)
    want = ref.logprob_stats_torch(logits, targets, 3000, 6000, 0.8, -100)
    assert got[0, 0] == float("-inf") and got[0, 1] == 0 and got[0, 2] == 0
    assert got[2].tolist() == [0.0, 1.0, 0.0, 0.0]  # ignored row
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab_end", [3000 + 2049, 3000 + 7, 3000, 2000])
def test_ops_skip_padded_columns_and_ignored_rows(vocab_end):
    # NaN where the kernels must not read: the padded columns (global id >= vocab_end) and the ignored row.
    logits, targets = make_stats_inputs(seed=3)
    logits[0, 0] = 1.0
    valid = max(0, min(3000, vocab_end - 3000))
    targets = torch.where(targets >= vocab_end, targets % 3000, targets)
    logits[:, valid:] = float("nan")
    logits[2] = float("nan")
    got = torch.ops.vlmr1.logprob_stats(logits, targets, 3000, vocab_end, 0.8, -100)
    want = ref.logprob_stats_torch(logits, targets, 3000, vocab_end, 0.8, -100)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rows = logits.shape[0]
    args = (logits, targets, torch.full((rows,), 3.0), torch.full((rows,), 8.5), torch.rand(rows),
            torch.randn(rows), torch.randn(rows), 3000, vocab_end, 0.8, -100)
    got_grad = torch.full_like(logits, 7.0)
    torch.ops.vlmr1.logprob_grad(*args, got_grad)
    assert torch.count_nonzero(got_grad[:, valid:]) == 0 and torch.count_nonzero(got_grad[2]) == 0
    torch.testing.assert_close(got_grad, ref.logprob_grad_torch(*args), atol=1e-6, rtol=1e-5)


def test_grad_op_matches_torch_twin():
    logits, targets = make_stats_inputs(seed=1)
    logits[0, 0] = 1.0
    rows = logits.shape[0]
    row_max, log_sum = torch.full((rows,), 3.0), torch.full((rows,), 8.5)
    entropy, g_lp, g_ent = torch.rand(rows), torch.randn(rows), torch.randn(rows)
    args = (logits, targets, row_max, log_sum, entropy, g_lp, g_ent, 3000, 6000, 0.8, -100)
    got = torch.empty_like(logits)
    torch.ops.vlmr1.logprob_grad(*args, got)
    want = ref.logprob_grad_torch(*args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(got[2]) == 0


@pytest.mark.parametrize("trainer_args", [False, True])
def test_fallback_reports_torch_warns_once_and_matches(monkeypatch, trainer_args):
    logits, targets = make_stats_inputs(seed=2)
    logits[0, 7] = 2.0  # a full row of -inf has no softmax
    targets = targets % 2900
    # the trainer's arguments: [s, b, V] logits with [b, s] targets and a padded vocabulary end
    kwargs = dict(vocab_end=2900, seq_first=True) if trainer_args else {}
    if trainer_args:
        logits, targets = logits[1:].view(2, 2, 3000), targets[1:].view(2, 2)
    csrc_leaf = logits.clone().requires_grad_()
    want_lp, want_ent = fused_logprob(csrc_leaf, targets, return_entropy=True, **kwargs)
    (want_lp - want_ent).sum().backward()
    want_adv = group_advantage(torch.arange(6.0), 3)
    monkeypatch.setattr(extension, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(extension, "_warned", set())
    assert extension.backend("cpu") == "torch"
    leaf = logits.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="plain-torch fallback"):
        lp, ent = fused_logprob(leaf, targets, return_entropy=True, **kwargs)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use must not warn again
        (lp - ent).sum().backward()
        torch.testing.assert_close(group_advantage(torch.arange(6.0), 3), want_adv)
    torch.testing.assert_close(leaf.grad, csrc_leaf.grad, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_jit_build_when_the_extension_is_missing():
    # A fresh process where megatron_vlmr1._C cannot be imported: backend says "torch", then build_jit compiles
    # csrc/ with torch.utils.cpp_extension.load and the CPU kernels run.
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["megatron_vlmr1._C"] = None
        import torch
        from megatron_vlmr1 import kernels
        assert kernels.backend("cpu") == "torch", kernels.backend("cpu")
        kernels.build_jit(with_cuda=False)
        assert kernels.backend("cpu") == "csrc-cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            adv = kernels.group_advantage(torch.tensor([0.0, 2.0]), 2, eps=0.0)
        assert torch.allclose(adv, torch.tensor([-2 ** -0.5, 2 ** -0.5])), adv
        print("jit ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "jit ok" in out.stdout, out.stderr[-3000:]
