"""Tests for she.algorithms.advantages.

Structure (as verl tests its core_algos): a plain Python-loop reference implementation of every function,
written straight from the formulas in the module docstring; vectorised == loop on random shapes and seeds;
then small hand-computed tensors with the arithmetic in comments; then edge cases and bad input.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from she.algorithms.advantages import (
    critical_step_weights,
    group_normalize,
    normalize_step_rewards,
    pad_step_rewards,
    srpo_advantages,
    step_advantages,
)

# ---------------------------------------------------------------- loop references


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _norm(x: float, xs: list[float], eps: float, scale: bool) -> float:
    if max(xs) == min(xs):
        return 0.0
    m, sd = _mean_std(xs)
    return (x - m) / (sd + eps) if scale else x - m


def ref_group_normalize(rewards, g, eps=1e-4, scale=True):
    out = []
    for i, r in enumerate(rewards):
        grp = rewards[(i // g) * g : (i // g + 1) * g]
        out.append(_norm(r, grp, eps, scale))
    return out


def ref_normalize_step_rewards(step_rewards, step_mask, g, eps=1e-4, scale=True):
    b, s = len(step_rewards), len(step_rewards[0])
    out = [[0.0] * s for _ in range(b)]
    for i in range(b):
        lo = (i // g) * g
        pool = [step_rewards[j][k] for j in range(lo, lo + g) for k in range(s) if step_mask[j][k]]
        for k in range(s):
            if step_mask[i][k]:
                out[i][k] = _norm(step_rewards[i][k], pool, eps, scale)
    return out


def ref_step_advantages(q, step_mask, token_step, mode):
    out = []
    for i, row in enumerate(token_step):
        res = []
        for st in row:
            if st < 0:
                res.append(0.0)
                continue
            future = [q[i][k] for k in range(len(q[i])) if step_mask[i][k] and k >= st]
            res.append({"broadcast": q[i][st], "cumsum": sum(future), "min": min(future)}[mode])
        out.append(res)
    return out


def ref_critical_step_weights(raw, step_mask, outcome_correct, norm, few=2.0, ccw=1.5, thr=0.5, below=0.5):
    out = []
    for i in range(len(raw)):
        w, seen_error = [], False
        for k in range(len(raw[i])):
            if not step_mask[i][k]:
                w.append(1.0)
            elif raw[i][k] < below:
                w.append(few if (not seen_error and not outcome_correct[i]) else 1.0)
                seen_error = True
            else:
                w.append(ccw if norm[i][k] > thr else 1.0)
        out.append(w)
    return out


def ref_srpo(outcome, step_rewards, step_mask, token_step, cmask, g, alpha, mode, critical, eps=1e-4, scale=True):
    out_adv = ref_group_normalize(outcome, g, eps, scale)
    q = ref_normalize_step_rewards(step_rewards, step_mask, g, eps, scale)
    if critical is not None:
        correct = [r >= critical.get("outcome_correct_at", 1.0) for r in outcome]
        w = ref_critical_step_weights(
            step_rewards, step_mask, correct, q,
            critical.get("first_error_weight", 2.0), critical.get("confident_correct_weight", 1.5),
            critical.get("threshold", 0.5), critical.get("incorrect_below", 0.5),
        )  # fmt: skip
        q = [[a * b for a, b in zip(qr, wr)] for qr, wr in zip(q, w)]
    sa = ref_step_advantages(q, step_mask, token_step, mode)
    return [[(out_adv[i] + alpha * sa[i][t]) * cmask[i][t] for t in range(len(cmask[i]))] for i in range(len(cmask))]


# ---------------------------------------------------------------- random batches


def random_batch(seed: int):
    """A batch like the trainer builds: contiguous groups, ragged steps, separators, label, right padding."""
    rng = random.Random(seed)
    g = rng.choice([1, 2, 3, 4])
    b = g * rng.randint(1, 4)
    s = rng.randint(1, 5)
    # discrete rewards make equal-reward groups (the edge case) common; sometimes continuous ones
    discrete = rng.random() < 0.5
    outcome = [rng.choice([0.0, 0.5, 1.0]) if discrete else rng.random() for _ in range(b)]
    steps, tok_rows, mask_rows = [], [], []
    for _ in range(b):
        n_steps = rng.randint(0, s)  # some rollouts have no valid step at all
        steps.append([float(rng.choice([0, 1])) if discrete else rng.random() for _ in range(n_steps)])
        toks = []
        for k in range(n_steps):
            toks += [k] * rng.randint(1, 4)  # single-token steps included
            toks += [-1] * rng.randint(0, 1)  # newline separator outside any step
        toks += [-1] * rng.randint(1, 3)  # the label
        tok_rows.append(toks)
    t = max(map(len, tok_rows)) + rng.randint(0, 2)
    token_step = torch.full((b, t), -1, dtype=torch.long)
    cmask = torch.zeros(b, t, dtype=torch.bool)
    for i, toks in enumerate(tok_rows):
        token_step[i, : len(toks)] = torch.tensor(toks)
        cmask[i, : len(toks)] = True
    sr, sm = pad_step_rewards(steps)
    step_rewards = torch.full((b, s), float("nan"))  # padding holds garbage on purpose
    step_mask = torch.zeros(b, s, dtype=torch.bool)
    step_rewards[:, : sr.shape[1]] = torch.where(sm, sr, torch.tensor(float("nan")))
    step_mask[:, : sm.shape[1]] = sm
    return torch.tensor(outcome), step_rewards, step_mask, token_step, cmask, g


def _close(a: torch.Tensor, b: list, tol: float = 1e-4) -> None:
    assert not torch.isnan(a).any()
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype).reshape(a.shape), atol=tol, rtol=tol)


SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_normalize_matches_loop(seed):
    outcome, *_, g = random_batch(seed)
    for scale in (True, False):
        _close(group_normalize(outcome, g, scale=scale), ref_group_normalize(outcome.tolist(), g, scale=scale))


@pytest.mark.parametrize("seed", SEEDS)
def test_normalize_step_rewards_matches_loop(seed):
    _, sr, sm, _, _, g = random_batch(seed)
    for scale in (True, False):
        got = normalize_step_rewards(sr, sm, g, scale=scale)
        _close(got, ref_normalize_step_rewards(sr.tolist(), sm.tolist(), g, scale=scale))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["broadcast", "cumsum", "min"])
def test_step_advantages_matches_loop(seed, mode):
    _, sr, sm, ts, _, g = random_batch(seed)
    q = normalize_step_rewards(sr, sm, g)
    _close(step_advantages(q, sm, ts, mode), ref_step_advantages(q.tolist(), sm.tolist(), ts.tolist(), mode))


@pytest.mark.parametrize("seed", SEEDS)
def test_critical_weights_match_loop(seed):
    outcome, sr, sm, _, _, g = random_batch(seed)
    q = normalize_step_rewards(sr, sm, g)
    correct = outcome >= 1.0
    got = critical_step_weights(sr, sm, correct, norm_step_rewards=q, threshold=0.3)
    want = ref_critical_step_weights(sr.tolist(), sm.tolist(), correct.tolist(), q.tolist(), thr=0.3)
    _close(got, want, tol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["broadcast", "cumsum", "min"])
def test_srpo_matches_loop(seed, mode):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    crit = None if seed % 2 else {"first_error_weight": 3.0, "threshold": 0.2, "outcome_correct_at": 0.5}
    got = srpo_advantages(outcome, sr, sm, ts, cm, g, alpha=0.7, mode=mode, critical=crit)
    want = ref_srpo(outcome.tolist(), sr.tolist(), sm.tolist(), ts.tolist(), cm.tolist(), g, 0.7, mode, crit)
    _close(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_zero_is_exactly_grpo(seed):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    grpo = group_normalize(outcome, g)[:, None] * cm.float()
    got = srpo_advantages(outcome, sr, sm, ts, cm, g, alpha=0.0, mode="cumsum", critical={"threshold": 0.0})
    assert torch.equal(got, grpo)
    # and the step part really matters when alpha != 0 (whenever some step reward varies in a group)
    q = normalize_step_rewards(sr, sm, g)
    if (q != 0).any() and ((ts >= 0) & cm).any():
        assert not torch.equal(srpo_advantages(outcome, sr, sm, ts, cm, g, alpha=1.0), grpo)


# ---------------------------------------------------------------- hand-computed examples


def test_group_normalize_hand():
    # Group [1, 0, 0, 1]: mean 0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #   -> +-0.5 / (0.5773503 + 1e-4) = +-0.8658756
    # Group [2, 4, 6, 4]... use G = 4 for both: [2, 4, 6, 4]: mean 4, var = (4 + 0 + 4 + 0) / 3 = 8/3,
    #   std = 1.6329932 -> [-2, 0, 2, 0] / 1.6330932 = [-1.2246524, 0, 1.2246524, 0]
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 4.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    c = 2 / (math.sqrt(8 / 3) + 1e-4)
    _close(group_normalize(r, 4), [a, -a, -a, a, -c, 0, c, 0], tol=1e-6)
    # Dr. GRPO (no std): just r - mean
    _close(group_normalize(r, 4, scale=False), [0.5, -0.5, -0.5, 0.5, -2, 0, 2, 0], tol=0)


def test_all_equal_group_is_exactly_zero_even_with_eps_zero():
    # 0.1 * 3 / 3 != 0.1 in floats; a naive (r - mean) / std would give noise / noise (or 0/0 = NaN).
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    out = group_normalize(r, 3, eps=0.0)
    assert torch.equal(out[:6], torch.zeros(6))
    assert not torch.isnan(out).any()
    # G = 1: every group is constant -> no signal, no NaN
    assert torch.equal(group_normalize(torch.tensor([0.0, 1.0]), 1, eps=0.0), torch.zeros(2))


def test_normalize_step_rewards_hand():
    # G = 2. rollout 0 steps [0, 4], rollout 1 steps [2] (+ padding). Group pool {0, 4, 2}:
    #   mean 2, unbiased var = (4 + 4 + 0) / 2 = 4, std 2 -> [-1, 1], [0]; padding -> 0 (even if NaN).
    sr = torch.tensor([[0.0, 4.0], [2.0, float("nan")]])
    sm = torch.tensor([[True, True], [True, False]])
    _close(normalize_step_rewards(sr, sm, 2, eps=0.0), [[-1.0, 1.0], [0.0, 0.0]], tol=0)


def test_step_advantages_hand_three_modes():
    # rollout 0: q = [0.5, -1.0, 2.0], tokens -> steps [0, 0, 1, -1, 2, 2, -1]
    #   broadcast: [0.5, 0.5, -1, 0, 2, 2, 0]
    #   cumsum (suffix sums): s0 = 0.5 - 1 + 2 = 1.5, s1 = -1 + 2 = 1, s2 = 2 -> [1.5, 1.5, 1, 0, 2, 2, 0]
    #   min (suffix minima):  s0 = min(0.5, -1, 2) = -1, s1 = -1, s2 = 2   -> [-1, -1, -1, 0, 2, 2, 0]
    # rollout 1: one valid step q = [-0.3] (others padding), a single-token step then label/padding
    #   every mode: [-0.3, 0, 0, ...]
    # rollout 2: no valid steps, every token -1 -> all zeros
    q = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 9.0, 9.0], [9.0, 9.0, 9.0]])
    sm = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    ts = torch.tensor([[0, 0, 1, -1, 2, 2, -1], [0, -1, -1, -1, -1, -1, -1], [-1] * 7])
    tail = [[-0.3, 0, 0, 0, 0, 0, 0], [0.0] * 7]
    _close(step_advantages(q, sm, ts, "broadcast"), [[0.5, 0.5, -1, 0, 2, 2, 0]] + tail, tol=1e-6)
    _close(step_advantages(q, sm, ts, "cumsum"), [[1.5, 1.5, 1, 0, 2, 2, 0]] + tail, tol=1e-6)
    _close(step_advantages(q, sm, ts, "min"), [[-1, -1, -1, 0, 2, 2, 0]] + tail, tol=1e-6)


def test_critical_weights_hand():
    # r0: raw [1, 0, 0], outcome wrong; norm [0.8, -1, -1]
    #     s0 correct & 0.8 > 0.5 -> 1.5; s1 first error of a wrong rollout -> 2; s2 later error -> 1
    # r1: raw [0, 1, 0], outcome right -> errors not emphasised; s1 correct but norm 0.3 <= 0.5 -> 1
    # r2: raw [1, 1, pad], outcome wrong, no error; norm [0.6, 0.5, .] -> [1.5, 1 (0.5 not > 0.5), 1 (pad)]
    # r3: raw [0.2, pad, pad], outcome wrong -> s0 first error -> 2; padding stays 1 even with norm 5
    raw = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0.9], [0.2, 0.9, 0.9]])
    sm = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    norm = torch.tensor([[0.8, -1, -1], [-1, 0.3, -1], [0.6, 0.5, 5], [-0.5, 5, 5]])
    correct = torch.tensor([False, True, False, False])
    w = critical_step_weights(raw, sm, correct, norm_step_rewards=norm)
    _close(w, [[1.5, 2, 1], [1, 1, 1], [1.5, 1, 1], [2, 1, 1]], tol=0)


def test_srpo_hand():
    # One prompt, G = 2, scale=False so the arithmetic stays readable.
    # outcome [1, 0] -> A_out = [0.5, -0.5]
    # steps r0 [1, 1], r1 [1, 0]; pool {1, 1, 1, 0}, mean 0.75 -> q r0 [0.25, 0.25], r1 [0.25, -0.75]
    # tokens r0 -> steps [0, 0, 1, -1(label), -1(pad)], completion mask [1, 1, 1, 1, 0]
    #        r1 -> steps [0, 1, 1, -1, -1],            completion mask [1, 1, 1, 1, 1]
    # alpha 0.5, broadcast:
    #   r0: [0.5 + 0.125, 0.625, 0.625, 0.5, 0 (padding)]
    #   r1: [-0.5 + 0.125 = -0.375, -0.5 - 0.375 = -0.875, -0.875, -0.5, -0.5]
    outcome = torch.tensor([1.0, 0.0])
    sr = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    sm = torch.ones(2, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 0, 1, -1, -1], [0, 1, 1, -1, -1]])
    cm = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = srpo_advantages(outcome, sr, sm, ts, cm, 2, alpha=0.5, scale=False)
    _close(got, [[0.625, 0.625, 0.625, 0.5, 0], [-0.375, -0.875, -0.875, -0.5, -0.5]], tol=1e-6)
    # With critical steps (threshold 0.2; r0 correct, r1 wrong since 0 < outcome_correct_at = 1):
    #   r0 s0, s1 correct, q 0.25 > 0.2 -> x1.5 -> 0.375 each
    #   r1 s0 correct 0.25 > 0.2 -> 0.375 ; s1 first error of a wrong rollout -> x2 -> -1.5
    #   r0: 0.5 + 0.5 * 0.375 = 0.6875 on step tokens, 0.5 on label, 0 on padding
    #   r1: -0.5 + 0.1875 = -0.3125 ; -0.5 + 0.5 * (-1.5) = -1.25 ; label -0.5
    got = srpo_advantages(outcome, sr, sm, ts, cm, 2, alpha=0.5, scale=False, critical={"threshold": 0.2})
    _close(got, [[0.6875, 0.6875, 0.6875, 0.5, 0], [-0.3125, -1.25, -1.25, -0.5, -0.5]], tol=1e-6)
    # cumsum moves the blame of r1's error onto its first step: s0 value = 0.25 - 0.75 = -0.5
    #   r1: [-0.5 + 0.5 * -0.5 = -0.75, -0.875, -0.875, -0.5, -0.5]; r0 s0 = 0.5 -> 0.75
    got = srpo_advantages(outcome, sr, sm, ts, cm, 2, alpha=0.5, scale=False, mode="cumsum")
    _close(got, [[0.75, 0.75, 0.625, 0.5, 0], [-0.75, -0.875, -0.875, -0.5, -0.5]], tol=1e-6)


def test_equal_step_rewards_give_zero_step_advantage():
    # every step of the group rewarded 1 -> no step signal; outcome part unchanged
    outcome = torch.tensor([1.0, 0.0])
    sr = torch.ones(2, 2)
    sm = torch.ones(2, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 1, -1], [0, 1, -1]])
    cm = torch.ones(2, 3)
    got = srpo_advantages(outcome, sr, sm, ts, cm, 2, alpha=1.0, mode="min", eps=0.0)
    assert torch.equal(got, group_normalize(outcome, 2, eps=0.0)[:, None].expand(2, 3))


def test_no_steps_anywhere_in_batch():
    outcome = torch.tensor([1.0, 0.0])
    empty = torch.zeros(2, 0)
    ts = torch.full((2, 3), -1)
    cm = torch.ones(2, 3)
    got = srpo_advantages(outcome, empty, empty.bool(), ts, cm, 2, alpha=1.0, mode="min")
    assert torch.equal(got, group_normalize(outcome, 2)[:, None].expand(2, 3))


def test_pad_step_rewards():
    v, m = pad_step_rewards([[0.5, 1.0], [], [0.25]])
    assert v.tolist() == [[0.5, 1.0], [0.0, 0.0], [0.25, 0.0]]
    assert m.tolist() == [[True, True], [False, False], [True, False]]


# ---------------------------------------------------------------- bad input


def test_batch_not_multiple_of_group_size():
    with pytest.raises(ValueError, match="batch size 3, which is not a multiple of group_size=2"):
        group_normalize(torch.zeros(3), 2)


def test_token_pointing_at_missing_step_is_an_error():
    q = torch.zeros(1, 2)
    sm = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match=r"token_step\[0, 1\] = 1 points at no valid step"):
        step_advantages(q, sm, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"token_step\[0, 0\] = 5"):
        step_advantages(q, sm, torch.tensor([[5, 0]]))
    with pytest.raises(ValueError, match="integer"):
        step_advantages(q, sm, torch.tensor([[0.0, 0.0]]))


def test_bad_mode_and_nonfinite_rewards():
    with pytest.raises(ValueError, match="mode must be one of"):
        one = torch.ones(1, 1, dtype=torch.bool)
        step_advantages(torch.zeros(1, 1), one, torch.zeros(1, 1, dtype=torch.long), "sum")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        group_normalize(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"step_rewards\[0, 1\] = nan is not finite"):
        normalize_step_rewards(torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="unknown keys in critical"):
        srpo_advantages(
            torch.zeros(2), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.long),
            torch.ones(2, 1), 2, critical={"first_eror_weight": 2.0},
        )  # fmt: skip


# ================================================================ issue 10: per-type normalisation, gated estimators

from she.algorithms.advantages import (  # noqa: E402
    ESTIMATORS,
    EXACT_ESTIMATORS,
    AdvantageInputs,
    AdvantageOptions,
    compute_advantages,
    gated_step_advantages,
    outcome_advantage,
    step_flaws,
)


def ref_gated(outcome_adv, correct, step_rewards, step_mask, token_step, cmask, alpha, few, rho, tau, min_form):
    """Loop reference of section 5 of the module docstring."""
    out = []
    for i in range(len(cmask)):
        flaws = [max(0.0, min(1.0, (tau - q) / tau)) if m else 0.0 for q, m in zip(step_rewards[i], step_mask[i])]
        pens, seen = [], False
        for f in flaws:
            w = few if (f > 0 and not seen) else 1.0
            seen = seen or f > 0
            pens.append(w * f)
        if min_form:
            pens = [max(pens[s:]) if step_mask[i][s] else 0.0 for s in range(len(pens))]
        row = []
        for t in range(len(cmask[i])):
            s = token_step[i][t]
            f, p = (flaws[s], pens[s]) if s >= 0 else (0.0, 0.0)
            a = outcome_adv[i] * (1 - (1 - rho) * f) if correct[i] else min(outcome_adv[i], 0.0)
            row.append((a - alpha * p) * cmask[i][t] if alpha else outcome_adv[i] * cmask[i][t])
        out.append(row)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_form", [False, True])
def test_gated_matches_loop(seed, min_form):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    rng = random.Random(seed)
    correct = torch.tensor([rng.random() < 0.5 for _ in range(len(outcome))])
    adv = group_normalize(outcome, g)
    clean = torch.where(sm, sr, torch.zeros_like(sr))
    for alpha, few, rho in ((0.7, 2.0, 0.5), (1.0, 1.0, 0.0), (0.0, 2.0, 0.5)):
        got = gated_step_advantages(adv, correct, sr, sm, ts, cm, alpha=alpha, first_error_weight=few,
                                    flawed_share=rho, min_form=min_form)
        want = ref_gated(adv.tolist(), correct.tolist(), clean.tolist(), sm.tolist(), ts.tolist(), cm.float().tolist(),
                         alpha, few, rho, 0.5, min_form)
        _close(got, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["srpo_gated", "srpo_gated_min", "srpo_gated_balanced"])
def test_gated_properties(seed, name):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    outcome = (outcome >= 0.5).float()  # binary outcome: right label = 1
    x = AdvantageInputs(outcome, sr, sm, ts, cm, g)
    adv = compute_advantages(name, x, AdvantageOptions(alpha=1.0))
    wrong = outcome < 1
    # 1. no token of a wrong-verdict rollout gets a positive advantage
    assert (adv[wrong] <= 0).all()
    # 2. alpha = 0 is GRPO exactly
    assert torch.equal(compute_advantages(name, x, AdvantageOptions(alpha=0.0)), compute_advantages("grpo", x))
    # 3. an all-wrong group with a flagged step has non-zero advantages on that step's tokens
    flaw = step_flaws(sr, sm)
    for p in range(len(outcome) // g):
        rows = range(p * g, (p + 1) * g)
        if all(wrong[i] for i in rows):
            for i in rows:
                for t in range(ts.shape[1]):
                    s = int(ts[i, t])
                    if s >= 0 and flaw[i, s] > 0 and cm[i, t]:
                        assert adv[i, t] < 0


def test_gated_hand():
    # One prompt, G = 2, scale=False: outcome [1, 0] -> A_out [0.5, -0.5].
    # r0 (right): steps q [1, 0.25]: flaws [0, 0.5]; first flagged step s1 -> pen 2 * 0.5 = 1.0
    #   tokens [s0, s1, label]: s0 0.5 ; s1 0.5 * (1 - 0.5 * 0.5) - 1.0 * 1.0 = 0.375 - 1 = -0.625 ; label 0.5
    # r1 (wrong): steps q [0, 0]: flaws [1, 1], pens [2, 1]
    #   tokens [s0, s1, label]: -0.5 - 2 = -2.5 ; -0.5 - 1 = -1.5 ; label -0.5
    adv = torch.tensor([0.5, -0.5])
    sr = torch.tensor([[1.0, 0.25], [0.0, 0.0]])
    sm = torch.ones(2, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 1, -1], [0, 1, -1]])
    cm = torch.ones(2, 3)
    got = gated_step_advantages(adv, torch.tensor([True, False]), sr, sm, ts, cm, alpha=1.0)
    _close(got, [[0.5, -0.625, 0.5], [-2.5, -1.5, -0.5]], tol=1e-6)
    # min-form: r1 s0 answers for max(2, 1) = 2, s1 for 1 (unchanged); r0 s0 for max(0, 1) = 1 -> 0.5 - 1 = -0.5
    got = gated_step_advantages(adv, torch.tensor([True, False]), sr, sm, ts, cm, alpha=1.0, min_form=True)
    _close(got, [[-0.5, -0.625, 0.5], [-2.5, -1.5, -0.5]], tol=1e-6)


def test_all_wrong_group_learns_only_through_flagged_steps():
    # G = 4, every verdict wrong: GRPO's advantage is 0 everywhere; the gated estimator pushes down only the
    # tokens of the flagged step (r2's step 1), nothing else.
    outcome = torch.zeros(4)
    sr = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    sm = torch.ones(4, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 1, -1]] * 4)
    cm = torch.ones(4, 3)
    x = AdvantageInputs(outcome, sr, sm, ts, cm, 4)
    assert torch.equal(compute_advantages("grpo", x), torch.zeros(4, 3))
    got = compute_advantages("srpo_gated", x, AdvantageOptions(alpha=0.5))
    want = torch.zeros(4, 3)
    want[2, 1] = -0.5 * 2.0  # alpha * first_error_weight * flaw 1
    assert torch.equal(got, want)


# -- srpo_gated_balanced (section 7): the gated penalties paid back per group and step type

from she.algorithms.advantages import balancing_bonus, step_penalties  # noqa: E402


def ref_bonus(pen, flaw, step_mask, correct, g, step_type):
    """Loop reference of balancing_bonus."""
    b, s = len(pen), len(pen[0]) if pen else 0
    out = [[0.0] * s for _ in range(b)]
    for p in range(b // g):
        rows = range(p * g, (p + 1) * g)
        kinds = {step_type[i][j] for i in rows for j in range(s) if step_mask[i][j]}
        for k in kinds:
            total = sum(pen[i][j] for i in rows for j in range(s) if step_mask[i][j] and step_type[i][j] == k)
            elig = [(i, j) for i in rows for j in range(s)
                    if step_mask[i][j] and step_type[i][j] == k and correct[i] and flaw[i][j] == 0]
            for i, j in elig:
                out[i][j] = total / len(elig)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_balancing_bonus_matches_loop_and_is_zero_sum(seed):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    rng = random.Random(seed)
    correct = torch.tensor([rng.random() < 0.5 for _ in range(len(outcome))])
    stype = torch.tensor([[rng.randrange(3) for _ in range(sr.shape[1])] for _ in range(sr.shape[0])])
    flaw, pen = step_penalties(sr, sm)
    got = balancing_bonus(pen, flaw, sm, correct, g, stype)
    _close(got, ref_bonus(pen.tolist(), flaw.tolist(), sm.tolist(), correct.tolist(), g, stype.tolist()))
    assert (got >= 0).all() and (got[~correct] == 0).all()  # never positive credit in a wrong-verdict rollout
    for p in range(len(outcome) // g):  # zero-sum wherever an eligible step exists
        rows = slice(p * g, (p + 1) * g)
        for k in range(3):
            of_k = sm[rows] & (stype[rows] == k)
            if (of_k & (flaw[rows] == 0) & correct[rows][:, None]).any():
                assert abs(float(got[rows][of_k].sum() - pen[rows][of_k].sum())) < 1e-5


def test_balanced_hand():
    # One prompt, G = 2, scale=False, one step type: outcome [1, 0] -> A_out [0.5, -0.5].
    # r0 (right): steps q [1, 0.25]; r1 (wrong): q [0, 0]. pens: r0 [0, 1.0], r1 [2, 1] -> P = 4.
    # Eligible (unflagged, right verdict): r0 s0 only -> bonus 4 on it.
    #   r0 tokens [s0, s1, label]: 0.5 + 4 = 4.5 ; -0.625 (as srpo_gated) ; 0.5 ; r1 as srpo_gated.
    sr = torch.tensor([[1.0, 0.25], [0.0, 0.0]])
    sm = torch.ones(2, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 1, -1], [0, 1, -1]])
    cm = torch.ones(2, 3)
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), sr, sm, ts, cm, 2)
    got = compute_advantages("srpo_gated_balanced", x, AdvantageOptions(alpha=1.0, scale=False))
    _close(got, [[4.5, -0.625, 0.5], [-2.5, -1.5, -0.5]], tol=1e-6)
    # two step types (s0: type 0, s1: type 1): type 0 P = 2 -> r0 s0 +2; type 1 P = 2 has no eligible step
    x2 = AdvantageInputs(torch.tensor([1.0, 0.0]), sr, sm, ts, cm, 2, step_type=torch.tensor([[0, 1], [0, 1]]))
    got = compute_advantages("srpo_gated_balanced", x2, AdvantageOptions(alpha=1.0, scale=False))
    _close(got, [[2.5, -0.625, 0.5], [-2.5, -1.5, -0.5]], tol=1e-6)
    # alpha = 0 is GRPO
    assert torch.equal(compute_advantages("srpo_gated_balanced", x, AdvantageOptions(alpha=0.0)),
                       compute_advantages("grpo", x))


def test_per_type_normalisation_gives_zero_to_a_step_every_rollout_gets_right():
    # Issue 10 B: four rollouts all say Type `same` (right: 1), Missing right in 2 of 4.
    # Pooled: pool {1,1,1,1,1,0,1,0} -> mean 0.75 -> every Type step gets +0.25 / std > 0.
    # Per type: the Type pool {1,1,1,1} is constant -> 0; Missing pool {1,0,1,0} -> +-1/(std) .
    sr = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # [Type, Missing]
    sm = torch.ones(4, 2, dtype=torch.bool)
    types = torch.tensor([[0, 1]] * 4)
    pooled = normalize_step_rewards(sr, sm, 4)
    assert (pooled[:, 0] > 0.4).all()  # the farmable part: a step everyone gets right is paid
    per_type = normalize_step_rewards(sr, sm, 4, step_type=types)
    assert torch.equal(per_type[:, 0], torch.zeros(4))
    sd = math.sqrt(4 * 0.25 / 3)
    _close(per_type[:, 1], [0.5 / (sd + 1e-4), -0.5 / (sd + 1e-4)] * 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_per_type_normalisation_matches_loop(seed):
    _, sr, sm, _, _, g = random_batch(seed)
    rng = random.Random(seed)
    types = torch.tensor([[rng.randint(0, 2) for _ in range(sr.shape[1])] for _ in range(sr.shape[0])])
    got = normalize_step_rewards(sr, sm, g, step_type=types)
    want = torch.zeros_like(got)
    for k in range(3):
        part = torch.tensor(ref_normalize_step_rewards(sr.tolist(), (sm & (types == k)).tolist(), g))
        want = want + part
    _close(got, want.tolist())


def test_class_weights_apply_after_normalisation():
    # two prompts of G = 2; weights by gold class 2.0 (prompt 0) and 0.5 (prompt 1)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([2.0, 2.0, 0.5, 0.5])
    base = group_normalize(r, 2)
    assert torch.equal(outcome_advantage(r, 2, w), base * w)
    # the same weights applied to the rewards before normalising would cancel: that is why they come after
    assert torch.allclose(group_normalize(r * w, 2), base, atol=1e-3)
    with pytest.raises(ValueError, match="outcome_weight"):
        outcome_advantage(r, 2, torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_registry_names_and_unknown():
    assert {"grpo", "srpo_centered", "srpo_centered_pooled", "srpo_gated", "srpo_gated_min", "srpo_gated_balanced",
            "srpo_decoupled"} <= set(ESTIMATORS)
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool),
                        torch.full((2, 2), -1), torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", x)
    for name in set(ESTIMATORS) - set(EXACT_ESTIMATORS):  # no steps anywhere: every estimator over sampled
        # rollouts is the outcome advantage (the exact ones weigh enumerated leaves: tests/test_exact_advantages.py)
        xn = dataclasses.replace(x, step_gold_prob=torch.zeros(2, 0)) if name == "srpo_likelihood" else x
        assert torch.equal(compute_advantages(name, xn), compute_advantages("grpo", x)), name


# -- srpo_decoupled (section 8): step tokens by their step only, every other token by the outcome only

from she.algorithms.advantages import decoupled_advantages  # noqa: E402


def ref_decoupled(outcome_adv, step_rewards, step_mask, step_type, token_step, cmask, g, alpha, scale):
    """Loop reference of section 8: per-type centred step reward on step tokens, outcome elsewhere."""
    b, s = len(step_rewards), len(step_rewards[0])
    q = [[0.0] * s for _ in range(b)]
    for i in range(b):
        lo = (i // g) * g
        for k in range(s):
            if step_mask[i][k]:
                pool = [step_rewards[j][m] for j in range(lo, lo + g) for m in range(s)
                        if step_mask[j][m] and step_type[j][m] == step_type[i][k]]
                q[i][k] = _norm(step_rewards[i][k], pool, 1e-4, scale)
    return [[(alpha * q[i][st] if st >= 0 else outcome_adv[i]) * cmask[i][t] for t, st in enumerate(token_step[i])]
            for i in range(b)]


@pytest.mark.parametrize("seed", SEEDS)
def test_decoupled_matches_loop(seed):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    rng = random.Random(seed)
    types = torch.tensor([[rng.randrange(3) for _ in range(sr.shape[1])] for _ in range(sr.shape[0])])
    clean = torch.where(sm, sr, torch.zeros_like(sr))
    for alpha, scale in ((1.0, True), (0.5, False), (0.0, True)):
        adv = group_normalize(outcome, g, scale=scale)
        got = decoupled_advantages(adv, sr, sm, ts, cm, g, alpha=alpha, scale=scale, step_type=types)
        want = ref_decoupled(adv.tolist(), clean.tolist(), sm.tolist(), types.tolist(), ts.tolist(),
                             cm.float().tolist(), g, alpha, scale)
        _close(got, want)


def test_decoupled_hand():
    # One prompt, G = 2, scale=False: outcome [1, 0] -> A_out [0.5, -0.5].
    # steps q: r0 [1, 0.25], r1 [0, 0]; s0 is type 0, s1 type 1.
    #   type 0 pool {1, 0}: mean 0.5 -> r0 +0.5, r1 -0.5 ; type 1 pool {0.25, 0}: mean 0.125 -> +0.125, -0.125
    # tokens [s0, s1, label], alpha 2: r0 [1.0, 0.25, 0.5] ; r1 [-1.0, -0.25, -0.5]
    # (the wrong-verdict r1 keeps no outcome term on its steps; a right step there would be paid)
    sr = torch.tensor([[1.0, 0.25], [0.0, 0.0]])
    sm = torch.ones(2, 2, dtype=torch.bool)
    ts = torch.tensor([[0, 1, -1], [0, 1, -1]])
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), sr, sm, ts, torch.ones(2, 3), 2,
                        step_type=torch.tensor([[0, 1], [0, 1]]))
    got = compute_advantages("srpo_decoupled", x, AdvantageOptions(alpha=2.0, scale=False))
    _close(got, [[1.0, 0.25, 0.5], [-1.0, -0.25, -0.5]], tol=1e-6)
    # a wrong verdict after a right step: the step is paid, the verdict pushed down
    sr2 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    x2 = AdvantageInputs(torch.tensor([1.0, 0.0]), sr2, sm, ts, torch.ones(2, 3), 2,
                         step_type=torch.tensor([[0, 1], [0, 1]]))
    got = compute_advantages("srpo_decoupled", x2, AdvantageOptions(alpha=1.0, scale=False))
    _close(got, [[-0.5, 0.0, 0.5], [0.5, 0.0, -0.5]], tol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_decoupled_properties(seed):
    outcome, sr, sm, ts, cm, g = random_batch(seed)
    rng = random.Random(seed)
    types = torch.tensor([[rng.randrange(3) for _ in range(sr.shape[1])] for _ in range(sr.shape[0])])
    x = AdvantageInputs(outcome, sr, sm, ts, cm, g, step_type=types)
    adv = compute_advantages("srpo_decoupled", x, AdvantageOptions(alpha=1.0, scale=False))
    grpo = compute_advantages("grpo", x, AdvantageOptions(scale=False))
    off = ts < 0
    # 1. every token outside a scored step carries GRPO's advantage exactly
    assert torch.equal(adv[off], grpo[off])
    # 2. step tokens do not depend on the outcome at all
    flipped = AdvantageInputs(1.0 - outcome, sr, sm, ts, cm, g, step_type=types)
    again = compute_advantages("srpo_decoupled", flipped, AdvantageOptions(alpha=1.0, scale=False))
    assert torch.equal(adv[~off], again[~off])
    # 3. the step term is zero-sum per group and step type (one value per step, read off its first token)
    value = torch.zeros(sr.shape)
    for i in range(ts.shape[0]):
        for t in range(ts.shape[1]):
            if ts[i, t] >= 0 and cm[i, t]:
                value[i, ts[i, t]] = adv[i, t]
    for p in range(len(outcome) // g):
        rows = slice(p * g, (p + 1) * g)
        for k in range(3):
            of_k = sm[rows] & (types[rows] == k)
            assert abs(float(value[rows][of_k].sum())) < 1e-5


# -- the share pin (section 10): verdict classes paid by their share gap, centred in the group

from she.algorithms.advantages import share_pin_shift  # noqa: E402
from she.errors import UserError  # noqa: E402


def ref_share_pin(pred: list[int], gold: list[int], k: int, g: int, coef: float) -> list[float]:
    """Loop reference of section 10."""
    n = len(pred)
    gap = [(sum(p == c for p in pred) - sum(y == c for y in gold)) / n for c in range(k)]
    raw = [-coef * gap[p] if p >= 0 else 0.0 for p in pred]
    out = []
    for i in range(n):
        grp = range(i // g * g, i // g * g + g)
        lab = [j for j in grp if pred[j] >= 0]
        out.append(raw[i] - sum(raw[j] for j in lab) / len(lab) if pred[i] >= 0 else 0.0)
    return out


def test_share_pin_by_hand():
    # two prompts of G = 4, classes 0 Exact, 1 Partial, 2 Irrelevant; gold: prompt 0 Partial, prompt 1 Exact
    pred = torch.tensor([0, 0, 1, 0, 0, 0, 2, -1])
    gold = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    # shares of 8: pred Exact 5, Partial 1, Irrelevant 1 (one no-label); gold Exact 4, Partial 4, Irrelevant 0
    # gap: Exact +1/8, Partial -3/8, Irrelevant +1/8; lambda 2 -> raw Exact -0.25, Partial +0.75, Irrelevant -0.25
    # group 0 raw [-.25, -.25, .75, -.25]: mean 0 -> [-0.25, -0.25, 0.75, -0.25]
    # group 1 raw [-.25, -.25, -.25, (none)]: mean over the labelled three -0.25 -> [0, 0, 0, 0]
    got = share_pin_shift(pred, gold, 3, 4, 2.0)
    assert torch.allclose(got, torch.tensor([-0.25, -0.25, 0.75, -0.25, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(share_pin_shift(pred, gold, 3, 4, 0.0), torch.zeros(8))


@pytest.mark.parametrize("seed", range(6))
def test_share_pin_matches_loop_and_is_zero_sum_per_group(seed):
    gen = torch.Generator().manual_seed(seed)
    g, p, k = [2, 4, 8][seed % 3], 1 + seed, 3
    pred = torch.randint(-1, k, (g * p,), generator=gen)
    gold = torch.randint(0, k, (p,), generator=gen).repeat_interleave(g)
    coef = 0.5 + seed
    got = share_pin_shift(pred, gold, k, g, coef)
    assert torch.allclose(got, torch.tensor(ref_share_pin(pred.tolist(), gold.tolist(), k, g, coef)), atol=1e-6)
    assert torch.allclose(got.view(p, g).sum(1), torch.zeros(p), atol=1e-5)  # never moves a prompt's total
    assert (got[pred < 0] == 0).all()  # a rollout without a verdict is never lifted


def test_share_pin_shift_is_added_after_the_weights_in_every_estimator():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([2.0, 2.0, 0.5, 0.5])
    shift = torch.tensor([0.1, -0.1, 0.3, -0.3])
    assert torch.allclose(outcome_advantage(r, 2, w, shift=shift), group_normalize(r, 2) * w + shift)
    x = AdvantageInputs(r, torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.bool), torch.full((4, 3), -1),
                        torch.ones(4, 3), 2, outcome_weight=w, outcome_shift=shift)
    want = (group_normalize(r, 2) * w + shift)[:, None] * torch.ones(4, 3)
    for name in set(ESTIMATORS) - set(EXACT_ESTIMATORS):  # no steps: every sampled-rollout estimator is the shifted
        # outcome advantage
        xn = dataclasses.replace(x, step_gold_prob=torch.zeros(4, 0)) if name == "srpo_likelihood" else x
        assert torch.allclose(compute_advantages(name, xn), want), name


def test_share_pin_bad_input():
    with pytest.raises(UserError, match="share_pin"):
        share_pin_shift(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, 2, -1.0)
    with pytest.raises(ValueError, match="class ids"):
        share_pin_shift(torch.tensor([0, 3]), torch.tensor([0, 1]), 2, 2, 1.0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        share_pin_shift(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0]), 2, 2, 1.0)
