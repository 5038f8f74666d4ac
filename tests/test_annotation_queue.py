"""Annotation queue ranking, agreement and implied facts: pure functions against hand-computed values."""

from __future__ import annotations

import pytest

from she.annotation.items import implied_facts
from she.annotation.queue import QC_REASON, Candidate, priority, qc_positions, rank_queue, signals, uncertainty
from she.annotation.stats import agreement, cohen_kappa

# made-up judge scores; the expected numbers are worked out in the comments
CANDS = [
    # open steps 1, 2 judged 0.5 and 0.9: unsure = max(1 - 0, 1 - 0.8) = 1; all scores >= .5 and label == gold
    Candidate("A", (1.0, None, None), (None, 0.5, 0.9), "Exact", "Exact"),
    # nobody scores either step: undecidable = 2/2 -> 0.5 * 1 = 0.5; no score -> no disagreement
    Candidate("B", (None, None), (None, None), "Partial", "Exact"),
    # the verifier calls every step right but the label is wrong: disagree = 1
    Candidate("C", (1.0, 1.0), (None, None), "Partial", "Exact"),
    # unsure = 1 - |1.6 - 1| = 0.4; a wrong step (0.0) but the label is right: disagree = 1 -> 1.4
    Candidate("D", (0.0, None), (None, 0.8), "Exact", "Exact"),
    # everything decided and consistent: 0
    Candidate("E", (1.0,), (None,), "Exact", "Exact"),
]


def test_uncertainty_and_signals_by_hand():
    assert [uncertainty(p) for p in (0.0, 0.25, 0.5, 0.9, 1.0)] == pytest.approx([0.0, 0.5, 1.0, 0.2, 0.0])
    assert signals(CANDS[0]) == pytest.approx({"unsure": 1.0, "undecidable": 0.0, "disagree": 0.0})
    assert signals(CANDS[1]) == pytest.approx({"unsure": 0.0, "undecidable": 1.0, "disagree": 0.0})
    assert signals(CANDS[2]) == pytest.approx({"unsure": 0.0, "undecidable": 0.0, "disagree": 1.0})
    assert signals(CANDS[3]) == pytest.approx({"unsure": 0.4, "undecidable": 0.0, "disagree": 1.0})
    # the judge's doubt on a step the verifier decides does not count
    assert signals(Candidate("x", (1.0,), (0.5,)))["unsure"] == 0.0
    # no gold label: no disagreement signal
    assert signals(Candidate("x", (1.0,), (None,), "Partial", None))["disagree"] == 0.0
    with pytest.raises(ValueError, match="2 verifier scores but 1 judge"):
        signals(Candidate("x", (1.0, None), (None,)))


def test_priority_and_reason():
    got = {c.item_id: priority(c) for c in CANDS}
    assert got["A"] == (pytest.approx(1.0), "judge unsure")
    assert got["B"] == (pytest.approx(0.5), "verifier cannot decide")
    assert got["C"] == (pytest.approx(1.0), "examiner vs gold")
    assert got["D"] == (pytest.approx(1.4), "examiner vs gold")
    assert got["E"] == (0.0, "low priority")
    # weights change the order of terms: with the judge's doubt worth 3, D's reason is the judge
    assert priority(CANDS[3], {"unsure": 3.0, "undecidable": 0.5, "disagree": 1.0}) == (pytest.approx(2.2), "judge unsure")


def test_rank_queue_without_qc_is_priority_then_id():
    q = rank_queue(CANDS, qc_share=0.0)
    assert [x.item_id for x in q] == ["D", "A", "C", "B", "E"]  # A and C tie at 1.0: id order
    assert [x.need for x in q] == [1] * 5
    assert rank_queue(list(reversed(CANDS)), qc_share=0.0) == q  # input order does not matter


def test_qc_positions_and_interleaving():
    assert qc_positions(10, 2) == [4, 9]
    assert qc_positions(5, 2) == [2, 4]
    assert qc_positions(5, 0) == []
    q = rank_queue(CANDS, qc_share=0.4, seed=3)  # round(0.4 * 5) = 2 quality-control items
    assert [x.reason == QC_REASON for x in q] == [False, False, True, False, True]
    assert [x.need for x in q] == [1, 1, 2, 1, 2]
    qc = {x.item_id for x in q if x.reason == QC_REASON}
    rest = [x.item_id for x in q if x.reason != QC_REASON]
    assert rest == [i for i in ["D", "A", "C", "B", "E"] if i not in qc]  # the others keep their ranked order
    assert sorted(x.item_id for x in q) == ["A", "B", "C", "D", "E"]
    assert rank_queue(CANDS, qc_share=0.4, seed=3) == q  # reproducible
    with pytest.raises(ValueError, match="twice"):
        rank_queue([CANDS[0], CANDS[0]])
    with pytest.raises(ValueError, match="qc_share"):
        rank_queue(CANDS, qc_share=1.5)


def test_cohen_kappa_by_hand():
    # p_o = 3/4; A says r 3x, w 1x; B says r 2x, w 2x: p_e = (3*2 + 1*2) / 16 = 1/2; kappa = (3/4 - 1/2) / (1/2)
    assert cohen_kappa([("r", "r"), ("r", "w"), ("w", "w"), ("r", "r")]) == pytest.approx(0.5)
    assert cohen_kappa([("r", "r"), ("w", "w")]) == pytest.approx(1.0)
    assert cohen_kappa([("r", "w"), ("w", "r")]) == pytest.approx(-1.0)
    assert cohen_kappa([("r", "r"), ("r", "r")]) == 1.0  # p_e = 1
    assert cohen_kappa([]) is None


def test_agreement_pools_pairs_and_skips_single_answers():
    units = {("i1", "step:0"): {"bob": "right", "alice": "right"},
             ("i1", "step:1"): {"alice": "right", "bob": "wrong"},
             ("i2", "step:0"): {"alice": "wrong", "bob": "wrong"},
             ("i3", "step:0"): {"alice": "right"},  # single: not counted
             ("i4", "step:0"): {"alice": "right", "bob": "right", "carol": "wrong"}}
    ag = agreement(units)
    assert ag["units"] == 4
    assert ag["pairs"]["alice|bob"]["n"] == 4 and ag["pairs"]["alice|carol"]["n"] == 1
    # alice|bob: (r,r) (r,w) (w,w) (r,r) -> 0.5 as above
    assert ag["pairs"]["alice|bob"]["kappa"] == pytest.approx(0.5)
    # pooled: the 4 alice|bob pairs + (r,w) alice|carol + (r,w) bob|carol: p_o = 3/6;
    # A-side r 5, w 1; B-side r 2, w 4: p_e = (5*2 + 1*4)/36 = 14/36; kappa = (1/2 - 14/36) / (22/36) = 2/11
    assert ag["overall"] == pytest.approx(2 / 11)


def test_implied_facts():
    assert implied_facts("type", "same") == {"type_relation": "same"}
    assert implied_facts("type", None) == {}
    assert implied_facts("attributes", {"size": "mismatch", "brand": "match"}) == {"size": "mismatch", "brand": "match"}
    assert implied_facts("verdict", "Exact") == {}
