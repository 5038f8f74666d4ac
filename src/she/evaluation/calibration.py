"""Calibrated verdicts: read the label from the verdict-token probabilities with per-class offsets.

A reasoning judge writes its steps, then a label. Greedy decoding picks the most likely label token; when the
fine-tune left a prior towards one class (SmolLM2 after SFT says *Exact* for most pairs) the argmax collapses
onto it even where the probabilities still rank the pairs. Per-class log-prior offsets fix the decision rule
without touching the reasoning:

    label = argmax_c ( log p_c + b_c ),      b_{first label} = 0

``p`` is the softmax over the label tokens at the verdict position
(:func:`she.evaluation.generate.generate_judgements`). ``b`` is fitted to maximise Macro F1 on a
*validation* split of the training queries (never the test pairs) by coordinate ascent over a grid, saved
with the model (``she.json`` ``label_offsets``) and used by ``she eval``, ``she predict`` and ``she serve``.
A pair without label probabilities (no readable verdict) keeps its generated label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from she.errors import UserError

# wide and fine: a reasoning judge whose verdict follows from a label-derived step is very peaked (p ~ 0.9999 on
# the argmax after SFT on Home Depot); the ranking left is in the residual probabilities, which offsets of
# several nats reach (measured: +-4 changed nothing, docs/results.md) -- steps of 0.5 from -12 to 12. A judge
# that reads its verdict off computed evidence (schema: evidence) is soft (max p ~0.44), and there 0.5 nat
# moves a third of the pairs at once -- steps of 0.05 from -2 to 2.
DEFAULT_GRID = tuple(sorted({round(float(x), 2) for x in np.linspace(-12.0, 12.0, 49)}
                            | {round(float(x), 2) for x in np.linspace(-2.0, 2.0, 81)}))


def apply_offsets(probs: Mapping[str, float] | None, label: str | None,
                  offsets: Mapping[str, float] | None) -> str | None:
    """The calibrated label of one pair: ``argmax_c log p_c + b_c`` (ties: the first label in ``probs``' order);
    ``label`` unchanged without probabilities or offsets."""
    if not probs or not offsets:
        return label
    best, best_v = label, -math.inf
    for c, p in probs.items():
        v = math.log(max(float(p), 1e-12)) + float(offsets.get(c, 0.0))
        if v > best_v:
            best, best_v = c, v
    return best


def _macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    f1s = []
    for c in range(k):
        support = (gold == c).sum()
        if not support:
            continue
        tp = ((gold == c) & (pred == c)).sum()
        n_pred = (pred == c).sum()
        f1s.append(0.0 if tp == 0 else 2 * tp / (support + n_pred))
    return float(np.mean(f1s)) if f1s else 0.0


def fit_label_offsets(probs: Sequence[Mapping[str, float] | None], labels_out: Sequence[str | None],
                      gold: Sequence[str], labels: Sequence[str], *, grid: Sequence[float] = DEFAULT_GRID,
                      rounds: int = 3) -> dict[str, float]:
    """Offsets ``{label: b}`` (first label 0) maximising Macro F1 of the calibrated labels on these pairs.

    Coordinate ascent: for each label but the first, try every grid value with the others fixed, keep the
    best (ties keep the current value, so 0 wins when nothing helps); ``rounds`` passes. Pure numpy.
    """
    labels = list(labels)
    k = len(labels)
    if len(probs) != len(gold) or len(labels_out) != len(gold):
        raise ValueError(f"probs ({len(probs)}), labels_out ({len(labels_out)}) and gold ({len(gold)}) differ in length")
    if not gold:
        raise UserError("no pairs to fit offsets on")
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in index})
    if unknown:
        raise UserError(f"gold labels {unknown} are not among {labels}")
    g = np.array([index[x] for x in gold])
    has = np.array([p is not None and all(lab in p for lab in labels) for p in probs])
    logp = np.zeros((len(gold), k))
    for i, p in enumerate(probs):
        if has[i]:
            logp[i] = [math.log(max(float(p[lab]), 1e-12)) for lab in labels]
    fixed = np.array([index.get(x, k) if x is not None else k for x in labels_out])  # k = invalid

    def predict(b: np.ndarray) -> np.ndarray:
        return np.where(has, (logp + b).argmax(1), fixed)

    b = np.zeros(k)
    best = _macro_f1(g, predict(b), k)
    for _ in range(rounds):
        changed = False
        for c in range(1, k):
            for v in grid:
                trial = b.copy()
                trial[c] = v
                score = _macro_f1(g, predict(trial), k)
                if score > best + 1e-12:
                    best, b, changed = score, trial, True
        if not changed:
            break
    return {lab: float(b[i]) for i, lab in enumerate(labels)}


def marginalise(step_probs: Mapping[str, float], branch_probs: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The verdict distribution with one step read as a probability, not a token (``evidence: marginal``):

        P(label) = sum_v P(step = v) * P(label | step = v)

    ``step_probs``: ``{v: P(step = v)}`` over the step's choices (sums to 1); ``branch_probs``: ``{v: {label:
    P(label | v)}}``, one verdict distribution per choice, all over the same labels (in the first branch's order).
    Pure; raises ``ValueError`` on a choice without a branch or branches over different labels."""
    if not step_probs:
        raise ValueError("no step probabilities to marginalise over")
    missing = [v for v in step_probs if v not in branch_probs]
    if missing:
        raise ValueError(f"no verdict distribution for step value(s) {missing}")
    labels = list(branch_probs[next(iter(step_probs))])
    if any(set(branch_probs[v]) != set(labels) for v in step_probs):
        raise ValueError("the branches' verdict distributions are over different labels")
    return {lab: float(sum(float(pv) * float(branch_probs[v][lab]) for v, pv in step_probs.items())) for lab in labels}


__all__ = ["DEFAULT_GRID", "apply_offsets", "fit_label_offsets", "marginalise"]
