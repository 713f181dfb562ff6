"""The loss menu against independent closed forms (TRL's formulas with DPOP's margin, one pair at a time in float64
with math), and the property DPOP exists for."""
import math

import pytest
import torch

from pipeline.loss import chosen_nll, dpop_loss, preference_loss


def closed_form(pc, pr, rc, rr, beta, lam):
    """Eq. 3 of the Smaug paper written out with math, one pair at a time, in float64."""
    z = (pc - rc) - (pr - rr)
    penalty = max(0.0, rc - pc)
    x = beta * (z - lam * penalty)
    return math.log1p(math.exp(-x)), penalty


# (policy chosen, policy rejected, ref chosen, ref rejected): chosen above, at and below the reference.
CASES = [
    (-10.0, -14.0, -11.0, -12.0),  # above: penalty 0
    (-11.0, -13.0, -11.0, -12.0),  # at the hinge
    (-12.5, -20.0, -11.0, -12.0),  # below: penalty 1.5
    (-40.0, -35.0, -38.0, -30.0),  # below, rejected rising too
]


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("lam", [0.0, 5.0, 50.0])
def test_matches_closed_form_on_both_sides_of_the_hinge(beta, lam):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*CASES))
    out = dpop_loss(pc, pr, rc, rr, beta, lam)
    for i, case in enumerate(CASES):
        expected_loss, expected_penalty = closed_form(*case, beta, lam)
        assert out.losses[i].item() == pytest.approx(expected_loss, rel=1e-12, abs=1e-12)
        assert out.penalty[i].item() == pytest.approx(expected_penalty)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (case[0] - case[2]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (case[1] - case[3]))


def test_lambda_zero_is_dpo_and_penalty_only_bites_below_reference():
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*CASES))
    dpo = dpop_loss(pc, pr, rc, rr, 0.1, 0.0).losses
    dpop = dpop_loss(pc, pr, rc, rr, 0.1, 50.0).losses
    z = (pc - rc) - (pr - rr)
    assert torch.allclose(dpo, torch.nn.functional.softplus(-0.1 * z))
    above = pc >= rc
    assert torch.equal(dpo[above], dpop[above])
    assert (dpop[~above] > dpo[~above]).all()


def test_large_margins_stay_finite():
    out = dpop_loss(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2), torch.zeros(2), 1.0, 50.0)
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(1e4 + 50 * 1e4, rel=1e-6)


def test_dpop_raises_a_chosen_logprob_below_reference_where_dpo_lowers_it():
    """A shared parameter θ moves both log-probs, the rejected one faster (as when chosen and rejected share most
    tokens): log p(chosen) = θ + c0, log p(rejected) = 3θ + r0. DPO widens the margin by lowering θ, which lowers
    the chosen log-prob further below the reference; DPOP's penalty flips the gradient and raises it."""
    def chosen_after_one_step(lam):
        theta = torch.tensor(0.0, requires_grad=True)
        policy_chosen, policy_rejected = theta - 11.0, 3 * theta - 12.0
        ref_chosen, ref_rejected = torch.tensor(-10.0), torch.tensor(-12.0)  # chosen is 1 nat below reference
        loss = dpop_loss(policy_chosen[None], policy_rejected[None], ref_chosen[None], ref_rejected[None],
                         0.1, lam).losses.sum()
        loss.backward()
        with torch.no_grad():
            theta -= 0.1 * theta.grad
        return (theta - 11.0).item()

    start = -11.0
    assert chosen_after_one_step(0.0) < start  # DPO: chosen log-prob falls
    assert chosen_after_one_step(50.0) > start  # DPOP: chosen log-prob rises


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def menu_closed_form(loss_type, pc, pr, rc, rr, beta, lam, eps):
    """The issue's table, written out: m = z − λ · max(0, rc − pc), then each loss of m."""
    m = (pc - rc) - (pr - rr) - lam * max(0.0, rc - pc)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * m) - eps * log_sigmoid(-beta * m)
    if loss_type == "robust":
        return ((1 - eps) * -log_sigmoid(beta * m) + eps * log_sigmoid(-beta * m)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (m - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * m)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2),
                                           ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("lam", [0.0, 50.0])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_loss_of_the_menu_matches_its_closed_form(loss_type, eps, lam, beta):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*CASES))
    out = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, dpop_lambda=lam, label_smoothing=eps)
    for i, case in enumerate(CASES):
        assert out.losses[i].item() == pytest.approx(menu_closed_form(loss_type, *case, beta, lam, eps),
                                                     rel=1e-12, abs=1e-12)
        assert out.penalty[i].item() == pytest.approx(max(0.0, case[2] - case[0]))


def test_dpop_loss_is_the_sigmoid_loss_and_robust_at_zero_smoothing_is_dpo():
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*CASES))
    for lam in (0.0, 50.0):
        dpop = dpop_loss(pc, pr, rc, rr, 0.1, lam)
        menu = preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", dpop_lambda=lam)
        assert all(torch.equal(a, b) for a, b in zip(dpop, menu))
        robust = preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="robust", dpop_lambda=lam)
        assert torch.allclose(robust.losses, dpop.losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_the_penalty_raises_a_falling_chosen_logprob_under_every_loss(loss_type):
    """The shared-parameter example above, under each loss: without λ one step lowers the chosen log-prob (all four
    widen the margin by lowering θ); with λ = 50 the penalty turns the gradient and the chosen log-prob rises."""
    def chosen_after_one_step(lam):
        theta = torch.tensor(0.0, requires_grad=True)
        policy_chosen, policy_rejected = theta - 11.0, 3 * theta - 12.0
        out = preference_loss(policy_chosen[None], policy_rejected[None], torch.tensor([-10.0]),
                              torch.tensor([-12.0]), beta=0.1, loss_type=loss_type, dpop_lambda=lam)
        out.losses.sum().backward()
        with torch.no_grad():
            theta -= 0.01 * theta.grad
        return (theta - 11.0).item()

    assert chosen_after_one_step(0.0) < -11.0
    assert chosen_after_one_step(50.0) > -11.0


def test_bad_loss_settings_are_named():
    ones = torch.ones(1)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        preference_loss(ones, ones, ones, ones, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to sigmoid and robust, not ipo"):
        preference_loss(ones, ones, ones, ones, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_chosen_nll_is_the_mean_token_nll():
    token_logps = [[-0.5, -1.5, -1.0], [-2.0, -4.0]]
    sums = torch.tensor([sum(t) for t in token_logps], dtype=torch.float64)
    tokens = torch.tensor([len(t) for t in token_logps], dtype=torch.float64)
    assert chosen_nll(sums, tokens).tolist() == pytest.approx([1.0, 3.0])
