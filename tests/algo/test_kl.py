"""KL estimators k1/k2/k3: hand values, clamps, unbiasedness over an exact categorical expectation, beta = 0."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_vlmr1.algo import AlgoConfig, get_kl_estimator, kl_penalty
from megatron_vlmr1.algo.kl import K3_MAX

# d = ref - logp = [-0.5, 1.0, 0.0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


def test_k1_hand_values():
    torch.testing.assert_close(get_kl_estimator("k1")(LOGP, REF), torch.tensor([[0.5, -1.0, 0.0]]))


def test_k2_hand_values():
    torch.testing.assert_close(get_kl_estimator("k2")(LOGP, REF), torch.tensor([[0.125, 0.5, 0.0]]))


def test_k3_hand_values_and_gradient():
    logp = LOGP.clone().requires_grad_(True)
    kl = get_kl_estimator("k3")(logp, REF)
    # exp(-0.5) + 0.5 - 1 = 0.1065307;  exp(1) - 1 - 1 = 0.7182818;  exp(0) - 0 - 1 = 0.
    torch.testing.assert_close(kl, torch.tensor([[0.1065307, 0.7182818, 0.0]]), rtol=0, atol=1e-6)
    kl.sum().backward()
    # d/dlogp (exp(d) - d - 1) with d = ref - logp is 1 - exp(d): 1 - exp(-0.5) = 0.3934693, 1 - e = -1.7182818.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.3934693, -1.7182818, 0.0]]), rtol=0, atol=1e-6)


def test_k3_clamps_large_log_ratios():
    logp = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    # d = 5: exp(5) - 6 = 142.4 -> clamped to 10.  d = -30: d clamps to -20, exp(-20) + 19 = 19.0 -> 10.
    # d = 2.5: exp(2.5) - 3.5 = 8.6824940, below the clamp, untouched.
    ref = torch.tensor([[5.0, -30.0, 2.5]])
    kl = get_kl_estimator("k3")(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[K3_MAX, K3_MAX, 8.6824940]]), rtol=0, atol=1e-5)
    kl.sum().backward()
    # Clamped tokens have no gradient; the unclamped one has 1 - exp(2.5) = -11.1824940.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -11.1824940]]), rtol=0, atol=1e-5)
    # An extreme log ratio stays finite (no inf - inf).
    assert torch.isfinite(get_kl_estimator("k3")(torch.tensor([[0.0]]), torch.tensor([[1e4]]))).all()


def test_k1_k3_unbiased_k2_not():
    # Sampling y ~ p and averaging k(y) estimates KL(p || q); evaluate that expectation exactly over 3 categories.
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    true_kl = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.5) + 0.1 * math.log(0.5)  # = 0.1837868
    logp, logq = p.log()[None], q.log()[None]
    expectation = {name: float((p * get_kl_estimator(name)(logp, logq)[0]).sum()) for name in ("k1", "k2", "k3")}
    assert expectation["k1"] == pytest.approx(true_kl, abs=1e-6)
    assert expectation["k3"] == pytest.approx(true_kl, abs=1e-6)
    # k2 = E[(log p/q)^2] / 2 = (0.7 * 0.5596158^2 + 0.3 * 0.6931472^2) / 2 = 0.1816774: biased.
    assert expectation["k2"] == pytest.approx(0.1816774, abs=1e-6)
    # Per token, k3 is never negative while k1 is.
    assert (get_kl_estimator("k3")(logp, logq) >= 0).all()
    assert (get_kl_estimator("k1")(logp, logq) < 0).any()


def test_kl_penalty_beta_zero_is_none():
    cfg = AlgoConfig(beta=0.0)
    assert kl_penalty(LOGP, None, cfg) is None
    assert kl_penalty(LOGP, REF, cfg) is None


def test_kl_penalty_uses_configured_estimator():
    torch.testing.assert_close(kl_penalty(LOGP, REF, AlgoConfig(beta=0.1, kl_estimator="k2")),
                               torch.tensor([[0.125, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        kl_penalty(LOGP, None, AlgoConfig(beta=0.1))
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(LOGP, REF[:, :2], AlgoConfig(beta=0.1))
