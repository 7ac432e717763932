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
    got = torch.ops.vlmr1.logprob_stats(logits, targets, 3000, 0.8, -100)
    want = ref.logprob_stats_torch(logits, targets, 3000, 0.8, -100)
    assert got[0, 0] == float("-inf") and got[0, 1] == 0 and got[0, 2] == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grad_op_matches_torch_twin():
    logits, targets = make_stats_inputs(seed=1)
    logits[0, 0] = 1.0
    rows = logits.shape[0]
    row_max, log_sum = torch.full((rows,), 3.0), torch.full((rows,), 8.5)
    entropy, g_lp, g_ent = torch.rand(rows), torch.randn(rows), torch.randn(rows)
    args = (logits, targets, row_max, log_sum, entropy, g_lp, g_ent, 3000, 0.8, -100)
    got = torch.empty_like(logits)
    torch.ops.vlmr1.logprob_grad(*args, got)
    want = ref.logprob_grad_torch(*args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(got[2]) == 0


def test_fallback_reports_torch_warns_once_and_matches(monkeypatch):
    logits, targets = make_stats_inputs(seed=2)
    logits[0, 7] = 2.0  # a full row of -inf has no softmax
    targets = targets % 3000
    csrc_leaf = logits.clone().requires_grad_()
    want_lp, want_ent = fused_logprob(csrc_leaf, targets, return_entropy=True)
    (want_lp - want_ent).sum().backward()
    want_adv = group_advantage(torch.arange(6.0), 3)
    monkeypatch.setattr(extension, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(extension, "_warned", set())
    assert extension.backend("cpu") == "torch"
    leaf = logits.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="plain-torch fallback"):
        lp, ent = fused_logprob(leaf, targets, return_entropy=True)
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
