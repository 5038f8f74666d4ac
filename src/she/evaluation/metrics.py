"""Classification metrics for relevance judges, written out by hand (no scikit-learn).

Why not sklearn: it is not a dependency of this package, and two of the choices we need are not its
defaults and are easy to get wrong through it:

* **Invalid predictions are wrong, never dropped.** A judge that fails to emit a parsable label (``None``)
  or emits a label outside the taxonomy has made an error. Dropping those rows would reward a model for
  refusing hard items. They are counted in ``n_invalid``, count as wrong for accuracy and recall, and
  get their own last column ``"invalid"`` in the confusion matrix.
* **Macro-F1 averages only over classes that occur in the gold labels** (support > 0). A class with no
  gold example has an undefined recall; if nobody predicted it either, its F1 is 0/0. Averaging a 0 in
  for it would make the score depend on which labels the taxonomy *could* have, not on the data. This is
  what ``sklearn.metrics.f1_score(y_true, y_pred, labels=<labels present in y_true>, average="macro",
  zero_division=0)`` computes. Such a class is still listed in ``per_class`` (precision/recall/F1 = 0.0,
  support 0) so false positives on it stay visible; ``macro_labels`` says which classes were averaged.

Undefined ratios (0/0) are reported as 0.0, like sklearn's ``zero_division=0``.

``bootstrap_ci`` gives percentile confidence intervals; with ``groups`` (e.g. the query id of every row)
it resamples whole groups (a cluster bootstrap), which is the honest choice when rows of the same query
are correlated, as they are in every search-relevance set.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

INVALID = "invalid"
STEP_VERDICTS = ("correct", "incorrect", "unknown")


def _encode(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to column indices; predictions outside ``labels`` (or None) map to ``len(labels)``."""
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels contain duplicates: {labels}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    true_idx = np.empty(len(y_true), dtype=np.int64)
    for i, t in enumerate(y_true):
        if t not in index:
            raise ValueError(f"y_true[{i}] = {t!r} is not one of the labels {labels}")
        true_idx[i] = index[t]
    pred_idx = np.array([index.get(p, k) if isinstance(p, str) else k for p in y_pred], dtype=np.int64)
    return true_idx, pred_idx


def _confusion(true_idx: np.ndarray, pred_idx: np.ndarray, k: int) -> np.ndarray:
    """[k, k+1] counts: rows = gold class, columns = predicted class, last column = invalid."""
    return np.bincount(true_idx * (k + 1) + pred_idx, minlength=k * (k + 1)).reshape(k, k + 1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised over any leading batch dims: conf has shape [..., k, k+1]."""
    k = conf.shape[-2]
    tp = np.diagonal(conf[..., :, :k], axis1=-2, axis2=-1)
    support = conf.sum(-1)  # gold count per class (row sums, invalid included)
    predicted = conf[..., :, :k].sum(-2)  # how often each class was predicted (column sums)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    macro_f1 = _safe_div((f1 * present).sum(-1), present.sum(-1))
    n = conf.sum((-2, -1))
    accuracy = _safe_div(tp.sum(-1), n)
    return {
        "tp": tp, "support": support, "predicted": predicted, "precision": precision,
        "recall": recall, "f1": f1, "macro_f1": macro_f1, "accuracy": accuracy,
    }  # fmt: skip


def classification_report(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Per-class and aggregate scores of a labelling.

    Returns a dict with

    * ``macro_f1``: mean F1 over classes with support > 0 (see module docstring for why).
    * ``accuracy``: share of rows whose prediction equals the gold label (invalid rows are wrong).
    * ``per_class``: ``{label: {"precision", "recall", "f1", "support"}}`` for every label, in order.
    * ``confusion``: list of ``len(labels)`` rows (gold) of ``len(labels) + 1`` ints (predicted, then
      ``"invalid"``). ``confusion_columns`` names the columns.
    * ``n``, ``n_invalid``: row count and number of predictions that were None or not in ``labels``.
    * ``macro_labels``: the labels averaged in ``macro_f1``.

    ``y_true`` must only contain members of ``labels`` (a ValueError names the first offending index).
    """
    labels = list(labels)
    true_idx, pred_idx = _encode(y_true, y_pred, labels)
    k = len(labels)
    conf = _confusion(true_idx, pred_idx, k)
    s = _scores_from_confusion(conf)
    per_class = {
        lab: {
            "precision": float(s["precision"][i]),
            "recall": float(s["recall"][i]),
            "f1": float(s["f1"][i]),
            "support": int(s["support"][i]),
        }
        for i, lab in enumerate(labels)
    }
    return {
        "macro_f1": float(s["macro_f1"]),
        "accuracy": float(s["accuracy"]),
        "per_class": per_class,
        "confusion": conf.tolist(),
        "confusion_columns": labels + [INVALID],
        "n": len(true_idx),
        "n_invalid": int((pred_idx == k).sum()),
        "macro_labels": [lab for i, lab in enumerate(labels) if s["support"][i] > 0],
    }


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str],
    metric: str = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Hashable] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of ``metric`` ("macro_f1" or "accuracy").

    Without ``groups`` the (gold, prediction) pairs are resampled with replacement. With ``groups`` (one
    hashable per row, e.g. the query id) whole groups are resampled: rows of one query share the query's
    difficulty, so treating them as independent gives intervals that are too narrow.

    Implementation: the confusion matrix is additive, so we build one confusion matrix per group (per row
    without ``groups``), draw for every replicate how many times each group is picked (a multinomial count
    vector), and get the replicate's confusion matrix as a weighted sum -- no per-replicate Python loop.
    Within a replicate, a class absent from the resampled gold labels is left out of the macro average,
    exactly as in ``classification_report``.
    """
    if metric not in ("macro_f1", "accuracy"):
        raise ValueError(f"metric must be 'macro_f1' or 'accuracy', got {metric!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    true_idx, pred_idx = _encode(y_true, y_pred, labels)
    k = len(list(labels))
    cell = true_idx * (k + 1) + pred_idx
    group_idx, n_groups = _group_index(groups, len(cell))
    per_group = np.zeros((n_groups, k * (k + 1)))
    np.add.at(per_group, (group_idx, cell), 1.0)
    values = np.empty(n_boot)
    for start, counts in _replicate_counts(n_groups, n_boot, seed):
        conf = (counts @ per_group).reshape(len(counts), k, k + 1)
        values[start : start + len(counts)] = _scores_from_confusion(conf)[metric]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def f1_summary(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str],
               groups: Sequence[Hashable] | None = None, n_boot: int = 1000, seed: int = 0) -> str:
    """One line for a script's report: ``"Macro F1 0.452 [0.418, 0.483]  predicted 0.34/0.29/0.36"`` -- Macro F1,
    its (query-group) bootstrap interval (:func:`bootstrap_ci`) and the share of rows predicted as each label."""
    lo, hi = bootstrap_ci(y_true, y_pred, labels, n_boot=n_boot, seed=seed, groups=groups)
    f1 = classification_report(y_true, y_pred, labels)["macro_f1"]
    shares = "/".join(f"{sum(p == lab for p in y_pred) / max(1, len(y_pred)):.2f}" for lab in labels)
    return f"Macro F1 {f1:.3f} [{lo:.3f}, {hi:.3f}]  predicted {shares}"


def _group_index(groups: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """Row -> group number (each row its own group without ``groups``), and the number of groups."""
    if groups is None:
        return np.arange(n), n
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} items but y_true has {n}")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64), len(ids)


def _replicate_counts(n_groups: int, n_boot: int, seed: int):
    """Yield ``(first replicate, counts [m, n_groups])``: how often each group is drawn in each replicate,
    in chunks that bound the memory of the count matrix."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // max(n_groups, 1)))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        yield start, rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=m)


def paired_bootstrap_diff(
    y_true: Sequence[str],
    preds_a: Sequence[Sequence[str | None]],
    preds_b: Sequence[Sequence[str | None]],
    labels: Sequence[str],
    metric: str = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(A) - metric(B)`` on the same evaluation pairs.

    ``preds_a`` / ``preds_b``: one prediction list per seed (run) of each arm, every list aligned with
    ``y_true``. Seeds are pooled: an arm's confusion matrix is the sum over its runs, so its metric is that of
    all its runs' predictions together. Each replicate resamples whole query ``groups`` once and applies the
    *same* resample to both arms (paired: the pair-to-pair difficulty that both arms share cancels, which is
    what makes the interval of a difference much narrower than two overlapping marginal intervals).
    Returns ``{"diff", "lo", "hi", "p_le_0"}`` (``p_le_0``: share of replicates with a difference <= 0).
    """
    if metric not in ("macro_f1", "accuracy"):
        raise ValueError(f"metric must be 'macro_f1' or 'accuracy', got {metric!r}")
    if not 0.0 < alpha < 1.0 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    if not preds_a or not preds_b:
        raise ValueError("each arm needs at least one prediction list")
    k = len(list(labels))
    n = len(y_true)
    group_idx, n_groups = _group_index(groups, n)

    def per_group(runs: Sequence[Sequence[str | None]]) -> np.ndarray:
        out = np.zeros((n_groups, k * (k + 1)))
        for run in runs:
            if len(run) != n:
                raise ValueError(f"a prediction list has {len(run)} items but y_true has {n}")
            t, p = _encode(y_true, run, labels)
            np.add.at(out, (group_idx, t * (k + 1) + p), 1.0)
        return out

    ga, gb = per_group(preds_a), per_group(preds_b)
    full = lambda g: float(_scores_from_confusion(g.sum(0).reshape(1, k, k + 1))[metric][0])  # noqa: E731
    diff = full(ga) - full(gb)
    values = np.empty(n_boot)
    for start, counts in _replicate_counts(n_groups, n_boot, seed):
        m = len(counts)
        va = _scores_from_confusion((counts @ ga).reshape(m, k, k + 1))[metric]
        vb = _scores_from_confusion((counts @ gb).reshape(m, k, k + 1))[metric]
        values[start : start + m] = va - vb
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_le_0": float((values <= 0).mean())}


# -- seeds as the unit: the spread of a paired difference from training run to training run --------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta I_x(a, b), with ``y = 1 - x`` passed in exactly (no cancellation near 1)."""
    if x <= 0.0 or y <= 0.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t cumulative distribution function."""
    tail = 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def seed_differences(diffs: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> dict[str, float | int | None]:
    """Training runs (seeds) as the unit of a comparison: ``diffs[k]`` is A - B on the same evaluation pairs
    for the k-th seed of both arms (A and B trained with that seed).

    The paired query bootstrap (:func:`paired_bootstrap_diff`) sees only which test pairs were drawn; a second
    training run of the same arm moves its score too. Here the seed-to-seed spread is the noise: the mean
    difference, its standard deviation over seeds (``ddof=1``), the Student-t interval of the mean
    (``n - 1`` degrees of freedom), and ``seeds_needed``: about how many seeds a two-sided test at ``alpha``
    needs to detect the observed mean with probability ``power`` at that spread (the normal-approximation
    formula ``((z_{1-alpha/2} + z_power) sd / mean)^2``, rounded up; ``None`` when the mean is 0).
    With one seed there is no spread: ``sd``, the interval and ``seeds_needed`` are ``None``.
    """
    from statistics import NormalDist

    d = np.asarray(list(diffs), dtype=float)
    if d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"need one or more finite differences, got {list(diffs)}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"need 0 < alpha < 1 and 0 < power < 1, got alpha={alpha}, power={power}")
    n, mean = int(d.size), float(d.mean())
    out: dict[str, float | int | None] = {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None,
                                          "seeds_needed": None}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = t_quantile(1.0 - alpha / 2.0, n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, lo=mean - half, hi=mean + half)
    if mean != 0.0:
        z = NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)
        out["seeds_needed"] = int(np.ceil((z * sd / abs(mean)) ** 2))
    return out


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the average rank of their block (as ``scipy.stats.rankdata``).
    A NaN, an infinity or a None has no rank: ``ValueError`` (a made-up rank would be a wrong AUC or correlation)."""
    x = np.asarray(values, dtype=float)
    if not np.isfinite(x).all():
        raise ValueError(f"cannot rank non-finite values (first at index {int(np.flatnonzero(~np.isfinite(x))[0])})")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on the average ranks. None when either side is constant (undefined)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2.

    Computed from average ranks (Mann-Whitney U), O(n log n). None when one class is absent (the AUC
    is undefined then, and 0.5 would be a made-up number).
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(scores)
    rank_sum = float(sum(r for r, y in zip(ranks, labels) if y))
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def step_accuracy(verdicts: Sequence[Sequence[str]]) -> dict:
    """Summarise step-level verdicts (one list per rollout, each "correct" / "incorrect" / "unknown").

    "unknown" means the checker could not decide (e.g. the product text does not say); it is neither right
    nor wrong, so ``accuracy`` = correct / (correct + incorrect) and ``coverage`` = known / all steps.
    ``accuracy`` is None when no step is known, ``coverage`` None when there are no steps -- a number there
    would be invented. ``rollouts_all_correct`` is the share of rollouts (with at least one step) with no
    incorrect step, a stricter view since one wrong step usually decides the label.
    """
    counts = dict.fromkeys(STEP_VERDICTS, 0)
    n_with_steps = 0
    n_clean = 0
    for r, steps in enumerate(verdicts):
        if isinstance(steps, str):
            raise ValueError(f"verdicts[{r}] is a string; expected a list of verdict strings")
        for s, v in enumerate(steps):
            if v not in counts:
                raise ValueError(f"verdicts[{r}][{s}] = {v!r}; expected one of {STEP_VERDICTS}")
            counts[v] += 1
        if len(steps):
            n_with_steps += 1
            n_clean += "incorrect" not in steps
    known = counts["correct"] + counts["incorrect"]
    total = known + counts["unknown"]
    return {
        "accuracy": counts["correct"] / known if known else None,
        "coverage": known / total if total else None,
        "n_steps": total,
        "n_correct": counts["correct"],
        "n_incorrect": counts["incorrect"],
        "n_unknown": counts["unknown"],
        "n_rollouts": len(verdicts),
        "rollouts_all_correct": n_clean / n_with_steps if n_with_steps else None,
    }


__all__ = ["average_ranks", "classification_report", "bootstrap_ci", "f1_summary", "paired_bootstrap_diff", "roc_auc", "seed_differences",
           "spearman", "step_accuracy",
           "t_cdf", "t_quantile", "INVALID", "STEP_VERDICTS"]
