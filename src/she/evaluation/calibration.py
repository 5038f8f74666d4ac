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
import typing
from collections.abc import Mapping, Sequence

import numpy as np

from she.config import CalibrationMethod
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


def _prepare(probs, labels_out, gold, labels):
    """Arrays of a fit: gold class index, which pairs have probabilities, their log-probabilities, fixed labels."""
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
    return g, has, logp, fixed


def _ascend(score, k: int, grid: Sequence[float], rounds: int) -> np.ndarray:
    """Coordinate ascent of ``score(b)`` over offsets ``b`` (``b[0] = 0``): for each label but the first, every
    grid value with the others fixed, the best kept (ties keep the current value, so 0 wins when nothing helps)."""
    b = np.zeros(k)
    best = score(b)
    for _ in range(rounds):
        changed = False
        for c in range(1, k):
            for v in grid:
                trial = b.copy()
                trial[c] = v
                s = score(trial)
                if s > best + 1e-12:
                    best, b, changed = s, trial, True
        if not changed:
            break
    return b


def _fit_arrays(g, has, logp, fixed, k, method, grid, rounds):
    def predict(b: np.ndarray) -> np.ndarray:
        return np.where(has, (logp + b).argmax(1), fixed)

    if method == "grid":
        return _ascend(lambda b: _macro_f1(g, predict(b), k), k, grid, rounds)
    gold_share = np.bincount(g, minlength=k) / len(g)  # method "prior"
    return _ascend(lambda b: -np.abs(np.bincount(predict(b), minlength=k + 1)[:k] / len(g) - gold_share).sum(),
                   k, grid, rounds)


def bootstrap_draws(n: int, n_boot: int, seed: int, groups: Sequence | None = None) -> list[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap resamples of ``n`` rows; with ``groups`` (one hashable per row, e.g.
    the query) whole groups are drawn with replacement, each drawn group contributing all its rows."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} items for {n} pairs")
    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    rows = [np.array(v) for v in members.values()]
    return [np.concatenate([rows[j] for j in rng.integers(0, len(rows), len(rows))]) for _ in range(n_boot)]


CALIBRATION_METHODS = typing.get_args(CalibrationMethod)  # grid, bagged, prior


def fit_label_offsets(probs: Sequence[Mapping[str, float] | None], labels_out: Sequence[str | None],
                      gold: Sequence[str], labels: Sequence[str], *, method: str = "grid",
                      grid: Sequence[float] = DEFAULT_GRID, rounds: int = 3, n_boot: int = 50, seed: int = 0,
                      groups: Sequence | None = None) -> dict[str, float]:
    """Offsets ``{label: b}`` (first label 0) fitted on these pairs, by ``method``:

    * ``grid``: maximise the Macro F1 of the calibrated labels (coordinate ascent over ``grid``, ``rounds``
      passes). Macro F1 is a step function of ``b``, so on 1,000 pairs the maximiser is itself noisy.
    * ``bagged``: the mean of the ``grid`` fits on ``n_boot`` bootstrap resamples of the pairs (whole ``groups``,
      e.g. queries, when given; ``seed``): the same objective with the fit's own noise averaged out.
    * ``prior``: the predicted-class shares closest (L1) to the gold shares of these pairs -- two numbers matched,
      no F1 maximiser at all.

    Pure numpy; ``bagged`` equals the loop of ``grid`` fits over :func:`bootstrap_draws` (tested).
    """
    if method not in CALIBRATION_METHODS:
        raise UserError(f"calibration method {method!r}: pick one of {', '.join(CALIBRATION_METHODS)}")
    labels = list(labels)
    k = len(labels)
    g, has, logp, fixed = _prepare(probs, labels_out, gold, labels)
    if method == "bagged":
        fits = [_fit_arrays(g[ix], has[ix], logp[ix], fixed[ix], k, "grid", grid, rounds)
                for ix in bootstrap_draws(len(g), n_boot, seed, groups)]
        b = np.round(np.mean(fits, axis=0), 4)
    else:
        b = _fit_arrays(g, has, logp, fixed, k, method, grid, rounds)
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


def pool_probs(judges: Sequence[Mapping[str, float]], weights: Sequence[float] | None = None) -> dict[str, float]:
    """Several judges' label distributions of one pair pooled log-linearly:

        p(c) proportional to prod_j p_j(c) ** w_j,      w_j >= 0 summing to 1 (equal without ``weights``)

    the geometric mean, so that per-class offsets fitted on the pooled log-probabilities act as they do on one
    judge's (``log p + b``). Every judge must give the same labels (in the first judge's order); probabilities are
    floored at 1e-12 as :func:`apply_offsets` floors them. Pure; raises ``ValueError`` on mismatched labels or
    weights."""
    if not judges:
        raise ValueError("no label distributions to pool")
    labels = list(judges[0])
    if any(set(j) != set(labels) for j in judges):
        raise ValueError("the judges' label distributions are over different labels")
    w = np.full(len(judges), 1.0 / len(judges)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(judges),) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"weights {list(w)}: one non-negative weight per judge, summing to 1")
    logp = np.log(np.maximum([[float(j[c]) for c in labels] for j in judges], 1e-12))  # judges x labels
    pooled = w @ logp
    pooled = np.exp(pooled - pooled.max())
    pooled /= pooled.sum()
    return {c: float(v) for c, v in zip(labels, pooled)}


__all__ = ["CALIBRATION_METHODS", "DEFAULT_GRID", "apply_offsets", "bootstrap_draws", "fit_label_offsets", "marginalise",
           "pool_probs"]
