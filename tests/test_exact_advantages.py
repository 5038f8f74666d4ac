"""The exact estimators over enumerated leaves (she.algorithms.advantages, section 11): hand-computed values, the
exact policy gradient checked with autograd, a loop reference, and the properties the docs claim."""

from __future__ import annotations

import math

import pytest
import torch

from she.algorithms.advantages import (
    AdvantageInputs,
    AdvantageOptions,
    compute_advantages,
    exact_tree_advantages,
    expected_share_pin,
    leaf_probabilities,
    teacher_leaf_term,
)


def test_hand_computed_two_leaves():
    # pi = (0.75, 0.25), R = (1, 0): V = 0.75; the batch std under pi is sqrt(0.75 * 0.25) = 0.4330;
    # A = 2 * pi * (R - V) / s = (2 * 0.75 * 0.25, 2 * 0.25 * -0.75) / 0.4330 = (+0.8660, -0.8660)
    adv = exact_tree_advantages(torch.tensor([1.0, 0.0]), torch.tensor([math.log(0.75), math.log(0.25)]), 2, eps=0.0)
    assert adv.tolist() == pytest.approx([0.8660254, -0.8660254], abs=1e-6)


def test_leaf_probabilities_renormalise_within_each_group():
    logp = torch.tensor([math.log(0.3), math.log(0.1), -5.0, -5.0])  # mass 0.4 on the first group's leaves
    assert leaf_probabilities(logp, 2).tolist() == pytest.approx([0.75, 0.25, 0.5, 0.5], abs=1e-6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        leaf_probabilities(torch.zeros(5), 2)


def _autograd_reference(rewards, logp, g, weight, pin, eps):
    """G * grad_theta sum_groups [ w_g sum_c pi_c R_c / (s + eps) + sum_c pi_c h_c ] with theta = the leaf log-probs
    (unnormalised) and s, w, h held constant: the exact policy gradient the advantages must reproduce, since the
    loss term of leaf c is A_c * log p_c and d log p_c / d theta = e_c."""
    theta = logp.clone().requires_grad_(True)
    pi = torch.softmax(theta.view(-1, g), dim=1)
    r = rewards.view(-1, g)
    with torch.no_grad():
        value = (pi * r).sum(1, keepdim=True)
        s = (pi * (r - value.mean()) ** 2).sum(1).mean().sqrt()
    w = weight.view(-1, g) if weight is not None else torch.ones_like(r)
    objective = (w * pi * r).sum() / (s + eps)
    if pin is not None:
        objective = objective + (pi * pin.view(-1, g)).sum()
    (grad,) = torch.autograd.grad(g * objective, theta)
    return grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_are_the_exact_policy_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    g, prompts = 6, 5
    rewards = torch.randint(0, 2, (prompts * g,), generator=gen).float() + 0.5 * torch.rand(prompts * g, generator=gen)
    logp = -3 * torch.rand(prompts * g, generator=gen)  # unnormalised: the leaves do not carry all the mass
    weight = (0.5 + torch.rand(prompts, generator=gen)).repeat_interleave(g)  # one weight a prompt (its gold class)
    pin = torch.randn(prompts * g, generator=gen)
    adv = exact_tree_advantages(rewards, logp, g, weight, pin, eps=1e-4)
    assert torch.allclose(adv, _autograd_reference(rewards, logp, g, weight, pin, 1e-4), atol=1e-5)


def test_vectorised_equals_a_loop():
    gen = torch.Generator().manual_seed(7)
    g, prompts = 3, 4
    rewards, logp = torch.rand(prompts * g, generator=gen), torch.randn(prompts * g, generator=gen)
    pis, values = [], []
    for p in range(prompts):
        z = [math.exp(float(x)) for x in logp[p * g:(p + 1) * g]]
        pi = [x / sum(z) for x in z]
        pis.append(pi)
        values.append(sum(a * float(b) for a, b in zip(pi, rewards[p * g:(p + 1) * g])))
    mean = sum(values) / prompts
    s = math.sqrt(sum(pi[c] * (float(rewards[p * g + c]) - mean) ** 2 for p, pi in enumerate(pis) for c in range(g))
                  / prompts)
    expected = [g * pis[p][c] * (float(rewards[p * g + c]) - values[p]) / (s + 1e-4) for p in range(prompts)
                for c in range(g)]
    assert exact_tree_advantages(rewards, logp, g).tolist() == pytest.approx(expected, abs=1e-5)


def test_zero_sum_per_prompt_and_a_sure_wrong_group_still_learns():
    # prompt 0: the policy is sure of a wrong leaf (a sample would show G equal wrong verdicts: no GRPO gradient)
    logp = torch.tensor([math.log(0.98), math.log(0.01), math.log(0.01), 0.0, 0.0, 0.0])
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    pin = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.5])
    adv = exact_tree_advantages(rewards, logp, 3, pin=pin)
    assert adv.view(2, 3).sum(1).abs().max() < 1e-6  # zero-sum within each prompt
    assert adv[1] > 0 and adv[0] < 0  # the right leaf is pushed up, the sure wrong one down


def test_expected_share_pin_by_hand():
    # two prompts of 3 leaves (classes 0, 1, 2 each); gold 0 and 2. Expected shares: class 0 (0.5 + 0.2) / 2 = 0.35,
    # class 1 (0.3 + 0.3) / 2 = 0.30, class 2 (0.2 + 0.5) / 2 = 0.35; gold shares 0.5, 0, 0.5
    probs = torch.tensor([0.5, 0.3, 0.2, 0.2, 0.3, 0.5])
    pred = torch.tensor([0, 1, 2, 0, 1, 2])
    gold = torch.tensor([0, 0, 0, 2, 2, 2])
    h = expected_share_pin(probs, pred, gold, 3, 3, coef=2.0)
    assert h.tolist() == pytest.approx([0.3, -0.6, 0.3, 0.3, -0.6, 0.3], abs=1e-6)  # -2 * (0.35 - 0.5), -2 * 0.30
    assert expected_share_pin(probs, pred, gold, 3, 3, coef=0.0).abs().sum() == 0


def _inputs(rewards, logp, step_rewards, g, weight=None):
    b = rewards.shape[0]
    return AdvantageInputs(rewards, step_rewards, torch.ones_like(step_rewards, dtype=torch.bool),
                           torch.zeros(b, 4, dtype=torch.long), torch.ones(b, 4), g, outcome_weight=weight,
                           leaf_logp=logp)


def test_srpo_exact_adds_the_step_reward_and_alpha_zero_is_grpo_exact():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    logp = torch.log(torch.tensor([0.4, 0.3, 0.3, 0.1, 0.1, 0.8]))
    steps = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]])
    grpo = compute_advantages("grpo_exact", _inputs(rewards, logp, steps, 3))
    assert torch.equal(compute_advantages("srpo_exact", _inputs(rewards, logp, steps, 3), AdvantageOptions(alpha=0.0)),
                       grpo)
    srpo = compute_advantages("srpo_exact", _inputs(rewards, logp, steps, 3), AdvantageOptions(alpha=0.5))
    expected = exact_tree_advantages(rewards + 0.5 * steps[:, 0], logp, 3)
    assert torch.allclose(srpo, expected[:, None].expand(6, 4))
    assert torch.allclose(grpo, exact_tree_advantages(rewards, logp, 3)[:, None].expand(6, 4))


def test_exact_estimators_need_leaf_probabilities():
    from she.errors import UserError

    x = AdvantageInputs(torch.zeros(2), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool),
                        torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 2)
    with pytest.raises(UserError, match="enumerated"):
        compute_advantages("grpo_exact", x)


def test_teacher_term_by_hand():
    # one prompt, two leaves: pi = (0.75, 0.25), pi_ref = (0.5, 0.5), q = (0.2, 0.8), beta 2:
    # h = log q - 2 (log pi - log pi_ref) = (log 0.2 - 2 log 1.5, log 0.8 - 2 log 0.5)
    h = teacher_leaf_term(torch.tensor([math.log(0.75), math.log(0.25)]), torch.tensor([0.0, 0.0]),
                          torch.tensor([math.log(0.2), math.log(0.8)]), 2, beta=2.0)
    assert h.tolist() == pytest.approx([math.log(0.2) - 2 * math.log(1.5), math.log(0.8) - 2 * math.log(0.5)],
                                       abs=1e-6)
    # unnormalised leaf log-probabilities are renormalised per prompt; a leaf far below the others stays finite
    h2 = teacher_leaf_term(torch.tensor([math.log(0.75) - 3, math.log(0.25) - 3]), torch.tensor([-7.0, -7.0]),
                           torch.tensor([math.log(0.2), math.log(0.8)]), 2, beta=2.0)
    assert h2.tolist() == pytest.approx(h.tolist(), abs=1e-6)
    assert torch.isfinite(teacher_leaf_term(torch.tensor([0.0, -200.0]), torch.zeros(2), torch.zeros(2), 2, 1.0)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_term_as_pin_is_the_gradient_of_the_kl_regularised_objective(seed):
    # advantages with pin = h are G x the gradient of E_pi[log q] - beta KL(pi || pi_ref) (+ the outcome part, 0 here)
    gen = torch.Generator().manual_seed(seed)
    g, prompts, beta = 6, 4, 2.0
    logp = -3 * torch.rand(prompts * g, generator=gen)
    ref = -3 * torch.rand(prompts * g, generator=gen)
    logq = torch.log_softmax(torch.randn(prompts, 3, generator=gen), dim=1)[:, [0, 1, 2, 0, 1, 2]].reshape(-1)
    h = teacher_leaf_term(logp, ref, logq, g, beta)
    adv = exact_tree_advantages(torch.zeros(prompts * g), logp, g, pin=h, eps=1.0)  # zero rewards: pin alone
    theta = logp.clone().requires_grad_(True)
    log_pi = torch.log_softmax(theta.view(-1, g), dim=1)
    log_ref = torch.log_softmax(ref.view(-1, g), dim=1)
    objective = (log_pi.exp() * (logq.view(-1, g) - beta * (log_pi - log_ref))).sum()
    (grad,) = torch.autograd.grad(g * objective, theta)
    assert adv.tolist() == pytest.approx(grad.tolist(), abs=1e-5)


def test_teacher_term_vanishes_at_its_fixed_point_and_bad_input():
    # pi = pi_ref * q^(1/beta) (renormalised) is the maximiser: there h is constant within the prompt, so the centred
    # term, and the advantages it gives, are 0
    ref = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    logq = torch.log(torch.tensor([0.1, 0.3, 0.6]))
    beta = 2.0
    star = torch.log_softmax(ref + logq / beta, dim=0)
    h = teacher_leaf_term(star, ref, logq, 3, beta)
    assert (h - h.mean()).abs().max() < 1e-6
    assert exact_tree_advantages(torch.zeros(3), star, 3, pin=h, eps=1.0).abs().max() < 1e-6
    with pytest.raises(ValueError, match="must all be"):
        teacher_leaf_term(torch.zeros(3), torch.zeros(2), torch.zeros(3), 3, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        teacher_leaf_term(torch.zeros(3), torch.zeros(3), torch.tensor([0.0, -math.inf, 0.0]), 3, 1.0)
    with pytest.raises(Exception, match="teacher_beta"):
        teacher_leaf_term(torch.zeros(3), torch.zeros(3), torch.zeros(3), 3, 0.0)
