"""Clipped policy loss: hand values, gradients (zero exactly where a clip is active), clip-higher, dual clip,
truncated importance sampling, the composed GRPO loss and its metrics."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_vlmr1.algo import AlgoConfig, clipped_surrogate, get_policy_loss, tis_weight

LN2 = math.log(2.0)


def logprobs_with_ratios(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """old log-probs 0 and current log-probs ln(r), so that pi_theta / pi_old = r; [1, T], the latter with grad."""
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    return torch.tensor([ratios], dtype=torch.float64).log().requires_grad_(True), old


def surrogate_and_grad(ratios, advantages, eps_low=0.2, eps_high=0.28, dual_clip_c=None):
    logp, old = logprobs_with_ratios(ratios)
    adv = torch.tensor([advantages], dtype=torch.float64)
    out = clipped_surrogate(logp, old, adv, eps_low, eps_high, dual_clip_c)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    return out, grad[0].tolist()


def test_clipped_objective_hand_values_and_gradients():
    # eps_low 0.2, eps_high 0.28: ratios clip to [0.8, 1.28]; loss = max(-A r, -A clip(r)).
    #   A=+1 r=1.5: max(-1.5, -1.28) = -1.28, clipped above -> no gradient
    #   A=+1 r=0.5: max(-0.5, -0.8)  = -0.5,  unclipped (the pessimistic bound keeps it) -> d/dlogp = -A r = -0.5
    #   A=+1 r=1.1: inside the range -> -1.1, gradient -1.1
    #   A=-1 r=0.7: max(0.7, 0.8)    = 0.8,   clipped below -> no gradient
    #   A=-1 r=1.5: max(1.5, 1.28)   = 1.5,   unclipped -> gradient 1.5
    #   A=-2 r=0.9: inside -> 1.8, gradient 1.8
    #   A= 0 r=3.0: 0, no gradient
    out, grad = surrogate_and_grad([1.5, 0.5, 1.1, 0.7, 1.5, 0.9, 3.0], [1, 1, 1, -1, -1, -2, 0])
    assert out.loss[0].tolist() == pytest.approx([-1.28, -0.5, -1.1, 0.8, 1.5, 1.8, 0.0], abs=1e-12)
    assert grad == pytest.approx([0.0, -0.5, -1.1, 0.0, 1.5, 1.8, 0.0], abs=1e-12)
    assert out.clipped_upper[0].tolist() == [True, False, False, False, False, False, False]
    assert out.clipped_lower[0].tolist() == [False, False, False, True, False, False, False]
    assert not out.dual_clipped.any()


def test_clip_higher_lets_unlikely_tokens_grow():
    # A=+1, r=1.25: a symmetric 0.2 clip stops it (loss -1.2, no gradient); DAPO's eps_high=0.28 does not.
    symmetric, grad_symmetric = surrogate_and_grad([1.25], [1.0], eps_low=0.2, eps_high=0.2)
    higher, grad_higher = surrogate_and_grad([1.25], [1.0], eps_low=0.2, eps_high=0.28)
    assert symmetric.loss.item() == pytest.approx(-1.2) and grad_symmetric == [0.0]
    assert higher.loss.item() == pytest.approx(-1.25) and grad_higher == pytest.approx([-1.25])


def test_dual_clip_bounds_negative_advantages():
    # A=-1 r=4: max(4, 1.28) = 4 is unbounded in r; with c=3 it becomes min(4, 3) = 3 with no gradient.
    # A=-1 r=2 (< c): 2, gradient 2.  A=-1 r=0.5: ordinary lower clip 0.8.  A=+1 r=4: ordinary upper clip -1.28.
    ratios, advantages = [4.0, 2.0, 0.5, 4.0], [-1, -1, -1, 1]
    plain, plain_grad = surrogate_and_grad(ratios, advantages)
    dual, dual_grad = surrogate_and_grad(ratios, advantages, dual_clip_c=3.0)
    assert plain.loss[0].tolist() == pytest.approx([4.0, 2.0, 0.8, -1.28])
    assert plain_grad == pytest.approx([4.0, 2.0, 0.0, 0.0])
    assert dual.loss[0].tolist() == pytest.approx([3.0, 2.0, 0.8, -1.28])
    assert dual_grad == pytest.approx([0.0, 2.0, 0.0, 0.0])
    assert dual.dual_clipped[0].tolist() == [True, False, False, False]


def test_tis_weight_is_truncated_constant():
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0]], requires_grad=True)
    weight = tis_weight(old, torch.zeros(1, 3), cap=2.0)
    assert weight[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert not weight.requires_grad


# One batch for the composed loss: B=2, T=3, the second sequence has 2 response tokens.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]], dtype=torch.float64)
# ref - logp = [[0, ln 2, 0], [-ln 2, 0, junk]]: k3 = 1 - ln 2 = 0.3068528 and ln 2 - 1/2 = 0.1931472.
REF = OLD + torch.tensor([[0.0, LN2, 0.0], [-LN2, 0.0, 5.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # on-policy (ratio 1) so pg = -A per token; per_token = -A + 0.04 * k3:
        #   row 0: [-1, -1 + 0.04 * 0.3068528, -1], sum -2.9877259;  row 1: [0.5 + 0.04 * 0.1931472, 0.5], sum 1.0077259
        # seq-mean-token-mean: (-2.9877259 / 3 + 1.0077259 / 2) / 2 = -0.2460228
        ("seq-mean-token-mean", -0.2460228),
        # token-mean: (-2.9877259 + 1.0077259) / 5 = -1.98 / 5 = -0.396
        ("token-mean", -0.396),
        # seq-mean-token-sum-norm, max_response_length 4: (-2.9877259 / 4 + 1.0077259 / 4) / 2 = -0.2475
        ("seq-mean-token-sum-norm", -0.2475),
    ],
)
def test_grpo_loss_hand_values(mode, expected):
    cfg = AlgoConfig(beta=0.04, kl_estimator="k3", loss_agg=mode, max_response_length=4)
    logp = OLD.clone().requires_grad_(True)
    loss, metrics = get_policy_loss("grpo")(logp, OLD, REF, ADV, MASK, cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["clip_frac"]) == 0.0


def test_grpo_loss_gradient_and_metrics_seq_mean_token_mean():
    cfg = AlgoConfig(beta=0.04, kl_estimator="k3")
    logp = OLD.clone().requires_grad_(True)
    loss, metrics = get_policy_loss("grpo")(logp, OLD, REF, ADV, MASK, cfg)
    loss.backward()
    # d/dlogp of (-A r + beta k3) at r = 1 is -A + beta (1 - exp(ref - logp)), then the aggregation weight
    # 1 / (S * L_i): 1/6 on row 0, 1/4 on row 1.
    #   row 0: [-1/6, (-1 + 0.04 * (1 - 2)) / 6, -1/6]       = [-0.1666667, -0.1733333, -0.1666667]
    #   row 1: [(0.5 + 0.04 * (1 - 0.5)) / 4, 0.5 / 4, pad] = [0.13, 0.125, 0]
    expected = torch.tensor([[-1 / 6, -0.1733333, -1 / 6], [0.13, 0.125, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-7)
    # pg_loss: (-1 + 0.5) / 2;  kl: (0.3068528 / 3 + 0.1931472 / 2) / 2 = 0.0994289.
    assert float(metrics["pg_loss"]) == pytest.approx(-0.25)
    assert float(metrics["kl"]) == pytest.approx(0.0994289, abs=1e-7)


def test_grpo_loss_off_policy_metrics():
    # One sequence of 3 response tokens (+1 padding token with a ratio of 7 that must not count).
    logp, old = logprobs_with_ratios([1.5, 1.0, 0.4, 7.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    cfg = AlgoConfig(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_agg="token-mean")
    loss, metrics = get_policy_loss("grpo")(logp, old, None, adv, mask, cfg)
    # losses: max(-1.5, -1.2) = -1.2 (upper clip), -1.0, max(0.4, 0.8) = 0.8 (lower clip); mean -0.4666667.
    assert loss.item() == pytest.approx(-1.4 / 3)
    assert float(metrics["clip_frac_upper"]) == pytest.approx(1 / 3)
    assert float(metrics["clip_frac_lower"]) == pytest.approx(1 / 3)
    assert float(metrics["clip_frac"]) == pytest.approx(2 / 3)
    assert float(metrics["dual_clip_frac"]) == 0.0
    assert float(metrics["ratio_mean"]) == pytest.approx(2.9 / 3)
    assert float(metrics["ratio_max"]) == pytest.approx(1.5)
    # approx_kl = mean(r - 1 - ln r) = (0.0945349 + 0 + 0.3162907) / 3
    assert float(metrics["approx_kl"]) == pytest.approx(0.1369419, abs=1e-7)
    assert metrics["kl"] == 0.0


def test_grpo_loss_truncated_importance_sampling():
    # On-policy for the trainer (r = 1) but the rollout engine's probabilities differ: pi_old / pi_rollout =
    # [3, 0.5, 1], truncated at 2 -> [2, 0.5, 1]. token-mean of -A * w = -(2 + 0.5 + 1) / 3.
    logp, old = logprobs_with_ratios([1.0, 1.0, 1.0])
    rollout = torch.tensor([[-math.log(3.0), math.log(2.0), 0.0]], dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3)
    cfg = AlgoConfig(beta=0.0, loss_agg="token-mean", tis_cap=2.0)
    loss, metrics = get_policy_loss("grpo")(logp, old, None, adv, mask, cfg, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-3.5 / 3)
    assert float(metrics["tis_weight_mean"]) == pytest.approx(3.5 / 3)
    assert float(metrics["tis_truncated_frac"]) == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == pytest.approx([-2 / 3, -0.5 / 3, -1 / 3])
    # Without tis_cap the rollout log-probs are ignored.
    plain, _ = get_policy_loss("grpo")(logp, old, None, adv, mask, AlgoConfig(beta=0.0, loss_agg="token-mean"),
                                       rollout_logprobs=rollout)
    assert plain.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="tis_cap = 2.0 needs the rollout engine's log-probs"):
        get_policy_loss("grpo")(logp, old, None, adv, mask, cfg)


def test_grpo_loss_input_errors():
    cfg = AlgoConfig(beta=0.04)
    with pytest.raises(ValueError, match="broadcast_to_tokens"):
        get_policy_loss("grpo")(OLD, OLD, REF, ADV[:, 0], MASK, cfg)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        get_policy_loss("grpo")(OLD, OLD, None, ADV, MASK, cfg)


def test_extreme_log_ratio_stays_finite():
    # A token whose log-prob moved by 100 nats: the clamped ratio keeps loss and gradient finite.
    logp, old = torch.tensor([[0.0, 0.0]], requires_grad=True), torch.tensor([[-100.0, 100.0]])
    cfg = AlgoConfig(beta=0.0, dual_clip_c=3.0)
    loss, metrics = get_policy_loss("grpo")(logp, old, None, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
