r"""SRPO advantages: group-normalised outcome reward + step (process) rewards, per token.

Read this file top to bottom; every function is a few lines of tensor code over fixed shapes.

Setting
-------
For each prompt (a query-product pair) the policy samples G completions ("rollouts"). A completion is a
few short reasoning steps followed by a relevance label. Every rollout gets

* one **outcome reward** r_i (is the final label right? e.g. 1 / partial credit / 0), and
* one **step reward** q_{i,s} per reasoning step s (is this step's conclusion right? e.g. a checker's
  probability that the step is correct).

Rollouts of one prompt are stored contiguously: rows ``[p*G, (p+1)*G)`` belong to prompt p, so the batch
size is B = num_prompts * G and ``x.view(-1, G)`` puts one prompt per row.

Shapes used throughout::

    outcome_rewards  [B]       float
    step_rewards     [B, S]    float, padded to the largest step count S in the batch
    step_mask        [B, S]    bool, True where step s exists in rollout i
    token_step       [B, T]    long, index of the step completion token t belongs to; -1 for tokens in no
                               step (the label, separators, padding)
    completion_mask  [B, T]    bool/0-1, True on generated (non-padding) tokens

1. Outcome advantage (GRPO)
---------------------------
    A^out_i = (r_i - mean_{j in group(i)} r_j) / (std_{j in group(i)} r_j + eps)

Only the comparison with the other rollouts of the same prompt matters, so no value network is needed.
``scale=False`` drops the division by the std (Dr. GRPO: the std re-weights prompts by how (un)certain the
policy is on them, which biases the objective towards too-easy and too-hard prompts).
The std is the unbiased (n-1) one, as in TRL and verl.

2. Step advantage (process supervision, DeepSeekMath section 4.1.3)
-------------------------------------------------------------------
Step rewards are normalised with the mean and std of *all valid step rewards of all rollouts in the group*
(not per step position: step 2 of one rollout need not talk about the same thing as step 2 of another):

    q~_{i,s} = (q_{i,s} - mean(Q_g)) / (std(Q_g) + eps),   Q_g = { q_{j,s'} : j in group g, s' valid }

and then turned into a per-token advantage by one of three credit modes (t is a token of step s(t)):

    broadcast:  A^step_{i,t} = q~_{i,s(t)}                       each step is credited for itself
    cumsum:     A^step_{i,t} = sum_{s' >= s(t)} q~_{i,s'}         DeepSeekMath: return-to-go of step rewards
    min:        A^step_{i,t} = min_{s' >= s(t)} q~_{i,s'}         PURE-style min-form credit

``cumsum`` lets an early step share the blame of a later mistake it may have caused, but a long chain of
mildly positive steps can then outweigh one decisive error, and the policy can farm reward by adding
steps. ``min`` (Cheng et al. 2025, "Stop Summation: Min-Form Credit Assignment Is All Process Reward Model
Needs") credits a token with the worst step still ahead of it: a trajectory is only as good as its weakest
remaining step, and adding steps can never raise the value. ``broadcast`` is the most local and the
easiest to read; it is the default because our steps are short independent checks (type, brand, colour,
...) rather than a derivation where step k builds on step k-1. Tokens in no step get step advantage 0.

3. Critical steps
-----------------
Optionally each normalised step reward is multiplied by a weight before the credit mode is applied
(``critical_step_weights``): the *first* incorrect step of a rollout whose final label is wrong (the step
where the reasoning went off the rails; later errors are mostly consequences), and correct steps the
group clearly agrees are good (normalised reward above a threshold) get more weight; everything else 1.

4. Total
--------
    A_{i,t} = [ A^out_i + alpha * A^step_{i,t} ] * completion_mask_{i,t}

With alpha = 0 this is exactly GRPO's advantage broadcast over the completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CREDIT_MODES = ("broadcast", "cumsum", "min")


def _groups(x: Tensor, group_size: int, name: str) -> Tensor:
    """View [B, ...] as [B // G, G, ...] with a clear error when B is not a multiple of G."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.shape[0] % group_size != 0:
        raise ValueError(f"{name} has batch size {x.shape[0]}, which is not a multiple of group_size={group_size}")
    return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def _normalize(values: Tensor, mask: Tensor, eps: float, scale: bool) -> Tensor:
    """``(x - mean) / (std + eps)`` over the last dim, using only ``mask`` entries; 0 where ``mask`` is False.

    The std is the unbiased one; with fewer than two valid entries it is 0 (a single reward has no spread).
    A row whose valid values are all equal comes out as exactly 0 -- not as rounding noise divided by a
    tiny std (with eps=0 that would be 0/0 = NaN, or an arbitrary +-1 from float error in the mean).
    """
    if values.shape[-1] == 0:  # no steps at all in the batch
        return torch.zeros_like(values)
    m = mask.to(values.dtype)
    n = m.sum(-1, keepdim=True)
    mean = (values * m).sum(-1, keepdim=True) / n.clamp(min=1)
    out = values - mean
    if scale:
        var = ((out * m) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        out = out / (var.sqrt() + eps)
    big = torch.finfo(values.dtype).max
    hi = torch.where(mask, values, torch.full_like(values, -big)).amax(-1, keepdim=True)
    lo = torch.where(mask, values, torch.full_like(values, big)).amin(-1, keepdim=True)
    constant = hi <= lo  # all valid values equal (or no valid value at all)
    return torch.where(mask & ~constant, out, torch.zeros_like(out))


def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO outcome advantage: ``(r - group mean) / (group std + eps)``; ``scale=False`` skips the std.

    rewards: [B] -> [B]. A group whose rewards are all equal gets advantage exactly 0: there is nothing
    to learn from a prompt the policy always gets right (or always wrong).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        rows = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards contain NaN/inf at rows {rows}")
    r = _groups(rewards.float(), group_size, "rewards")  # [P, G]
    return _normalize(r, torch.ones_like(r, dtype=torch.bool), eps, scale).reshape(-1)


def normalize_step_rewards(
    step_rewards: Tensor, step_mask: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True
) -> Tensor:
    """Normalise step rewards by the mean/std of all valid step rewards in each group. [B, S] -> [B, S].

    Invalid (padding) steps come out as 0, whatever garbage (even NaN) they held.
    """
    _check_same_shape(step_rewards, step_mask, "step_rewards", "step_mask")
    mask = step_mask.bool()
    bad = mask & ~torch.isfinite(step_rewards)
    if bad.any():
        i, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"step_rewards[{i}, {s}] = {float(step_rewards[i, s])} is not finite but step_mask says it exists"
        )
    r = torch.where(mask, step_rewards.float(), 0.0)
    rg = _groups(r, group_size, "step_rewards").flatten(1)  # [P, G*S]: every step of every rollout
    mg = _groups(mask, group_size, "step_mask").flatten(1)
    return _normalize(rg, mg, eps, scale).reshape(step_rewards.shape)


def step_advantages(
    norm_step_rewards: Tensor, step_mask: Tensor, token_step: Tensor, mode: str = "broadcast"
) -> Tensor:
    """Per-token step advantage [B, T] from (normalised, possibly weighted) step rewards [B, S].

    First compute one value per step according to ``mode`` (see module docstring), then gather it onto
    the tokens through ``token_step``. Tokens with ``token_step == -1`` get 0.
    """
    if mode not in CREDIT_MODES:
        raise ValueError(f"mode must be one of {CREDIT_MODES}, got {mode!r}")
    _check_same_shape(norm_step_rewards, step_mask, "norm_step_rewards", "step_mask")
    mask = step_mask.bool()
    _check_token_step(token_step, mask)
    q = torch.where(mask, norm_step_rewards.float(), 0.0)  # [B, S]

    if mode == "broadcast":
        value = q
    elif mode == "cumsum":
        # suffix sum: value[s] = sum_{s' >= s} q[s']  (padding steps contribute 0)
        value = q.flip(-1).cumsum(-1).flip(-1)
    else:  # "min"
        # suffix min over valid steps: padding steps are +inf so they never win the min
        inf = torch.full_like(q, float("inf"))
        value = torch.where(mask, q, inf).flip(-1).cummin(-1).values.flip(-1)
        value = torch.where(mask, value, torch.zeros_like(value))  # only valid steps are ever gathered

    in_step = token_step >= 0
    if value.shape[1] == 0:  # no steps at all in the batch: _check_token_step guarantees in_step is False
        return torch.zeros(token_step.shape, dtype=value.dtype, device=value.device)
    gathered = value.gather(1, token_step.clamp(min=0).long())  # [B, T]
    return torch.where(in_step, gathered, torch.zeros_like(gathered))


def critical_step_weights(
    step_rewards: Tensor,
    step_mask: Tensor,
    outcome_correct: Tensor,
    norm_step_rewards: Tensor | None = None,
    first_error_weight: float = 2.0,
    confident_correct_weight: float = 1.5,
    threshold: float = 0.5,
    incorrect_below: float = 0.5,
) -> Tensor:
    """Weights [B, S] that emphasise the steps that decide a rollout; 1.0 everywhere else.

    Arguments
        step_rewards: raw step rewards or 0/1 (or bool) step correctness [B, S]. A step counts as
            *incorrect* when its raw reward is below ``incorrect_below`` (0.5 suits both a 0/1 correctness
            and a checker's probability of correctness).
        outcome_correct: [B] bool, whether the rollout's final label was right.
        norm_step_rewards: group-normalised step rewards [B, S] (``normalize_step_rewards``); if None
            they are taken to be ``step_rewards`` itself.

    Two kinds of step are up-weighted:

    * ``first_error_weight`` on the **first incorrect step of a rollout whose outcome is wrong**. In a
      short reasoning chain the first wrong conclusion (say "brand: match" when the brands differ) is
      what flips the label; the steps after it are often wrong *because* of it, and the outcome reward
      alone cannot say which token to blame. Making that step's (negative) advantage larger concentrates
      the correction where it belongs. Rollouts with a right label are left alone even if a step is
      flagged: a flagged step there is as likely to be a checker error as a lucky guess.
    * ``confident_correct_weight`` on **correct steps whose normalised reward exceeds ``threshold``**:
      steps the group clearly rates above average. Reinforcing them more than ordinary steps speeds up
      learning the checks that actually separate good from bad rollouts, while steps that every rollout
      gets right (normalised reward ~ 0) stay at weight 1 and, being ~0, contribute little anyway.

    Padding steps get weight 1 (they are zeroed elsewhere). Weights multiply the normalised reward before
    the credit mode, so with ``cumsum``/``min`` the emphasis also reaches the tokens of earlier steps.
    """
    _check_same_shape(step_rewards, step_mask, "step_rewards", "step_mask")
    mask = step_mask.bool()
    raw = step_rewards.float()
    norm = raw if norm_step_rewards is None else norm_step_rewards.float()
    _check_same_shape(norm, mask, "norm_step_rewards", "step_mask")
    if outcome_correct.shape != (raw.shape[0],):
        raise ValueError(f"outcome_correct must have shape [{raw.shape[0]}], got {tuple(outcome_correct.shape)}")

    incorrect = mask & (raw < incorrect_below)  # [B, S]
    # first incorrect step: incorrect and no incorrect step before it
    before = incorrect.long().cumsum(-1) - incorrect.long()  # number of incorrect steps strictly before s
    first_error = incorrect & (before == 0) & ~outcome_correct.bool()[:, None]
    confident = mask & ~incorrect & (norm > threshold)

    w = torch.ones_like(raw)
    w = torch.where(confident, torch.full_like(w, confident_correct_weight), w)
    w = torch.where(first_error, torch.full_like(w, first_error_weight), w)
    return w


def srpo_advantages(
    outcome_rewards: Tensor,
    step_rewards: Tensor,
    step_mask: Tensor,
    token_step: Tensor,
    completion_mask: Tensor,
    group_size: int,
    alpha: float = 1.0,
    mode: str = "broadcast",
    critical: dict | None = None,
    eps: float = 1e-4,
    scale: bool = True,
) -> Tensor:
    """Per-token SRPO advantage [B, T]: ``(A^out_i + alpha * A^step_{i,t}) * completion_mask``.

    ``critical``: None (no emphasis) or keyword arguments for ``critical_step_weights`` (``first_error_weight``,
    ``confident_correct_weight``, ``threshold``, ``incorrect_below``) plus optionally ``outcome_correct``
    (a [B] bool tensor) or ``outcome_correct_at`` (float, default 1.0: a rollout is correct when its outcome
    reward is >= this). With ``alpha == 0`` the step inputs are not used at all and the result is exactly
    GRPO's advantage broadcast over the completion tokens.
    """
    if outcome_rewards.dim() != 1:
        raise ValueError(f"outcome_rewards must be 1-D [B], got shape {tuple(outcome_rewards.shape)}")
    if token_step.shape != completion_mask.shape or token_step.shape[0] != outcome_rewards.shape[0]:
        raise ValueError(
            f"token_step {tuple(token_step.shape)} and completion_mask {tuple(completion_mask.shape)} must both be "
            f"[B={outcome_rewards.shape[0]}, T]"
        )
    mask = completion_mask.float()
    adv = group_normalize(outcome_rewards, group_size, eps=eps, scale=scale)[:, None] * mask
    if alpha == 0:
        return adv

    if step_rewards.shape[0] != outcome_rewards.shape[0]:
        raise ValueError(
            f"step_rewards has {step_rewards.shape[0]} rows but outcome_rewards has {outcome_rewards.shape[0]}"
        )
    norm = normalize_step_rewards(step_rewards, step_mask, group_size, eps=eps, scale=scale)
    if critical is not None:
        opts = dict(critical)
        outcome_correct = opts.pop("outcome_correct", None)
        correct_at = opts.pop("outcome_correct_at", 1.0)
        if outcome_correct is None:
            outcome_correct = outcome_rewards >= correct_at
        unknown = set(opts) - {"first_error_weight", "confident_correct_weight", "threshold", "incorrect_below"}
        if unknown:
            raise ValueError(f"unknown keys in critical: {sorted(unknown)}")
        norm = norm * critical_step_weights(step_rewards, step_mask, outcome_correct, norm_step_rewards=norm, **opts)
    step_adv = step_advantages(norm, step_mask, token_step, mode=mode)
    return adv + alpha * step_adv * mask


def pad_step_rewards(step_rewards: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Ragged per-rollout step rewards -> (step_rewards [B, S] float, step_mask [B, S] bool), S = max length."""
    s = max((len(r) for r in step_rewards), default=0)
    values = torch.zeros(len(step_rewards), s)
    mask = torch.zeros(len(step_rewards), s, dtype=torch.bool)
    for i, r in enumerate(step_rewards):
        values[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)
        mask[i, : len(r)] = True
    return values, mask


# ---------------------------------------------------------------- input checks


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must be the same [B, S] shape")


def _check_token_step(token_step: Tensor, step_mask: Tensor) -> None:
    """Every token's step index must be -1 or point at a step that exists in that rollout."""
    if token_step.dim() != 2 or token_step.shape[0] != step_mask.shape[0]:
        raise ValueError(f"token_step {tuple(token_step.shape)} must be [B={step_mask.shape[0]}, T]")
    if token_step.dtype.is_floating_point or token_step.dtype == torch.bool:
        raise ValueError(f"token_step must be an integer tensor, got {token_step.dtype}")
    s = step_mask.shape[1]
    bad = (token_step < -1) | (token_step >= s)
    if not bad.any() and s > 0:
        exists = step_mask.gather(1, token_step.clamp(min=0).long())
        bad = (token_step >= 0) & ~exists
    if bad.any():
        i, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"token_step[{i}, {t}] = {int(token_step[i, t])} points at no valid step "
            f"(rollout {i} has {int(step_mask[i].sum())} valid steps out of S={s})"
        )
