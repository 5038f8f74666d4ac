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
Step rewards are normalised within each group. With ``step_type`` (an integer id per step: which schema
step it is) each step is compared with *the same step type* of the other rollouts of its group:

    q~_{i,s} = (q_{i,s} - mean(Q_{g,k})) / (std(Q_{g,k}) + eps),   Q_{g,k} = { q_{j,s'} : j in g, type(j,s') = k }

so a step every rollout gets right has q~ = 0 whatever the other step types score. Without ``step_type``
the pool is *all valid step rewards of the group* (DeepSeekMath's pooling; kept as an ablation): then a
step every rollout gets right is pushed up whenever another step type of the group scores lower, which
is how the pooled estimator paid the majority path (docs/srpo.md, "What went wrong").

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

With alpha = 0 this is exactly GRPO's advantage broadcast over the completion tokens. This is the
``srpo_centered`` estimator of the registry below.

5. Outcome-gated, penalty-only step credit (``srpo_gated``, ``srpo_gated_min``)
------------------------------------------------------------------------------
The centred step term rewards any step scoring above its group, whatever the verdict; where every rollout
gives the same verdict it is the only gradient, and the policy farms it on the majority path. The gated
estimators never centre step scores and never pay for a step; a step the examiner flags only *lowers*:

    flaw_{i,s} = clip((tau - q_{i,s}) / tau, 0, 1)        (tau = incorrect_below, 0.5; verifier 0 -> 1, 1 -> 0)
    pen_{i,s}  = w_{i,s} * flaw_{i,s},   w = first_error_weight on the first flagged step of a rollout, else 1
    wrong verdict:  A_{i,t} = min(A^out_i, 0)                            - alpha * pen_{i,s(t)}
    right verdict:  A_{i,t} = A^out_i * (1 - (1 - rho) * flaw_{i,s(t)}) - alpha * pen_{i,s(t)}

(rho = ``flawed_share``, the share of the positive outcome advantage a flawed step keeps, 0.5). So no
token of a wrong-verdict rollout is ever pushed up; a group where every rollout is wrong (outcome
advantage 0: vanilla GRPO learns nothing there) still pushes down the steps the examiner flags -- the
hypothesis for why SRPO can beat GRPO. ``srpo_gated_min`` uses PURE's min-form over the penalties: a token
answers for the worst flagged step at or after it (``max_{s' >= s(t)} pen_{i,s'}``), so the blame of a
wrong step reaches the steps that led to it. Tokens in no step get only the (gated) outcome term. With
alpha = 0 both are GRPO exactly.

6. Class-aware outcome and the registry
---------------------------------------
``outcome_weight`` [B] (a per-row weight, e.g. by gold class) multiplies the group-normalised outcome
advantage *after* normalisation (before it, a constant weight per prompt would cancel). Every estimator
has the signature ``fn(inputs: AdvantageInputs, opts: AdvantageOptions) -> Tensor [B, T]`` and is picked
by name from :data:`ESTIMATORS` (as verl's ``core_algos``): ``grpo``, ``srpo_centered``,
``srpo_centered_pooled``, ``srpo_gated``, ``srpo_gated_min``, ``srpo_gated_balanced``, ``srpo_decoupled``,
``srpo_likelihood``, ``grpo_exact``, ``srpo_exact``.

7. Zero-sum gated credit (``srpo_gated_balanced``)
-------------------------------------------------
Penalty-only credit adds net *negative* advantage to every group with a flagged step. Pushing down sampled
tokens moves probability to whatever the policy already prefers, which after a reasoning SFT is the modal
(Exact) path -- the drift measured in docs/results.md. The balanced form keeps the outcome gate and pays the
same mass back inside the group and step type: with ``P_gk`` the penalties of the steps of type k in group g
and ``E_gk`` its unflagged steps of type k in right-verdict rollouts,

    A_{i,t} = gated A_{i,t} + alpha * P_gk / |E_gk|      for t in a step of E_gk

(no bonus, and the penalty unbalanced, where E_gk is empty). Still no positive step credit in a wrong-verdict
rollout; alpha = 0 is GRPO.

8. Decoupled credit (``srpo_decoupled``)
---------------------------------------
Every estimator above adds the outcome advantage to the step tokens too: a rollout with a rewarded verdict
reinforces the evidence it wrote, right or wrong. When an evidence value travels with a verdict (``Similarity:
high`` with Exact), the outcome term teaches the value that goes with the rewarded verdict, not the true one, and
a step term of the same size only partly undoes it (docs/results.md, session 11: the ``Similarity`` step fell in
both RL arms). The decoupled estimator gives each token one signal, by what it is:

    t in a scored step s:   A_{i,t} = alpha * q~_{i,s}      (q~: group-centred per step type, section 2)
    any other token:        A_{i,t} = A^out_i              (the verdict, separators: GRPO's advantage)

A step is paid for being right against the same step of the other rollouts of its prompt, whatever the verdict;
the verdict only for being right. Both terms are zero-sum within a group (the step term per step type), so no
mass drifts towards the modal path, and a step every rollout gets right has advantage 0. Nothing can be farmed
through the verdict: a step's credit never reaches another token. (This breaks the gated rule "no positive token
in a wrong-verdict rollout" on purpose: the evidence steps are label-free facts of the pair, right or wrong
whatever the verdict.) With alpha = 0 the step tokens get 0: the verdict is trained by GRPO alone.

9. Likelihood credit on a decision step (``srpo_likelihood``)
------------------------------------------------------------
Every estimator above credits the *sampled* value of a step: right or wrong, after the fact. For a decision step
whose gold value is known (the decision schema's ``Relevant: yes|no``, checked against the gold label) the policy's
own probability of the gold value, p = P(S = g | prompt, the steps before S), read teacher-forced at the step's
value position, gives more: for a binary choice the sampled value's credit can be chosen so that the policy
gradient on that token is *exactly* the gradient of log p (or of p) -- in every rollout, not only in expectation:

    logprob:  c = 1                 if the sampled value is g,    c = -min((1 - p) / p, clip)   otherwise
    prob:     c = p                 if the sampled value is g,    c = -(1 - p)                    otherwise

(with two values and softmax logits z: grad log pi(g) = (1 - p) grad(z_g - z_o) and grad log pi(o) = -p grad(z_g - z_o),
so c(g) grad log pi(g) = c(o) grad log pi(o) = grad log p for the two c above; ``prob`` multiplies both by p).
``clip`` bounds the one large value, a wrong sample where p was small (at clip 4: p < 0.2 is followed at a
reduced rate). The credit has both signs and needs no group baseline; an all-wrong group still sharpens p; a
rollout cannot farm it (it is the gold value's probability, whatever else the rollout writes). Tokens of such a
step get ``alpha * c`` (plus the outcome advantage unless ``decouple``); every other token GRPO's outcome
advantage -- other step rewards are not used. ``step_gold_prob`` [B, S] carries p per rewarded step, NaN where a
step has no likelihood credit; right/wrong is ``step_gold_right`` (the sampled value is the gold one; without it the
step reward, q >= incorrect_below, which the exact verifier makes the same). ``step_gold_weight`` [B, S] multiplies
each credit by a weight of its gold value (class balance: the ``prob`` objective is the expected accuracy of the
step, which an imbalanced step maximises by its majority value; weighted, the balanced accuracy). With alpha = 0
and ``decouple=False`` this is GRPO exactly.

10. Holding the verdict shares to the gold shares (``share_pin``)
----------------------------------------------------------------
A 0/1 outcome sampled at temperature 1 pays a class by how often it is right. The middle class (Partial) is the
least often right on unclear pairs, so GRPO's own outcome pushes the policy off it, while Macro F1 weighs each class
a third (docs/srpo.md: both RL arms drifted off Partial without a reward gain). The pin adds, after the outcome's
normalisation and weights, a term that pays a rollout's *predicted* class by how far that class's share of the
batch's verdicts falls short of its share of the batch's gold labels:
    d_c     = share_pred(c) - share_gold(c)          over the (gathered) batch; unparsable verdicts count in n only
    raw_i   = -lambda * d_{pred(i)}                   0 for a rollout without a label
    shift_i = raw_i - mean_{j in group(i), labelled} raw_j      0 for a rollout without a label
Centred within the group (over its labelled rollouts), it only re-ranks the verdicts of one prompt -- it never
raises or lowers a prompt's total advantage, and an unparsable rollout is never lifted by it. The gold shares are
the same batch's, so a batch that happens to hold more prompts of one class does not push that class down; no
state is carried between steps (a resumed run computes the same shifts). lambda = 0 is the estimator without it.

11. Enumerated rollouts: the exact expectation (``grpo_exact``, ``srpo_exact``)
----------------------------------------------------------------------------
When everything before the last choices is forced (``rollout_evidence: enumerated``: the computed evidence, then
the decision value and the verdict), a prompt has few possible completions -- 2 decisions x 3 verdicts on the
decision schema -- and the G rollouts of its group are *all of them*, each once ("leaves"), not a sample. With the
leaves' log-probabilities ``leaf_logp`` [B] (summed over their trained tokens, no gradient), renormalised within the
group, pi_c = softmax_group(leaf_logp)_c, the exact policy gradient of the expected reward needs no sampling:

    grad E_pi[R] = sum_c pi_c (R_c - V) grad log pi_c,      V = sum_c pi_c R_c

so each leaf's tokens get

    A_c = G * pi_c * [ w_g * (R_c - V) / (s + eps) + (h_c - sum_j pi_j h_j) ]

(G so that the scale matches a sampled group's, whose loss sums G rollouts' terms; w_g the prompt's class weight,
section 6; s the std of R over the batch's leaves under pi, as TRL's ``scale_rewards="batch"`` -- a group std would
blow up the prompts the policy is sure of; h_c the share pin's raw term with the *expected* verdict shares,
:func:`expected_share_pin`, centred under pi so it is zero-sum per prompt). Nothing is random: a group where the
policy is sure and wrong, which a sample would show as G equal wrong verdicts (no GRPO gradient), gets its full
gradient here, and two RL seeds differ only in the prompts' order. ``grpo_exact``: R = the outcome.
``srpo_exact``: R = outcome + alpha * the sum of the examined steps' rewards (on the decision schema with computed
evidence, the decision's verifier score; constant steps cancel in R - V). Renormalising over the leaves is exact
for the gradient: the normaliser's term is sum_c pi_c (R_c - V) = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from she.errors import UserError

CREDIT_MODES = ("broadcast", "cumsum", "min")
EXACT_ESTIMATORS = ("grpo_exact", "srpo_exact")  # over enumerated leaves (section 11)


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
    step_rewards: Tensor, step_mask: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True,
    step_type: Tensor | None = None,
) -> Tensor:
    """Normalise step rewards within each group. [B, S] -> [B, S].

    ``step_type`` None: by the mean/std of all valid step rewards of the group (pooled). ``step_type`` [B, S]
    (integer ids): each type separately, so a step type every rollout gets right comes out 0.
    Invalid (padding) steps come out as 0, whatever garbage (even NaN) they held.
    """
    if step_type is not None:
        _check_same_shape(step_type, step_mask, "step_type", "step_mask")
        out = torch.zeros(step_rewards.shape, dtype=torch.float32)
        mask = step_mask.bool()
        for k in torch.unique(step_type[mask]).tolist():
            of_k = mask & (step_type == k)
            out = out + normalize_step_rewards(step_rewards, of_k, group_size, eps=eps, scale=scale)
        return out
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
        raise UserError(f"mode must be one of {CREDIT_MODES}, got {mode!r}")
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
    step_type: Tensor | None = None,
    outcome_weight: Tensor | None = None,
    outcome_shift: Tensor | None = None,
) -> Tensor:
    """Per-token SRPO advantage [B, T]: ``(A^out_i + alpha * A^step_{i,t}) * completion_mask``.

    ``step_type``: normalise step rewards per type (see :func:`normalize_step_rewards`); ``outcome_weight``
    [B]: per-row weights on the normalised outcome advantage, ``outcome_shift`` [B] added to it
    (:func:`outcome_advantage`).

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
    adv = outcome_advantage(outcome_rewards, group_size, outcome_weight, eps=eps, scale=scale,
                            shift=outcome_shift)[:, None] * mask
    if alpha == 0:
        return adv

    if step_rewards.shape[0] != outcome_rewards.shape[0]:
        raise ValueError(
            f"step_rewards has {step_rewards.shape[0]} rows but outcome_rewards has {outcome_rewards.shape[0]}"
        )
    norm = normalize_step_rewards(step_rewards, step_mask, group_size, eps=eps, scale=scale, step_type=step_type)
    if critical is not None:
        opts = dict(critical)
        outcome_correct = opts.pop("outcome_correct", None)
        correct_at = opts.pop("outcome_correct_at", 1.0)
        if outcome_correct is None:
            outcome_correct = outcome_rewards >= correct_at
        unknown = set(opts) - {"first_error_weight", "confident_correct_weight", "threshold", "incorrect_below"}
        if unknown:
            raise UserError(f"unknown keys in critical: {sorted(unknown)}")
        norm = norm * critical_step_weights(step_rewards, step_mask, outcome_correct, norm_step_rewards=norm, **opts)
    step_adv = step_advantages(norm, step_mask, token_step, mode=mode)
    return adv + alpha * step_adv * mask


def share_pin_shift(pred: Tensor, gold: Tensor, num_classes: int, group_size: int, coef: float) -> Tensor:
    """The share pin's term [B] (section 10): ``pred``/``gold`` [B] class ids (``pred`` -1: no label).

    ``-coef * (share_pred(c) - share_gold(c))`` for each rollout's predicted class c, centred over the labelled
    rollouts of its group; 0 for unlabelled rollouts (and everywhere when ``coef`` is 0).
    """
    if pred.shape != gold.shape or pred.dim() != 1:
        raise ValueError(f"pred {tuple(pred.shape)} and gold {tuple(gold.shape)} must both be [B]")
    if not (0 <= coef < float("inf")):
        raise UserError(f"share_pin must be a finite number >= 0, got {coef}")
    if ((pred < -1) | (pred >= num_classes)).any() or ((gold < 0) | (gold >= num_classes)).any():
        raise ValueError(f"class ids must be in [0, {num_classes}) (pred may be -1: no label)")
    n = pred.shape[0]
    if coef == 0 or n == 0:
        return torch.zeros(n)
    labelled = pred >= 0
    k = torch.arange(num_classes)
    gap = ((pred[:, None] == k).float().sum(0) - (gold[:, None] == k).float().sum(0)) / n  # [K]
    raw = torch.where(labelled, -coef * gap[pred.clamp(min=0)], torch.zeros(n))
    lab = _groups(labelled, group_size, "pred").float()  # [P, G]
    mean = (_groups(raw, group_size, "pred") * lab).sum(1, keepdim=True) / lab.sum(1, keepdim=True).clamp(min=1)
    return torch.where(labelled, raw - mean.expand_as(lab).reshape(-1), torch.zeros(n))


def leaf_probabilities(leaf_logp: Tensor, group_size: int) -> Tensor:
    """pi [B]: each enumerated leaf's probability renormalised within its group (section 11)."""
    if leaf_logp.dim() != 1:
        raise ValueError(f"leaf_logp must be 1-D [B], got shape {tuple(leaf_logp.shape)}")
    if not torch.isfinite(leaf_logp).all():
        raise ValueError("leaf_logp contains NaN/inf")
    return torch.softmax(_groups(leaf_logp.float(), group_size, "leaf_logp"), dim=1).reshape(-1)


def expected_share_pin(probs: Tensor, pred: Tensor, gold: Tensor, num_classes: int, group_size: int,
                       coef: float) -> Tensor:
    """The share pin's raw term h [B] for enumerated leaves (section 11): ``-coef * (expected share of c - gold share
    of c)`` for each leaf's class c, the expected share ``sum_g sum_{leaf of g} pi * [class = c] / num_prompts``."""
    if not (probs.shape == pred.shape == gold.shape) or probs.dim() != 1:
        raise ValueError(f"probs {tuple(probs.shape)}, pred {tuple(pred.shape)}, gold {tuple(gold.shape)} must be [B]")
    if not (0 <= coef < float("inf")):
        raise UserError(f"share_pin must be a finite number >= 0, got {coef}")
    if ((pred < 0) | (pred >= num_classes)).any() or ((gold < 0) | (gold >= num_classes)).any():
        raise ValueError(f"class ids must be in [0, {num_classes}): every enumerated leaf has a verdict")
    prompts = _groups(probs, group_size, "probs").shape[0]
    if coef == 0 or prompts == 0:
        return torch.zeros(probs.shape[0])
    k = torch.arange(num_classes)
    expected = (probs.float()[:, None] * (pred[:, None] == k).float()).sum(0) / prompts  # [K]
    gold_share = (gold[::group_size, None] == k).float().sum(0) / prompts  # one gold label a prompt
    return -coef * (expected - gold_share)[pred]


def teacher_leaf_term(leaf_logp: Tensor, ref_leaf_logp: Tensor, teacher_logp: Tensor, group_size: int,
                      beta: float) -> Tensor:
    """A teacher's KL-regularised term h [B] for enumerated leaves (section 11, "teacher"):

        h_c = log q(c) - beta * (log pi_c - log pi_ref(c)),      pi, pi_ref renormalised over each prompt's leaves

    ``teacher_logp`` [B]: log q of each leaf's label under a teacher (e.g. a cross-encoder's probability of the
    leaf's verdict). Given to :func:`exact_tree_advantages` as its ``pin`` (centred under pi there), the update is
    the exact gradient of ``E_pi[log q] - beta KL(pi || pi_ref)`` (h held fixed), whose maximiser is
    ``pi* proportional to pi_ref q^(1/beta)``: at beta 2 the geometric pool of the policy's start and the teacher."""
    if not (leaf_logp.shape == ref_leaf_logp.shape == teacher_logp.shape) or leaf_logp.dim() != 1:
        raise ValueError(f"leaf_logp {tuple(leaf_logp.shape)}, ref_leaf_logp {tuple(ref_leaf_logp.shape)} and "
                         f"teacher_logp {tuple(teacher_logp.shape)} must all be [B]")
    if not torch.isfinite(teacher_logp).all():
        raise ValueError("teacher_logp contains NaN/inf (floor the teacher's probabilities first)")
    if not (0 < beta < float("inf")):
        raise UserError(f"teacher_beta must be a finite number > 0, got {beta}")
    if not (torch.isfinite(leaf_logp).all() and torch.isfinite(ref_leaf_logp).all()):
        raise ValueError("leaf_logp or ref_leaf_logp contains NaN/inf")
    log_pi = torch.log_softmax(_groups(leaf_logp.float(), group_size, "leaf_logp"), dim=1).reshape(-1)
    log_ref = torch.log_softmax(_groups(ref_leaf_logp.float(), group_size, "ref_leaf_logp"), dim=1).reshape(-1)
    return teacher_logp.float() - beta * (log_pi - log_ref)


def exact_tree_advantages(rewards: Tensor, leaf_logp: Tensor, group_size: int, weight: Tensor | None = None,
                          pin: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """``A_c = G * pi_c * [w_g (R_c - V) / (s + eps) + h_c - E_pi h]`` [B] over enumerated leaves (section 11)."""
    if rewards.shape != leaf_logp.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and leaf_logp {tuple(leaf_logp.shape)} must both be [B]")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf")
    pi = _groups(leaf_probabilities(leaf_logp, group_size), group_size, "leaf_logp")  # [P, G]
    r = _groups(rewards.float(), group_size, "rewards")
    value = (pi * r).sum(1, keepdim=True)
    mean = value.mean()
    s = ((pi * (r - mean) ** 2).sum(1).mean()).sqrt()  # the std of R over all leaves, each prompt weighing 1
    a = (r - value) / (s + eps)
    if weight is not None:
        w = _groups(weight.float(), group_size, "weight")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weight must be finite and >= 0")
        a = a * w
    if pin is not None:
        h = _groups(pin.float(), group_size, "pin")
        a = a + h - (pi * h).sum(1, keepdim=True)
    return (group_size * pi * a).reshape(-1)


def outcome_advantage(
    outcome_rewards: Tensor, group_size: int, outcome_weight: Tensor | None = None, eps: float = 1e-4,
    scale: bool = True, batch_scale: bool = False, shift: Tensor | None = None,
) -> Tensor:
    """GRPO's group-normalised outcome advantage [B], times ``outcome_weight`` [B] *after* normalisation.

    A weight per gold class applied to the rewards before normalisation would cancel (every rollout of a
    prompt shares the gold class); applied after, it scales how much a prompt of that class moves the policy.
    ``batch_scale`` (TRL's ``scale_rewards="batch"``): centre per group, divide by the std of the *whole batch*
    of rewards, so a prompt the policy is nearly sure about is not blown up by its tiny group std. ``shift`` [B] is
    added last (the share pin, :func:`share_pin_shift`).
    """
    if batch_scale:
        centred = group_normalize(outcome_rewards, group_size, eps=eps, scale=False)
        r = outcome_rewards.float()
        std = r.std() if r.numel() > 1 else torch.zeros(())
        adv = centred / (std + eps)
    else:
        adv = group_normalize(outcome_rewards, group_size, eps=eps, scale=scale)
    if outcome_weight is not None:
        w = outcome_weight.float()
        if w.shape != adv.shape:
            raise ValueError(f"outcome_weight has shape {tuple(w.shape)}, expected [{adv.shape[0]}]")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("outcome_weight must be finite and >= 0")
        adv = adv * w
    if shift is not None:
        if shift.shape != adv.shape:
            raise ValueError(f"shift has shape {tuple(shift.shape)}, expected [{adv.shape[0]}]")
        adv = adv + shift.float()
    return adv


def step_flaws(step_rewards: Tensor, step_mask: Tensor, incorrect_below: float = 0.5) -> Tensor:
    """How wrong each step is, [B, S] in [0, 1]: ``clip((tau - q) / tau, 0, 1)``; 0 on padding.

    A verifier's 0 is a full flaw, its 1 none; a judge's probability below ``tau`` is a partial flaw, at or
    above ``tau`` none -- a judge's doubt never adds up to a penalty on steps it thinks are fine.
    """
    _check_same_shape(step_rewards, step_mask, "step_rewards", "step_mask")
    if not 0.0 < incorrect_below <= 1.0:
        raise UserError(f"incorrect_below must be in (0, 1], got {incorrect_below}")
    mask = step_mask.bool()
    q = torch.where(mask, step_rewards.float(), torch.ones_like(step_rewards, dtype=torch.float32))
    return ((incorrect_below - q) / incorrect_below).clamp(0.0, 1.0) * mask


def step_penalties(step_rewards: Tensor, step_mask: Tensor, incorrect_below: float = 0.5,
                   first_error_weight: float = 2.0) -> tuple[Tensor, Tensor]:
    """(flaw, pen) [B, S]: :func:`step_flaws`, and the penalty ``first_error_weight * flaw`` on the first
    flagged step of each rollout, ``flaw`` on later ones (section 5)."""
    flaw = step_flaws(step_rewards, step_mask, incorrect_below)
    flagged = flaw > 0
    first = flagged & ((flagged.long().cumsum(-1) - flagged.long()) == 0)
    return flaw, flaw * torch.where(first, torch.full_like(flaw, first_error_weight), torch.ones_like(flaw))


def balancing_bonus(pen: Tensor, flaw: Tensor, step_mask: Tensor, outcome_correct: Tensor, group_size: int,
                    step_type: Tensor | None = None) -> Tensor:
    """The positive step credit that makes the gated penalties zero-sum per group and step type, [B, S].

    For a group g and step type k, the penalties ``P_gk = sum pen`` of its steps of type k are shared equally
    among the *unflagged* steps of type k in the group's *right-verdict* rollouts (each step counted once,
    whatever its length); where there is no such step the penalty stays unbalanced. ``step_type`` None
    treats every step as one type. (Section 7.)
    """
    _check_same_shape(pen, step_mask, "pen", "step_mask")
    b, s = pen.shape
    groups = _groups(pen, group_size, "pen").shape[0]
    smask = step_mask.bool()
    types = torch.zeros_like(pen, dtype=torch.long) if step_type is None else step_type.long().clamp(min=0)
    if s == 0:
        return torch.zeros_like(pen, dtype=torch.float32)
    k = int(types.max()) + 1  # padding may carry any type: the one-hot is masked below
    onehot = torch.nn.functional.one_hot(types, k).float() * smask[..., None]  # [B, S, K]
    total = (pen.float()[..., None] * onehot).view(groups, group_size, s, k).sum((1, 2))  # [n, K]
    eligible = (outcome_correct.bool()[:, None] & smask & (flaw == 0)).float()[..., None] * onehot  # [B, S, K]
    count = eligible.view(groups, group_size, s, k).sum((1, 2))  # [n, K]
    share = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
    return (eligible.view(groups, group_size, s, k) * share[:, None, None, :]).sum(-1).view(b, s)


def gated_step_advantages(
    outcome_adv: Tensor,
    outcome_correct: Tensor,
    step_rewards: Tensor,
    step_mask: Tensor,
    token_step: Tensor,
    completion_mask: Tensor,
    alpha: float = 1.0,
    first_error_weight: float = 2.0,
    flawed_share: float = 0.5,
    incorrect_below: float = 0.5,
    min_form: bool = False,
    balance_group_size: int | None = None,
    step_type: Tensor | None = None,
) -> Tensor:
    """Outcome-gated, penalty-only SRPO advantage [B, T] (module docstring, section 5).

    ``balance_group_size`` (the group size G) adds :func:`balancing_bonus` (``alpha`` times it) to the unflagged
    steps of right-verdict rollouts, so the step term is zero-sum per group and step type (section 7).

    ``outcome_adv`` [B] is the (weighted) group-normalised outcome advantage; ``outcome_correct`` [B] whether
    the rollout's verdict is right. ``alpha == 0`` returns ``outcome_adv`` broadcast over the mask: GRPO.
    """
    if not 0.0 <= flawed_share <= 1.0:
        raise UserError(f"flawed_share must be in [0, 1], got {flawed_share}")
    if first_error_weight < 0:
        raise UserError(f"first_error_weight must be >= 0, got {first_error_weight}")
    mask = completion_mask.float()
    base = outcome_adv.float()[:, None] * mask
    if alpha == 0:
        return base
    if outcome_correct.shape != outcome_adv.shape:
        raise ValueError(f"outcome_correct must have shape {tuple(outcome_adv.shape)}, got {tuple(outcome_correct.shape)}")
    smask = step_mask.bool()
    _check_token_step(token_step, smask)
    flaw, pen = step_penalties(step_rewards, smask, incorrect_below, first_error_weight)  # [B, S] each
    if min_form:  # a token answers for the worst penalty at or after its step (suffix max; padding is 0)
        pen = pen.flip(-1).cummax(-1).values.flip(-1) * smask
    if balance_group_size is not None:  # the bonus goes on unflagged steps, where pen is 0: subtracting -bonus adds it
        pen = pen - balancing_bonus(pen, flaw, smask, outcome_correct, balance_group_size, step_type)
    in_step = token_step >= 0
    if flaw.shape[1] == 0:
        flaw_t = pen_t = torch.zeros_like(mask)
    else:
        idx = token_step.clamp(min=0).long()
        flaw_t = torch.where(in_step, flaw.gather(1, idx), torch.zeros_like(mask))
        pen_t = torch.where(in_step, pen.gather(1, idx), torch.zeros_like(mask))
    a = outcome_adv.float()[:, None]
    right = outcome_correct.bool()[:, None]
    adv = torch.where(right, a * (1.0 - (1.0 - flawed_share) * flaw_t), a.clamp(max=0.0)) - alpha * pen_t
    return adv * mask


def decoupled_advantages(
    outcome_adv: Tensor,
    step_rewards: Tensor,
    step_mask: Tensor,
    token_step: Tensor,
    completion_mask: Tensor,
    group_size: int,
    alpha: float = 1.0,
    eps: float = 1e-4,
    scale: bool = True,
    step_type: Tensor | None = None,
) -> Tensor:
    """Decoupled SRPO advantage [B, T] (module docstring, section 8): step tokens get only ``alpha`` times their
    step's group-centred reward (per ``step_type``), every other completion token only ``outcome_adv`` [B]."""
    if token_step.shape != completion_mask.shape or token_step.shape[0] != outcome_adv.shape[0]:
        raise ValueError(f"token_step {tuple(token_step.shape)} and completion_mask {tuple(completion_mask.shape)} "
                         f"must both be [B={outcome_adv.shape[0]}, T]")
    norm = normalize_step_rewards(step_rewards, step_mask, group_size, eps=eps, scale=scale, step_type=step_type)
    step_adv = step_advantages(norm, step_mask, token_step, mode="broadcast")
    out = outcome_adv.float()[:, None].expand_as(step_adv)
    return torch.where(token_step >= 0, alpha * step_adv, out) * completion_mask.float()


LIKELIHOOD_OBJECTIVES = ("logprob", "prob")


def likelihood_step_credit(right: Tensor, p_gold: Tensor, objective: str = "logprob", clip: float = 4.0) -> Tensor:
    """Credit c [B, S] of each step whose gold-value probability ``p_gold`` is known (module docstring, section 9):
    the value that makes ``c * grad log pi(sampled)`` equal to ``grad log p`` (``logprob``, the wrong side capped at
    ``clip``) or ``grad p`` (``prob``) for a two-valued step. ``right`` [B, S] bool: the sampled value is the gold
    one. NaN in ``p_gold`` (no likelihood credit for that step) gives 0."""
    if objective not in LIKELIHOOD_OBJECTIVES:
        raise UserError(f"likelihood_objective must be one of {LIKELIHOOD_OBJECTIVES}, got {objective!r}")
    if clip <= 0:
        raise UserError(f"likelihood_clip must be > 0, got {clip}")
    known = torch.isfinite(p_gold)
    p = torch.where(known, p_gold.float(), torch.ones_like(p_gold, dtype=torch.float32)).clamp(1e-6, 1.0)
    if ((p_gold[known] < 0) | (p_gold[known] > 1)).any():
        raise ValueError("step_gold_prob must be a probability (or NaN)")
    if objective == "logprob":
        c = torch.where(right.bool(), torch.ones_like(p), -((1.0 - p) / p).clamp(max=clip))
    else:
        c = torch.where(right.bool(), p, -(1.0 - p))
    return torch.where(known, c, torch.zeros_like(c))


def likelihood_advantages(
    outcome_adv: Tensor,
    credit: Tensor,
    credited: Tensor,
    step_mask: Tensor,
    token_step: Tensor,
    completion_mask: Tensor,
    alpha: float = 1.0,
    decouple: bool = True,
) -> Tensor:
    """``srpo_likelihood``'s advantage [B, T] (section 9): tokens of a ``credited`` [B, S] step (a subset of
    ``step_mask``) get ``alpha * credit`` (plus ``outcome_adv`` [B] unless ``decouple``), every other completion
    token ``outcome_adv``."""
    _check_same_shape(credit, credited, "credit", "credited")
    _check_same_shape(credited, step_mask, "credited", "step_mask")
    _check_token_step(token_step, step_mask.bool())
    mask = completion_mask.float()
    out = outcome_adv.float()[:, None].expand_as(mask)
    if credit.shape[1] == 0:
        return out * mask
    idx = token_step.clamp(min=0).long()
    in_credited = (token_step >= 0) & credited.bool().gather(1, idx)
    c_t = alpha * credit.float().gather(1, idx)
    adv = torch.where(in_credited, c_t if decouple else out + c_t, out)
    return adv * mask


# ---------------------------------------------------------------- the estimator registry


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read; one row per rollout, groups contiguous (see the module docstring)."""

    outcome_rewards: Tensor  # [B]
    step_rewards: Tensor  # [B, S] in [0, 1]
    step_mask: Tensor  # [B, S] bool
    token_step: Tensor  # [B, T] long, -1 outside steps
    completion_mask: Tensor  # [B, T]
    group_size: int
    outcome_correct: Tensor | None = None  # [B] bool; None = outcome_rewards >= 1
    step_type: Tensor | None = None  # [B, S] long: schema step id, for per-type normalisation
    outcome_weight: Tensor | None = None  # [B] per-row weight on the normalised outcome advantage
    outcome_shift: Tensor | None = None  # [B] added to it after the weight (the share pin, section 10)
    step_gold_prob: Tensor | None = None  # [B, S] P(gold value | prefix) of likelihood steps, NaN elsewhere
    step_gold_right: Tensor | None = None  # [B, S] bool: the step's sampled value is its gold value (None: step_rewards)
    step_gold_weight: Tensor | None = None  # [B, S] weight on a likelihood step's credit (class balance of its gold
    # value; None: 1)
    leaf_logp: Tensor | None = None  # [B] enumerated leaves' log-probabilities (the exact estimators, section 11)


@dataclass(frozen=True)
class AdvantageOptions:
    """Every estimator's knobs (each estimator reads the ones it needs)."""

    alpha: float = 1.0
    credit_mode: str = "broadcast"  # centred estimators: broadcast | cumsum | min
    critical: dict | None = None  # centred estimators: critical_step_weights keywords
    eps: float = 1e-4
    scale: bool = True
    batch_scale: bool = False  # outcome term: divide by the batch's reward std (TRL scale_rewards="batch")
    first_error_weight: float = 2.0  # gated estimators
    flawed_share: float = 0.5
    incorrect_below: float = 0.5
    likelihood_objective: str = "logprob"  # srpo_likelihood: logprob | prob
    likelihood_clip: float = 4.0  # srpo_likelihood (logprob): cap on a wrong sample's |credit|
    likelihood_decouple: bool = True  # srpo_likelihood: credited tokens get the credit only, not the outcome too


Estimator = Callable[[AdvantageInputs, AdvantageOptions], Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def deco(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return deco


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise UserError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def _correct(x: AdvantageInputs) -> Tensor:
    return x.outcome_correct.bool() if x.outcome_correct is not None else x.outcome_rewards >= 1.0


def _outcome(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """The outcome advantage [B] every estimator starts from: normalised, weighted, shifted (sections 1, 6, 10)."""
    return outcome_advantage(x.outcome_rewards, x.group_size, x.outcome_weight, eps=o.eps, scale=o.scale,
                             batch_scale=o.batch_scale, shift=x.outcome_shift)


@register_estimator("grpo")
def grpo_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Outcome only (with the class-aware weight when given), broadcast over the completion tokens."""
    adv = _outcome(x, o)
    return adv[:, None] * x.completion_mask.float()


def _centered(x: AdvantageInputs, o: AdvantageOptions, step_type: Tensor | None) -> Tensor:
    crit = None
    if o.critical is not None:
        crit = dict(o.critical)
        crit.setdefault("outcome_correct", _correct(x))
    return srpo_advantages(x.outcome_rewards, x.step_rewards, x.step_mask, x.token_step, x.completion_mask,
                           x.group_size, alpha=o.alpha, mode=o.credit_mode, critical=crit, eps=o.eps, scale=o.scale,
                           step_type=step_type, outcome_weight=x.outcome_weight, outcome_shift=x.outcome_shift)


@register_estimator("srpo_centered")
def srpo_centered_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Group-centred step term, normalised per step type (sections 2-4)."""
    return _centered(x, o, x.step_type)


@register_estimator("srpo_centered_pooled")
def srpo_centered_pooled_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """The centred step term normalised over all step types of a group (the first SRPO; an ablation)."""
    return _centered(x, o, None)


def _gated(x: AdvantageInputs, o: AdvantageOptions, min_form: bool, balance: bool = False) -> Tensor:
    adv = _outcome(x, o)
    return gated_step_advantages(adv, _correct(x), x.step_rewards, x.step_mask, x.token_step, x.completion_mask,
                                 alpha=o.alpha, first_error_weight=o.first_error_weight, flawed_share=o.flawed_share,
                                 incorrect_below=o.incorrect_below, min_form=min_form,
                                 balance_group_size=x.group_size if balance else None, step_type=x.step_type)


@register_estimator("srpo_gated")
def srpo_gated_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Outcome-gated, penalty-only step credit, each step answering for itself (section 5)."""
    return _gated(x, o, min_form=False)


@register_estimator("srpo_gated_min")
def srpo_gated_min_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Outcome-gated penalties with PURE-style min-form credit (section 5)."""
    return _gated(x, o, min_form=True)


@register_estimator("srpo_gated_balanced")
def srpo_gated_balanced_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """``srpo_gated`` whose penalties are paid back, per group and step type, to the unflagged steps of
    right-verdict rollouts: a zero-sum step term (section 7)."""
    return _gated(x, o, min_form=False, balance=True)


@register_estimator("srpo_decoupled")
def srpo_decoupled_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Step tokens credited by their own step only, the other tokens by the outcome only (section 8)."""
    adv = _outcome(x, o)
    return decoupled_advantages(adv, x.step_rewards, x.step_mask, x.token_step, x.completion_mask, x.group_size,
                                alpha=o.alpha, eps=o.eps, scale=o.scale, step_type=x.step_type)


@register_estimator("srpo_likelihood")
def srpo_likelihood_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Steps with a known gold value credited by the exact gradient of log P(gold value), both signs, every rollout;
    the other tokens by the outcome (section 9)."""
    if x.step_gold_prob is None:
        raise UserError("advantage 'srpo_likelihood' needs the policy's P(gold value) of its likelihood steps "
                        "(step_gold_prob); set likelihood_steps")
    _check_same_shape(x.step_gold_prob, x.step_rewards, "step_gold_prob", "step_rewards")
    adv = _outcome(x, o)
    credited = x.step_mask.bool() & torch.isfinite(x.step_gold_prob)
    # the credit's sign is the sampled value against the gold one; without that flag, the step reward (exact
    # 0/1 for the verifier's choice steps) stands in for it
    right = x.step_gold_right.bool() if x.step_gold_right is not None else x.step_rewards >= o.incorrect_below
    credit = likelihood_step_credit(right, torch.where(credited, x.step_gold_prob, torch.nan), o.likelihood_objective,
                                    o.likelihood_clip)
    if x.step_gold_weight is not None:  # class-balanced credit: the objective's expectation over balanced gold values
        _check_same_shape(x.step_gold_weight, x.step_gold_prob, "step_gold_weight", "step_gold_prob")
        credit = credit * torch.where(credited, x.step_gold_weight.float(), torch.zeros_like(credit))
    return likelihood_advantages(adv, credit, credited, x.step_mask, x.token_step, x.completion_mask, alpha=o.alpha,
                                 decouple=o.likelihood_decouple)


def _exact(x: AdvantageInputs, rewards: Tensor) -> Tensor:
    if x.leaf_logp is None:
        raise UserError("the exact estimators need every leaf of a prompt enumerated and its log-probability "
                        "(rl.rollout_evidence: enumerated)")
    adv = exact_tree_advantages(rewards, x.leaf_logp, x.group_size, x.outcome_weight, x.outcome_shift)
    return adv[:, None] * x.completion_mask.float()


@register_estimator("grpo_exact")
def grpo_exact_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """GRPO's outcome over enumerated leaves: the exact expected-reward gradient (section 11)."""
    return _exact(x, x.outcome_rewards.float())


@register_estimator("srpo_exact")
def srpo_exact_estimator(x: AdvantageInputs, o: AdvantageOptions) -> Tensor:
    """Outcome plus alpha times each leaf's examined step rewards, exact over enumerated leaves (section 11)."""
    steps = (x.step_rewards.float() * x.step_mask.float()).sum(1) if x.step_rewards.shape[1] else 0.0
    return _exact(x, x.outcome_rewards.float() + o.alpha * steps)


def compute_advantages(name: str, inputs: AdvantageInputs, options: AdvantageOptions | None = None) -> Tensor:
    """Per-token advantages [B, T] of the estimator ``name`` (see :data:`ESTIMATORS`)."""
    return get_estimator(name)(inputs, options or AdvantageOptions())


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
