"""The decision schema: the semantic evidence, then ``Relevant: yes|no`` (the first decision of the label
hierarchy, checked against the gold label), then the verdict."""

import pytest

import she.reasoning.similarity as sim
from she.data.schema import Product, Record
from she.errors import UserError
from she.reasoning.parse import parse_trace
from she.reasoning.rationale import computed_evidence, relevant_choice, write_rationale
from she.reasoning.schema import resolve_schema
from she.rewards.verifier import CORRECT, INCORRECT, UNKNOWN, verify_steps


@pytest.fixture(autouse=True)
def no_minilm(monkeypatch):
    """The Similarity bucket is not what these tests check: a constant instead of MiniLM."""
    monkeypatch.setattr(sim, "similarity_bucket", lambda record: "high")


def _rec(label, taxonomy="hd3"):
    return Record(id="r", query="cordless drill", product=Product(title="DEWALT Drill Kit"), label=label,
                  taxonomy=taxonomy)


def test_steps_and_their_order():
    schema = resolve_schema("decision")
    assert [s.name for s in schema.steps] == ["query", "product", "coverage", "numbers", "head", "similarity",
                                              "relevant", "verdict"]
    assert resolve_schema("decision", "esci4").labels == ("Irrelevant", "Complement", "Substitute", "Exact")


@pytest.mark.parametrize("label,taxonomy,expected", [
    ("Irrelevant", "hd3", "no"), ("Partial", "hd3", "yes"), ("Exact", "hd3", "yes"),
    ("Irrelevant", "esci4", "no"), ("Complement", "esci4", "yes"), ("Substitute", "esci4", "yes"),
    ("exact", "hd3", "yes"), ("I", "hd3", "no")])  # aliases read as their label
def test_relevant_is_no_only_for_the_least_relevant_label(label, taxonomy, expected):
    assert relevant_choice(label, taxonomy) == expected


@pytest.mark.parametrize("label", ["Irrelevant", "Partial", "Exact"])
def test_written_trace_states_the_gold_decision_and_the_verifier_agrees(label):
    schema = resolve_schema("decision")
    rec = _rec(label)
    text = write_rationale(rec, schema)
    truth = "no" if label == "Irrelevant" else "yes"
    assert f"\nRelevant: {truth}\nVerdict: {label}" in text
    verdicts = {v.step: v for v in verify_steps(parse_trace(text, schema), rec)}
    assert verdicts["Relevant"].verdict == CORRECT and verdicts["Verdict"].verdict == CORRECT


def test_the_wrong_decision_and_an_unreadable_one_are_incorrect_and_no_gold_is_unknown():
    schema = resolve_schema("decision")
    rec = _rec("Partial")
    text = write_rationale(rec, schema)

    def relevant(t, r):
        return {v.step: v for v in verify_steps(parse_trace(t, schema), r)}.get("Relevant")

    wrong = relevant(text.replace("Relevant: yes", "Relevant: no"), rec)
    assert wrong.verdict == INCORRECT and "relevant yes" in wrong.rule
    unreadable = relevant(text.replace("Relevant: yes", "Relevant: perhaps"), rec)
    assert unreadable is None or unreadable.verdict == INCORRECT
    unlabelled = Record(id="u", query=rec.query, product=rec.product)
    assert relevant(text, unlabelled).verdict == UNKNOWN
    # a right decision with a wrong verdict (the pair is Partial, the rollout says Exact): the step stays right
    both = {v.step: v for v in verify_steps(parse_trace(text.replace("Verdict: Partial", "Verdict: Exact"), schema),
                                            rec)}
    assert both["Relevant"].verdict == CORRECT and both["Verdict"].verdict == INCORRECT


def test_computed_evidence_stops_before_the_label_derived_step():
    schema = resolve_schema("decision")
    with pytest.raises(UserError, match="depend on the label"):
        computed_evidence(_rec(None), schema)  # the whole trace: Relevant comes from the label
    stem = computed_evidence(_rec(None), schema, stop_at="relevant")  # the same for every label
    for label in ("Irrelevant", "Partial", "Exact"):
        text = write_rationale(_rec(label), schema)
        assert text.startswith(stem[: -len("Relevant:")]) and text[len(stem) - len("Relevant:"):].startswith("Relevant:")
    assert stem.endswith("\nSimilarity: " + stem.split("Similarity: ")[1].split("\n")[0] + "\nRelevant:")
    # a stop at a label-derived step's successor still depends on the label
    with pytest.raises(UserError, match=r"\(Query, Product, Type\) depend on the label"):
        computed_evidence(_rec(None), resolve_schema("default"), stop_at="attributes")
