"""Step examiners and scalar rewards for RL: who says whether a reasoning step is right, and how sure.

SRPO needs one number in [0, 1] per reasoning step (the *step reward*) and one number per rollout (the
*outcome reward*). This module turns parsed traces into those numbers; it has no torch or TRL code, so
every rule here is a plain function that can be tested by hand.

Step examiners
--------------
A :class:`StepExaminer` is anything with ``score_steps(parsed, record) -> list[float | None]``: one entry
per ``parsed.steps`` item, a score in [0, 1] (probability-like: 1 = the step's conclusion is right) or
``None`` = "no opinion". Returning ``None`` instead of a made-up 0.5 matters: the caller decides what no
opinion means (a neutral reward, or no step reward at all), and logs how often it happened.

* :class:`VerifierExaminer` -- the offline verifier (human step facts): correct -> 1, incorrect -> 0,
  unknown -> None. Exact where it speaks, silent elsewhere.
* :class:`HybridExaminer` -- combines the verifier with an optional *judge* (any other ``StepExaminer``,
  typically a generative LM judge, which is not part of this module) and a neutral fallback, and
  reports which source decided each step so training can log the mix.

A judge plugs in by implementing ``score_steps``; if it also has
``score_steps_batch(items: list[tuple[parsed, record]]) -> list[list[float | None]]`` the hybrid
examiner calls that once per batch (an LM judge wants batched generation), and only for the traces
that still need it.

Scalar rewards
--------------
:func:`outcome_reward` (is the final label right, with optional ordinal partial credit) and
:func:`format_reward` (does the trace follow the step format).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from she.data.labels import get_taxonomy, rating_agreement
from she.errors import UserError
from she.rewards.verifier import CORRECT, INCORRECT, UNKNOWN, verify_steps

# Which source decided a step's score (values of StepScores.sources).
SOURCE_VERIFIER = "verifier"
SOURCE_JUDGE = "judge"
SOURCE_BLEND = "blend"  # verifier and judge both had an opinion and were averaged (mode="blend")
SOURCE_NEUTRAL = "neutral"  # nobody had an opinion; the neutral score was used
SOURCE_NONE = "none"  # nobody had an opinion and there is no neutral score: the step gets no reward
SOURCE_EXAMINER = "examiner"  # a plain StepExaminer that does not say where its scores come from
SOURCE_DUPLICATE = "duplicate"  # the trainer's rule: a step written again scores 0 (training/srpo.py)
SOURCE_CUT = "cut"  # the trainer's rule: every step of a trace cut by the length limit scores 0
SOURCES = (SOURCE_VERIFIER, SOURCE_JUDGE, SOURCE_BLEND, SOURCE_NEUTRAL, SOURCE_NONE, SOURCE_EXAMINER,
           SOURCE_DUPLICATE, SOURCE_CUT)

HYBRID_MODES = ("verifier_first", "blend")


@runtime_checkable
class StepExaminer(Protocol):
    """Scores each parsed step of a trace: a float in [0, 1], or None for "no opinion"."""

    def score_steps(self, parsed: Any, record: Any) -> list[float | None]: ...


@runtime_checkable
class BatchStepExaminer(Protocol):
    """A :class:`StepExaminer` that also scores many traces in one call (an LM judge wants batched generation);
    :class:`HybridExaminer` calls ``score_steps_batch`` once per batch for the traces that still need a judge.
    Both judges of :mod:`she.rewards.judge` implement it."""

    def score_steps(self, parsed: Any, record: Any) -> list[float | None]: ...

    def score_steps_batch(self, items: Sequence[tuple[Any, Any]]) -> list[list[float | None]]: ...


@dataclass(frozen=True)
class StepScores:
    """Per-step scores of one trace and, for logging, which source decided each one.

    ``scores[k]`` and ``sources[k]`` belong to ``parsed.steps[k]``; ``scores[k] is None`` exactly when
    ``sources[k] == "none"`` (nobody scored the step).
    """

    scores: list[float | None]
    sources: list[str]


def check_scores(scores: Sequence[float | None], n_steps: int, who: str) -> list[float | None]:
    """Validate an examiner's answer: one entry per step, each None or a finite number in [0, 1].

    A wrong-length answer would silently shift rewards onto the wrong steps, and a score outside [0, 1]
    would break the meaning of "neutral = 0.5" and the critical-step threshold, so both raise.
    """
    scores = list(scores)
    if len(scores) != n_steps:
        raise ValueError(f"{who} returned {len(scores)} score(s) for a trace with {n_steps} step(s)")
    out: list[float | None] = []
    for k, s in enumerate(scores):
        if s is None:
            out.append(None)
            continue
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"{who}: score of step {k} is {s!r}, expected a number in [0, 1] or None")
        v = float(s)
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{who}: score of step {k} is {v}, outside [0, 1]")
        out.append(v)
    return out


class VerifierExaminer:
    """The offline verifier as an examiner: correct -> 1.0, incorrect -> 0.0, unknown -> None.

    ``graded=True``: a set-valued step the verifier checks exactly (the coverage schema's ``Missing``, the grounded
    schema's ``Numbers``) scores the Jaccard overlap of the items said and the true items instead of 0/1. Why: an
    exact check makes a long list of missing words far riskier than ``Missing: none`` (one wrong word zeroes it),
    so a penalty-only step reward pushes the policy to write ``none`` -- the path to *Exact* (measured,
    docs/results.md). Overlap grades a mostly right list as mostly right and a wrong ``none`` (overlap 0) as
    fully wrong.

    ``rated=True``: the verdict step of a pair with a mean human rating (``record.score``, Home Depot) scores its
    agreement with that rating (:func:`she.data.labels.rating_agreement`) instead of 0/1: the raters' distance from
    the label's cut, which the gold label leaves out (docs/srpo.md, "Rated verdicts"). Without a rating, or on a
    taxonomy without a rating scale, the verdict scores 0/1 against the gold label; an unreadable verdict 0.
    """

    _SCORE = {CORRECT: 1.0, INCORRECT: 0.0, UNKNOWN: None}

    def __init__(self, graded: bool = False, rated: bool = False) -> None:
        self.graded = graded
        self.rated = rated

    def score_steps(self, parsed: Any, record: Any) -> list[float | None]:
        verdicts = verify_steps(parsed, record)
        if len(verdicts) != len(parsed.steps):  # verify_steps promises one verdict per step
            raise RuntimeError(f"verifier returned {len(verdicts)} verdicts for {len(parsed.steps)} steps")
        out: list[float | None] = []
        for v in verdicts:
            if v.verdict not in self._SCORE:
                raise ValueError(f"verifier verdict {v.verdict!r} for step {v.step} is not correct/incorrect/unknown")
            out.append(v.similarity if self.graded and v.similarity is not None else self._SCORE[v.verdict])
        if self.rated:
            out = [self._rated(step, record, sc) for step, sc in zip(parsed.steps, out)]
        return out

    @staticmethod
    def _rated(step: Any, record: Any, score: float | None) -> float | None:
        if step.kind != "label" or record.score is None or record.label is None:
            return score
        if not step.valid or step.conclusion is None:
            return 0.0
        agreement = rating_agreement(step.conclusion, record.score, record.taxonomy)
        return score if agreement is None else agreement


def combine_step_scores(
    verifier: Sequence[float | None],
    judge: Sequence[float | None] | None,
    mode: str = "verifier_first",
    weight: float = 0.5,
    neutral: float | None = 0.5,
) -> StepScores:
    """Combine per-step verifier and judge scores (pure; the rule of :class:`HybridExaminer`).

    ``verifier_first``: the verifier decides wherever it has an opinion (it checks against human facts,
    so it is right by construction where it speaks); the judge fills the gaps; ``neutral`` covers steps
    neither can score (``None`` leaves them unscored).

    ``blend``: where both have an opinion, ``weight * judge + (1 - weight) * verifier`` (``weight`` is
    the judge's share; useful when the facts are noisy, e.g. mined rather than annotated); where only one
    has, that one; otherwise ``neutral``.

    ``judge=None`` means no judge was consulted (every judge entry counts as no opinion).
    """
    if mode not in HYBRID_MODES:
        raise UserError(f"mode must be one of {HYBRID_MODES}, got {mode!r}")
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"weight must be in [0, 1], got {weight}")
    if neutral is not None and not 0.0 <= neutral <= 1.0:
        raise UserError(f"neutral must be in [0, 1] or None, got {neutral}")
    j = list(judge) if judge is not None else [None] * len(verifier)
    if len(j) != len(verifier):
        raise ValueError(f"verifier has {len(verifier)} step scores but judge has {len(j)}")
    scores: list[float | None] = []
    sources: list[str] = []
    for v, g in zip(verifier, j):
        if v is not None and g is not None and mode == "blend":
            scores.append(weight * g + (1.0 - weight) * v)
            sources.append(SOURCE_BLEND)
        elif v is not None:
            scores.append(v)
            sources.append(SOURCE_VERIFIER)
        elif g is not None:
            scores.append(g)
            sources.append(SOURCE_JUDGE)
        elif neutral is not None:
            scores.append(neutral)
            sources.append(SOURCE_NEUTRAL)
        else:
            scores.append(None)
            sources.append(SOURCE_NONE)
    return StepScores(scores, sources)


class HybridExaminer:
    """Verifier plus optional judge plus a neutral fallback; see :func:`combine_step_scores` for the rule.

    The judge is consulted only when it can change something: in ``verifier_first`` mode only for traces
    with at least one step the verifier cannot score (an LM judge is by far the most expensive part of a
    training step, and on the synthetic data the verifier covers the decisive steps).
    """

    def __init__(
        self,
        verifier: StepExaminer | None = None,
        judge: StepExaminer | None = None,
        mode: str = "verifier_first",
        weight: float = 0.5,
        neutral: float | None = 0.5,
        judge_steps: Sequence[str] | None = None,
    ) -> None:
        """``judge_steps``: the step keys the judge may score (None: all). A step type on which the judge is
        measured to be no better than chance (held-out AUC below a floor, see ``she train srpo``'s
        ``judge_auc_floor``) is left to the verifier or to the neutral score instead of paying noise."""
        combine_step_scores([], [], mode=mode, weight=weight, neutral=neutral)  # validates the settings
        self.judge_steps = None if judge_steps is None else frozenset(judge_steps)
        self.verifier = verifier if verifier is not None else VerifierExaminer()
        self.judge = judge
        self.mode = mode
        self.weight = weight
        self.neutral = neutral

    def _needs_judge(self, verifier_scores: Sequence[float | None]) -> bool:
        if self.judge is None:
            return False
        return self.mode == "blend" or any(s is None for s in verifier_scores)

    def examine_batch(self, items: Sequence[tuple[Any, Any]]) -> list[StepScores]:
        """Score many ``(parsed, record)`` traces; the judge gets one batched call when it supports it."""
        v_scores = [check_scores(self.verifier.score_steps(p, r), len(p.steps), "verifier") for p, r in items]
        need = [i for i, v in enumerate(v_scores) if self._needs_judge(v) and v]
        j_scores: dict[int, list[float | None]] = {}
        if need:
            if isinstance(self.judge, BatchStepExaminer):
                answers = list(self.judge.score_steps_batch([items[i] for i in need]))
                if len(answers) != len(need):
                    raise ValueError(f"judge.score_steps_batch returned {len(answers)} answers for {len(need)} traces")
            else:
                answers = [self.judge.score_steps(*items[i]) for i in need]
            for i, a in zip(need, answers):
                j_scores[i] = check_scores(a, len(items[i][0].steps), "judge")
                if self.judge_steps is not None:
                    j_scores[i] = [s if st.key in self.judge_steps else None
                                   for s, st in zip(j_scores[i], items[i][0].steps)]
        return [
            combine_step_scores(v, j_scores.get(i), mode=self.mode, weight=self.weight, neutral=self.neutral)
            for i, v in enumerate(v_scores)
        ]

    def examine(self, parsed: Any, record: Any) -> StepScores:
        return self.examine_batch([(parsed, record)])[0]

    def score_steps(self, parsed: Any, record: Any) -> list[float | None]:
        return self.examine(parsed, record).scores


@runtime_checkable
class SourcedExaminer(Protocol):
    """An examiner that says which source decided each step (:class:`HybridExaminer`): :func:`examine_batch`
    takes its ``examine_batch`` as is."""

    def examine_batch(self, items: Sequence[tuple[Any, Any]]) -> list[StepScores]: ...


def examine_batch(examiner: StepExaminer, items: Sequence[tuple[Any, Any]]) -> list[StepScores]:
    """Scores and sources for any examiner: uses its ``examine_batch`` when it has one (a
    :class:`HybridExaminer` knows its sources), else ``score_steps`` per trace with source
    ``verifier`` for :class:`VerifierExaminer`, ``examiner`` for anything else, ``none`` for None."""
    if isinstance(examiner, SourcedExaminer):
        out = list(examiner.examine_batch(items))
        if len(out) != len(items):
            raise ValueError(f"examine_batch returned {len(out)} results for {len(items)} traces")
        return out
    src = SOURCE_VERIFIER if isinstance(examiner, VerifierExaminer) else SOURCE_EXAMINER
    result = []
    for p, r in items:
        scores = check_scores(examiner.score_steps(p, r), len(p.steps), type(examiner).__name__)
        result.append(StepScores(scores, [src if s is not None else SOURCE_NONE for s in scores]))
    return result


def fault_counts(examiner: Any) -> dict[str, int]:
    """Cumulative fault counters of an examiner and of its judge (``fault_counts`` dicts, e.g.
    :class:`she.rewards.judge.RemoteJudge`'s), summed per key; ``{}`` when neither keeps any.

    Lets the trainer log remote-judge faults without knowing which examiner it was given.
    """
    out: dict[str, int] = {}
    for part in (examiner, getattr(examiner, "judge", None)):
        counts = getattr(part, "fault_counts", None)
        if isinstance(counts, dict):
            for k, v in counts.items():
                out[k] = out.get(k, 0) + int(v)
    return out


def outcome_reward(pred_label: str | None, gold: str, taxonomy: str, ordinal_partial_credit: bool = False) -> float:
    """1.0 for the right label, 0.0 for a wrong or missing one.

    With ``ordinal_partial_credit`` a wrong label earns ``1 - |i - j| / (K - 1)`` (i, j = ordinal grades,
    K = number of labels): on hd3 saying Partial for Exact earns 0.5, Irrelevant for Exact 0. Partial
    credit tells the policy that near misses are better than far ones on an ordered scale, at the cost
    of rewarding a hedging middle label; off by default. An unparsable label (None) always gets 0.
    """
    tax = get_taxonomy(taxonomy)
    if gold is None:
        raise UserError("outcome_reward needs a gold label (the record is unlabelled)")
    j = tax.index(gold)  # raises ValueError naming the taxonomy for a label outside it
    if pred_label is None:
        return 0.0
    try:
        i = tax.index(pred_label)
    except ValueError:
        return 0.0  # a label of another taxonomy is a wrong answer, not a crash
    if i == j:
        return 1.0
    if not ordinal_partial_credit or len(tax.labels) < 2:
        return 0.0
    return 1.0 - abs(i - j) / (len(tax.labels) - 1)


def format_reward(parsed: Any) -> float:
    """1.0 when the trace has every step once, in order, all readable, and a label; else 0.0.

    Binary on purpose: a graded "fraction of steps present" can be farmed by writing step headers with
    nothing behind them, and the step rewards already grade the content of each step.
    """
    return 1.0 if getattr(parsed, "format_ok", False) else 0.0


__all__ = [
    "HYBRID_MODES",
    "SOURCES",
    "BatchStepExaminer",
    "HybridExaminer",
    "SourcedExaminer",
    "StepExaminer",
    "StepScores",
    "VerifierExaminer",
    "check_scores",
    "combine_step_scores",
    "examine_batch",
    "fault_counts",
    "format_reward",
    "outcome_reward",
]
