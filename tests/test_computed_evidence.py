"""`evidence: computed`: the label-free steps written from the pair and forced, the model giving the verdict."""

import pytest

from she.data.schema import Product, Record
from she.errors import UserError
from she.reasoning.rationale import computed_evidence, write_rationale
from she.reasoning.schema import default_schema, resolve_schema

LABELS = ["Irrelevant", "Partial", "Exact"]
PAIR = dict(query="cordless 20v dewalt drills", product=Product(title="DEWALT 18-Volt Drill/Driver Kit"))


def test_computed_evidence_is_the_written_trace_up_to_the_verdict_for_every_label():
    schema = resolve_schema("evidence")
    prefix = computed_evidence(Record(id="u", **PAIR), schema)  # no label needed
    assert prefix.endswith("\nVerdict:") and "Missing: cordless, 20" in prefix and "Head: drill found" in prefix
    for label in LABELS:
        assert write_rationale(Record(id="u", label=label, **PAIR), schema) == f"{prefix} {label}"


def test_a_schema_with_label_derived_steps_is_refused():
    with pytest.raises(UserError, match="depend on the label"):
        computed_evidence(Record(id="u", **PAIR), default_schema("hd3"))


def test_judgements_force_the_computed_steps_and_read_the_verdict_there(tiny, hd_pairs):
    from she.evaluation.fast import computed_evidence_judgements, score_labels_fast

    model, tok = tiny
    schema = resolve_schema("evidence")
    recs = hd_pairs
    js = computed_evidence_judgements(model, tok, recs, schema=schema, batch_size=2, bf16=False)
    # the same reading as the fast scorer with the computed prefix, pair by pair
    ref = score_labels_fast(model, tok, recs, prefix=lambda r: computed_evidence(r, schema), batch_size=3, bf16=False,
                            schema=schema)
    for r, j, f in zip(recs, js, ref):
        assert j.record_id == r.id and j.text == f"{computed_evidence(r, schema)} {j.label}"
        assert j.raw_label == j.label == f.label and j.probs == pytest.approx(f.probs, abs=1e-5)
        assert j.format_ok and j.parsed.format_ok and j.parsed.label == j.label
    # offsets fitted in this mode move the label, never the raw reading
    big = {"Irrelevant": 0.0, "Partial": 50.0, "Exact": 0.0}
    shifted = computed_evidence_judgements(model, tok, recs, schema=schema, bf16=False, label_offsets=big)
    assert [j.label for j in shifted] == ["Partial"] * len(recs)
    assert [j.raw_label for j in shifted] == [j.raw_label for j in js]


def test_bad_evidence_modes(tiny_model_dir, tmp_path, hd_pairs):
    from she.evaluation.evaluate import predict
    from she.models.metadata import offsets_key

    with pytest.raises(UserError, match="evidence must be one of"):
        offsets_key("oracle")
    with pytest.raises(UserError, match="pick one"):
        predict(str(tiny_model_dir), hd_pairs, tmp_path / "p.jsonl", fast=True, evidence="computed")


def test_a_verdict_only_schema_reads_the_verdict_right_away(tiny, hd_pairs):
    """A schema with no step before the verdict: the computed stem is the verdict key alone, read like any other
    label-free schema's (not sent to the decision's marginal read)."""
    from she.evaluation.fast import computed_evidence_judgements, score_labels_fast
    from she.reasoning.schema import StepSchema

    model, tok = tiny
    schema = StepSchema([resolve_schema("evidence").label_step])
    assert computed_evidence(hd_pairs[0], schema) == "Verdict:"
    js = computed_evidence_judgements(model, tok, hd_pairs, schema=schema, batch_size=2, bf16=False)
    ref = score_labels_fast(model, tok, hd_pairs, prefix=lambda r: "Verdict:", batch_size=3, bf16=False, schema=schema)
    assert [j.label for j in js] == [f.label for f in ref] and all(j.step_probs is None for j in js)
