"""Tests for she.evaluation.metrics: hand-computed examples first, then properties and sklearn agreement."""

from __future__ import annotations

import random

import numpy as np
import pytest

from she.evaluation.metrics import average_ranks, bootstrap_ci, classification_report, spearman, step_accuracy

HD3 = ["Irrelevant", "Partial", "Exact"]
ESCI4 = ["Irrelevant", "Complement", "Substitute", "Exact"]

# A 3-class example computed by hand.
#   row  gold        predicted
#   0    Exact       Exact        correct
#   1    Exact       Partial
#   2    Exact       None         invalid (no parsable label)
#   3    Partial     Partial      correct
#   4    Partial     Exact
#   5    Irrelevant  Irrelevant   correct
#   6    Irrelevant  Partial
#   7    Exact       "Relevant"   invalid (not in the taxonomy)
# Confusion (rows gold I,P,E; cols predicted I,P,E,invalid):
#   I: [1, 1, 0, 0]   support 2
#   P: [0, 1, 1, 0]   support 2
#   E: [0, 1, 1, 2]   support 4
# Column sums (times predicted): I 1, P 3, E 2.
#   Irrelevant: P = 1/1, R = 1/2, F1 = 2*1*(1/2) / (3/2) = 2/3
#   Partial:    P = 1/3, R = 1/2, F1 = 2*(1/6) / (5/6)   = 2/5
#   Exact:      P = 1/2, R = 1/4, F1 = 2*(1/8) / (3/4)   = 1/3
#   macro F1 = (2/3 + 2/5 + 1/3) / 3 = 1.4 / 3 ; accuracy = 3/8 (invalid rows count as wrong)
Y_TRUE = ["Exact", "Exact", "Exact", "Partial", "Partial", "Irrelevant", "Irrelevant", "Exact"]
Y_PRED = ["Exact", "Partial", None, "Partial", "Exact", "Irrelevant", "Partial", "Relevant"]


def test_hand_computed_three_class_report():
    r = classification_report(Y_TRUE, Y_PRED, HD3)
    assert r["confusion"] == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 2]]
    assert r["confusion_columns"] == HD3 + ["invalid"]
    assert r["n"] == 8 and r["n_invalid"] == 2
    assert r["accuracy"] == pytest.approx(3 / 8)
    pc = r["per_class"]
    assert pc["Irrelevant"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert pc["Partial"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 2 / 5, "support": 2})
    assert pc["Exact"] == pytest.approx({"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4})
    assert r["macro_f1"] == pytest.approx(1.4 / 3)
    assert r["macro_labels"] == HD3


def test_invalid_predictions_are_never_dropped():
    # Same gold labels, every prediction invalid: accuracy 0 and all rows land in the invalid column.
    r = classification_report(Y_TRUE, [None] * 8, HD3)
    assert r["accuracy"] == 0.0 and r["macro_f1"] == 0.0
    assert r["n_invalid"] == 8
    assert [row[-1] for row in r["confusion"]] == [2, 2, 4]
    assert sum(map(sum, r["confusion"])) == 8


def test_zero_support_class_is_reported_but_not_averaged():
    # ESCI example where nobody is a Complement in gold, but the model predicts Complement once.
    #   Exact:      tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    #   Complement: tp 0, predicted 1, support 0 -> P 0, R 0 (undefined -> 0), F1 0, excluded from macro
    #   Irrelevant: tp 1, predicted 1, support 1 -> F1 1
    #   Substitute: tp 0, predicted 0, support 1 -> F1 0
    #   macro over {Irrelevant, Substitute, Exact} = (1 + 0 + 1/2) / 3 = 0.5 ; accuracy 2/4
    y_true = ["Exact", "Exact", "Irrelevant", "Substitute"]
    y_pred = ["Exact", "Complement", "Irrelevant", "Exact"]
    r = classification_report(y_true, y_pred, ESCI4)
    assert r["per_class"]["Complement"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["per_class"]["Exact"]["f1"] == pytest.approx(0.5)
    assert r["macro_labels"] == ["Irrelevant", "Substitute", "Exact"]
    assert r["macro_f1"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["confusion"][1] == [0, 0, 0, 0, 0]  # Complement row is empty
    assert [row[1] for row in r["confusion"]] == [0, 0, 0, 1]  # one false Complement, gold Exact


@pytest.mark.parametrize(
    "y_true, y_pred, labels, match",
    [
        (["Exact", "Nope"], ["Exact", "Exact"], HD3, r"y_true\[1\] = 'Nope'"),
        (["Exact"], ["Exact", "Exact"], HD3, "1 items but y_pred has 2"),
        ([], [], HD3, "zero examples"),
        (["Exact"], ["Exact"], [], "labels must not be empty"),
        (["Exact"], ["Exact"], ["Exact", "Exact"], "duplicates"),
    ],
)
def test_bad_input_raises_clear_errors(y_true, y_pred, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_report(y_true, y_pred, labels)


def _random_labelling(n: int, seed: int, p_correct: float = 0.6):
    rng = random.Random(seed)
    y_true = [rng.choice(HD3) for _ in range(n)]
    y_pred = [t if rng.random() < p_correct else rng.choice(HD3 + [None, "junk"]) for t in y_true]
    return y_true, y_pred


def test_report_matches_loop_reference_on_random_data():
    # Independent pure-Python computation of macro F1 / accuracy from the definitions.
    for seed in range(5):
        y_true, y_pred = _random_labelling(57, seed)
        f1s = []
        for c in HD3:
            tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
            npred = sum(p == c for p in y_pred)
            sup = sum(t == c for t in y_true)
            prec = tp / npred if npred else 0.0
            rec = tp / sup if sup else 0.0
            if sup:
                f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        r = classification_report(y_true, y_pred, HD3)
        assert r["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
        assert r["accuracy"] == pytest.approx(sum(t == p for t, p in zip(y_true, y_pred)) / 57)
        assert r["n_invalid"] == sum(p not in HD3 for p in y_pred)


def test_agrees_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    for seed in range(5):
        y_true, y_pred = _random_labelling(80, seed)
        r = classification_report(y_true, y_pred, HD3)
        y_pred_s = [p if p in HD3 else "__invalid__" for p in y_pred]
        present = [c for c in HD3 if c in y_true]
        ref = skm.f1_score(y_true, y_pred_s, labels=present, average="macro", zero_division=0)
        assert r["macro_f1"] == pytest.approx(ref)
        assert r["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred_s))
        cm = skm.confusion_matrix(y_true, y_pred_s, labels=HD3 + ["__invalid__"])
        assert r["confusion"] == cm[:3].tolist()


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_perfect_predictions_gives_degenerate_interval():
    y = ["Exact", "Partial", "Irrelevant"] * 10
    assert bootstrap_ci(y, y, HD3, n_boot=200) == (1.0, 1.0)


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    y_true, y_pred = _random_labelling(300, seed=1)
    point = classification_report(y_true, y_pred, HD3)["macro_f1"]
    a = bootstrap_ci(y_true, y_pred, HD3, n_boot=300, seed=3)
    b = bootstrap_ci(y_true, y_pred, HD3, n_boot=300, seed=3)
    c = bootstrap_ci(y_true, y_pred, HD3, n_boot=300, seed=4)
    assert a == b and a != c
    lo, hi = a
    assert lo < point < hi
    # For n = 300 and F1 ~ 0.6 the 95% interval is roughly +-0.06; check the order of magnitude.
    assert 0.04 < hi - lo < 0.25


def test_bootstrap_replicates_match_resampled_reports():
    # White-box: rebuild each replicate's resampled dataset from the same multinomial counts the function
    # draws (one rng.multinomial call when n_boot * n is small) and score it with classification_report.
    y_true, y_pred = _random_labelling(40, seed=2)
    n, n_boot, alpha = 40, 50, 0.2
    counts = np.random.default_rng(7).multinomial(n, np.full(n, 1 / n), size=n_boot)
    vals = []
    for row in counts:
        idx = [i for i in range(n) for _ in range(row[i])]
        vals.append(classification_report([y_true[i] for i in idx], [y_pred[i] for i in idx], HD3)["accuracy"])
    expected = tuple(np.quantile(vals, [alpha / 2, 1 - alpha / 2]))
    got = bootstrap_ci(y_true, y_pred, HD3, metric="accuracy", n_boot=n_boot, seed=7, alpha=alpha)
    assert got == pytest.approx(expected)


def test_cluster_bootstrap_is_wider_for_correlated_rows():
    # 20 queries x 50 rows; within a query every row is right or every row is wrong (fully correlated).
    # Pairs bootstrap sees n = 1000 and is narrow; resampling queries sees 20 units and must be wider.
    y_true, y_pred, groups = [], [], []
    for q in range(20):
        right = q % 2 == 0
        for j in range(50):
            t = HD3[j % 3]
            y_true.append(t)
            y_pred.append(t if right else HD3[(j + 1) % 3])
            groups.append(f"q{q}")
    lo_p, hi_p = bootstrap_ci(y_true, y_pred, HD3, metric="accuracy", n_boot=400)
    lo_c, hi_c = bootstrap_ci(y_true, y_pred, HD3, metric="accuracy", n_boot=400, groups=groups)
    assert hi_c - lo_c > 2.5 * (hi_p - lo_p)
    assert lo_c < 0.5 < hi_c


def test_singleton_groups_equal_pairs_bootstrap():
    y_true, y_pred = _random_labelling(60, seed=5)
    pairs = bootstrap_ci(y_true, y_pred, HD3, n_boot=100, seed=9)
    singles = bootstrap_ci(y_true, y_pred, HD3, n_boot=100, seed=9, groups=list(range(60)))
    assert pairs == singles


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        bootstrap_ci(Y_TRUE, Y_PRED, HD3, metric="f2")
    with pytest.raises(ValueError, match="groups has 3 items"):
        bootstrap_ci(Y_TRUE, Y_PRED, HD3, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(Y_TRUE, Y_PRED, HD3, alpha=1.5)


# ---------------------------------------------------------------- step accuracy


def test_step_accuracy_hand_example():
    # correct 3, incorrect 1, unknown 1 -> accuracy 3/4 among known, coverage 4/5.
    # Rollouts with steps: 2; without an incorrect step: 1 -> rollouts_all_correct 1/2.
    r = step_accuracy([["correct", "incorrect", "unknown"], ["correct", "correct"], []])
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["coverage"] == pytest.approx(0.8)
    assert (r["n_steps"], r["n_correct"], r["n_incorrect"], r["n_unknown"]) == (5, 3, 1, 1)
    assert r["n_rollouts"] == 3
    assert r["rollouts_all_correct"] == pytest.approx(0.5)


def test_step_accuracy_undefined_values_are_none_not_invented():
    r = step_accuracy([["unknown", "unknown"]])
    assert r["accuracy"] is None and r["coverage"] == 0.0
    r = step_accuracy([[], []])
    assert r["accuracy"] is None and r["coverage"] is None and r["rollouts_all_correct"] is None


def test_step_accuracy_rejects_unknown_verdicts():
    with pytest.raises(ValueError, match=r"verdicts\[1\]\[0\] = 'right'"):
        step_accuracy([["correct"], ["right"]])
    with pytest.raises(ValueError, match="is a string"):
        step_accuracy(["correct"])


# -- paired bootstrap of a difference (seeds pooled) ----------------------------------------------------------

from she.evaluation.metrics import paired_bootstrap_diff  # noqa: E402


def test_paired_bootstrap_identical_arms_is_exactly_zero():
    y = ["a", "b", "c", "a", "b", "c"]
    p = ["a", "a", "c", "b", "b", "c"]
    r = paired_bootstrap_diff(y, [p], [p], ["a", "b", "c"], n_boot=200, groups=[1, 1, 2, 2, 3, 3])
    assert r["diff"] == 0.0 and r["lo"] == 0.0 and r["hi"] == 0.0 and r["p_le_0"] == 1.0


def test_paired_bootstrap_point_estimate_pools_seeds():
    labels = ["a", "b", "c"]
    y = ["a", "b", "c", "a", "b", "c"]
    a1, a2 = ["a", "b", "c", "a", "a", "a"], ["a", "b", "b", "a", "b", "c"]
    b = ["a", "a", "a", "a", "a", "a"]
    r = paired_bootstrap_diff(y, [a1, a2], [b], labels, n_boot=300, seed=1)
    pooled = classification_report(y + y, a1 + a2, labels)["macro_f1"]  # seeds pooled = predictions concatenated
    assert r["diff"] == pytest.approx(pooled - classification_report(y, b, labels)["macro_f1"])
    assert r["lo"] <= r["diff"] <= r["hi"] and r["diff"] > 0


def test_paired_interval_is_narrower_than_the_marginal_ones():
    """Both arms share the pairs' difficulty: the paired interval of the difference is much narrower than the
    width of either arm's own interval when the arms agree on most pairs."""
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    y = list(rng.choice(labels, 400))
    base = [t if rng.random() < 0.5 else str(rng.choice(labels)) for t in y]
    better = [t if (rng.random() < 0.15) else p for t, p in zip(y, base)]  # fixes ~15 % of pairs
    groups = [i // 4 for i in range(400)]
    r = paired_bootstrap_diff(y, [better], [base], labels, n_boot=1000, groups=groups)
    lo, hi = bootstrap_ci(y, better, labels, n_boot=1000, groups=groups)
    assert r["lo"] > 0 and (r["hi"] - r["lo"]) < 0.6 * (hi - lo)


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match="prediction list has 1 items"):
        paired_bootstrap_diff(["a", "b"], [["a"]], [["a", "b"]], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap_diff(["a"], [], [["a"]], ["a"])


# -- seeds as the unit of a comparison ------------------------------------------------------------------------

from she.evaluation.metrics import seed_differences, t_cdf, t_quantile  # noqa: E402


@pytest.mark.parametrize("p,df,expected", [(0.975, 1, 12.706204736174698), (0.975, 2, 4.302652729749464),
                                           (0.975, 4, 2.7764451051977934), (0.9, 10, 1.3721836411103356),
                                           (0.025, 3, -3.182446305284263), (0.5, 7, 0.0)])
def test_t_quantile_matches_the_tables(p, df, expected):
    """Printed t tables (Student's t, two-sided 95 % at 1, 2 and 4 degrees of freedom; 90 % one-sided at 10)."""
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-7)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_t_cdf_matches_scipy_on_a_grid():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 12.5, 40):
        for t in (-30.0, -4.0, -1.0, -0.1, 0.0, 0.3, 2.0, 9.0):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-10)


def test_seed_differences_by_hand():
    """Two seeds, +0.01 and +0.03: mean 0.02, sd sqrt(2) * 0.01, half-width t(0.975, 1) * sd / sqrt(2) =
    12.7062 * 0.01; seeds needed ((1.95996 + 0.84162) * 0.0141421 / 0.02)^2 = 3.92 -> 4."""
    r = seed_differences([0.01, 0.03])
    assert r["n"] == 2 and r["mean"] == pytest.approx(0.02)
    assert r["sd"] == pytest.approx(0.01 * np.sqrt(2))
    assert r["lo"] == pytest.approx(0.02 - 0.127062047, abs=1e-8)
    assert r["hi"] == pytest.approx(0.02 + 0.127062047, abs=1e-8)
    assert r["seeds_needed"] == 4
    assert all(type(v) in (int, float) for v in r.values())  # plain numbers: the summary goes into JSON as it is


def test_seed_differences_one_seed_and_bad_input():
    r = seed_differences([-0.012])
    assert r["n"] == 1 and r["mean"] == pytest.approx(-0.012)
    assert r["sd"] is None and r["lo"] is None and r["hi"] is None and r["seeds_needed"] is None
    assert seed_differences([0.01, -0.01])["seeds_needed"] is None  # mean 0: no effect to detect
    with pytest.raises(ValueError, match="one or more finite"):
        seed_differences([])
    with pytest.raises(ValueError, match="one or more finite"):
        seed_differences([0.1, float("nan")])
    with pytest.raises(ValueError, match="0 < power < 1"):
        seed_differences([0.1, 0.2], power=1.0)


def test_f1_summary_line_by_hand():
    from she.evaluation.metrics import f1_summary

    labels = ["Irrelevant", "Partial", "Exact"]
    gold = ["Irrelevant", "Partial", "Exact", "Exact"]
    pred = ["Irrelevant", "Exact", "Exact", None]
    # F1: Irrelevant 1, Partial 0, Exact 2*1/(2+2) = 0.5 -> 0.5; predicted shares 1/4, 0, 2/4 (None counts in n)
    line = f1_summary(gold, pred, labels, groups=["a", "b", "c", "d"], n_boot=50)
    assert line.startswith("Macro F1 0.500 [") and line.endswith("predicted 0.25/0.00/0.50")
    lo, hi = (float(x) for x in line.split("[")[1].split("]")[0].split(", "))
    assert 0.0 <= lo <= hi <= 1.0


# ---------------------------------------------------------------- ranks (scripts/rating_rank.py)


def test_average_ranks_and_spearman_by_hand():
    assert average_ranks([0.3, 0.1, 0.3, 0.2]).tolist() == [3.5, 1.0, 3.5, 2.0]  # the tied pair shares ranks 3 and 4
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x 1,2,3,4 and y 1,3,2,4: Pearson of the ranks = 1 - 6 * 2 / (4 * 15) = 0.8 (no ties)
    assert spearman([0.1, 0.2, 0.3, 0.4], [5.0, 7.0, 6.0, 8.0]) == pytest.approx(0.8)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # a constant side: undefined, not 0
    with pytest.raises(ValueError):
        spearman([1, 2], [1])
    for bad in ([0.1, float("nan")], [0.1, None], [float("inf"), 0.2]):
        with pytest.raises(ValueError, match="non-finite"):
            average_ranks(bad)


def test_spearman_agrees_with_scipy_on_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(0, 5, 60).astype(float), rng.normal(size=60)  # many ties on x
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
        assert average_ranks(x).tolist() == pytest.approx(stats.rankdata(x).tolist())
