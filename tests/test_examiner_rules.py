"""Issue 10, part 0: the step-reward rules that let SRPO farm the majority path, each pinned by a test.

A  steps are checked as a combination: given the rollout's own Type, an Attributes line from which the
   guideline cannot reach the gold label is wrong (the Exact path is wrong on a Partial pair).
C  repeated steps earn nothing; a step's credit covers its line break.
D  a trace cut by the length limit earns no step credit; its cut last line is wrong, not graded on what is left.
(B, the pooled normalisation, is pinned in tests/test_advantages.py.)
"""

import pytest

from she.data.schema import Product, Record
from she.reasoning.parse import parse_trace
from she.reasoning.schema import builtin_schema
from she.rewards.verifier import verify_steps

SCHEMA = builtin_schema("hd3")


def rec(label):
    return Record(id="r", query="dewalt drill", product=Product(title="DeWalt 20V Drill"), label=label)


def verdicts(trace, label):
    return {v.step: v.verdict for v in verify_steps(parse_trace(trace, SCHEMA), rec(label))}


def trace(type_, attrs, verdict="Exact"):
    return f"Query: drill\nProduct: drill\nType: {type_}\nAttributes: {attrs}\nVerdict: {verdict}"


# -- A: the combination of Type and Attributes against the gold label ------------------------------------------
def test_exact_path_is_wrong_on_a_partial_pair():
    v = verdicts(trace("same", "none"), "Partial")
    assert v["Type"] == "unknown"  # same is possible for Partial (with a mismatch): alone it is not wrong
    assert v["Attributes"] == "incorrect"  # but same + no mismatch implies Exact, which the label excludes


def test_exact_path_with_matches_is_wrong_on_a_partial_pair():
    assert verdicts(trace("same", "brand=match"), "Partial")["Attributes"] == "incorrect"


def test_partial_path_is_not_certain_on_a_partial_pair():
    # same + a mismatch reaches Partial, but which attribute mismatches is not known from the label
    v = verdicts(trace("same", "brand=mismatch", "Partial"), "Partial")
    assert v["Type"] == "unknown" and v["Attributes"] == "unknown"
    # related reaches Partial whatever the attributes say
    assert verdicts(trace("related", "none", "Partial"), "Partial")["Attributes"] == "unknown"


def test_exact_pair_rules_unchanged():
    v = verdicts(trace("same", "none"), "Exact")
    assert v["Type"] == "correct" and v["Attributes"] == "correct"
    assert verdicts(trace("same", "brand=mismatch"), "Exact")["Attributes"] == "incorrect"


def test_irrelevant_pair_with_the_exact_path():
    v = verdicts(trace("same", "none"), "Irrelevant")
    assert v["Type"] == "incorrect"
    # the Type is already wrong; the Attributes line alone cannot reach Irrelevant from any type it
    # does not state, so it is left to the judge
    assert v["Attributes"] == "unknown"


def test_unparsable_attributes_is_wrong_for_every_label():
    for label in ("Exact", "Partial", "Irrelevant"):
        assert verdicts(trace("same", "looks fine to me"), label)["Attributes"] == "incorrect", label


def test_graded_missing_scores_word_overlap():
    from she.reasoning.schema import coverage_schema
    from she.rewards.hybrid import VerifierExaminer

    schema = coverage_schema("hd3")
    r = Record(id="r", query="cordless dewalt drill bits", product=Product(title="DeWalt 20V Drill"), label="Partial")
    # true missing words: cordless, bits (stems); "cordless" alone: overlap 1/2; "none": 0; both: 1
    scores = {}
    for said in ("cordless", "none", "cordless, bits", "cordless, bits, red"):
        parsed = parse_trace(f"Query: q\nProduct: p\nMissing: {said}\nType: same\nAttributes: brand=mismatch\n"
                             "Verdict: Partial", schema)
        exact = VerifierExaminer().score_steps(parsed, r)[2]
        graded = VerifierExaminer(graded=True).score_steps(parsed, r)[2]
        scores[said] = (exact, graded)
    assert scores == {"cordless": (0.0, 0.5), "none": (0.0, 0.0), "cordless, bits": (1.0, 1.0),
                      "cordless, bits, red": (0.0, 2 / 3)}


# -- rated verdicts: the verdict step against the pair's mean human rating (docs/srpo.md, "Rated verdicts") -------
def test_rating_agreement_by_hand():
    from she.data.labels import rating_agreement

    # hd3 grades stand for ratings 1 / 2 / 3 on the raters' 1..3 scale: 1 - |rating - grade| / 2
    assert rating_agreement("Exact", 3.0, "hd3") == 1.0
    assert rating_agreement("Exact", 2.0, "hd3") == 0.5
    assert rating_agreement("Irrelevant", 3.0, "hd3") == 0.0
    assert rating_agreement("Partial", 2.5, "hd3") == pytest.approx(0.75)
    assert rating_agreement("exact", 1.5, "hd3") == pytest.approx(0.25)  # any spelling the taxonomy accepts
    assert rating_agreement("Exact", 2.0, "esci4") is None  # no rating scale behind ESCI's labels
    with pytest.raises(ValueError, match="outside"):
        rating_agreement("Exact", 4.0, "hd3")
    with pytest.raises(ValueError):
        rating_agreement("Substitute", 2.0, "hd3")


def test_rated_verifier_scores_the_verdict_by_the_rating():
    from she.rewards.hybrid import VerifierExaminer

    def scored(verdict, score, label="Partial", rated=True):
        r = Record(id="r", query="dewalt drill", product=Product(title="DeWalt 20V Drill"), label=label, score=score)
        return VerifierExaminer(rated=rated).score_steps(parse_trace(trace("same", "none", verdict), SCHEMA), r)

    # a Partial pair rated 2.33: Partial agrees 1 - 0.33 / 2, Exact 1 - 0.67 / 2, Irrelevant 1 - 1.33 / 2
    assert scored("Partial", 2.33)[-1] == pytest.approx(0.835)
    assert scored("Exact", 2.33)[-1] == pytest.approx(0.665)
    assert scored("Irrelevant", 2.33)[-1] == pytest.approx(0.335)
    assert scored("Exact", 2.0)[-1] == pytest.approx(0.5)  # the same wrong label, a lower rating: less credit
    assert scored("maybe", 2.33)[-1] == 0.0  # an unreadable verdict earns nothing
    assert scored("Exact", None)[-1] == 0.0  # no rating: the gold label's 0/1
    assert scored("Partial", None)[-1] == 1.0
    assert scored("Exact", 2.33, rated=False)[-1] == 0.0  # off: 0/1 as before
    # the other steps are scored as without it
    assert scored("Exact", 2.33)[:-1] == scored("Exact", 2.33, rated=False)[:-1]


def test_rated_verdict_needs_the_verdict_step_rewarded():
    from she.config import RLJobConfig
    from she.errors import UserError
    from she.training.rl import build_examiner

    exact = {"advantage": "srpo_exact", "rollout_evidence": "enumerated"}
    assert build_examiner(RLJobConfig(rated_verdict=True, reward_steps=["Relevant", "Verdict"], **exact)).rated
    assert build_examiner(RLJobConfig(rated_verdict=True, **exact)).rated  # reward_steps null: every step
    for bad in (RLJobConfig(rated_verdict=True, reward_steps=["Relevant"], **exact),
                RLJobConfig(rated_verdict=True, step_rewards=False, **exact),
                RLJobConfig(rated_verdict=True),  # srpo_gated: a degree read as a flaw threshold
                RLJobConfig(rated_verdict=True, advantage="srpo_likelihood")):
        with pytest.raises(UserError, match="rated_verdict"):
            build_examiner(bad)


def test_ratings_outside_the_scale_are_refused_up_front():
    from she.data.labels import check_rating_scale
    from she.errors import UserError

    good = [Record(id="a", query="q", product=Product(title="t"), label="Exact", score=3.0),
            Record(id="b", query="q", product=Product(title="t"), label="Exact", score=None),
            Record(id="c", query="q", product=Product(title="t"), label="Exact", score=7.0, taxonomy="esci4")]
    check_rating_scale(good, "rl.rated_verdict")  # no scale for esci4, no score: nothing to check
    bad = good + [Record(id="d", query="q", product=Product(title="t"), label="Partial", score=4.5)]
    with pytest.raises(UserError, match=r"record 'd' has score 4.5.*\[1.0, 3.0\]"):
        check_rating_scale(bad, "rl.rated_verdict")
