"""`evidence: marginal`: the verdict averaged over the values of the step before it, weighted by their probability."""

import pytest
import torch

from she.errors import UserError
from she.evaluation.calibration import marginalise
from she.evaluation.generate import Judgement
from she.reasoning.parse import parse_trace
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import default_schema, resolve_schema

LABELS = ["Irrelevant", "Partial", "Exact"]


def test_marginalise_by_hand():
    step = {"yes": 0.6, "no": 0.4}
    branches = {"yes": {"Irrelevant": 0.1, "Partial": 0.3, "Exact": 0.6},
                "no": {"Irrelevant": 0.9, "Partial": 0.05, "Exact": 0.05}}
    got = marginalise(step, branches)
    # 0.6 * 0.1 + 0.4 * 0.9 = 0.42; 0.6 * 0.3 + 0.4 * 0.05 = 0.20; 0.6 * 0.6 + 0.4 * 0.05 = 0.38
    assert list(got) == LABELS and got == pytest.approx({"Irrelevant": 0.42, "Partial": 0.20, "Exact": 0.38})
    assert sum(got.values()) == pytest.approx(1.0)
    # a certain step is its branch's distribution
    assert marginalise({"yes": 1.0, "no": 0.0}, branches) == pytest.approx(branches["yes"])
    with pytest.raises(ValueError, match="no verdict distribution"):
        marginalise({"yes": 0.5, "maybe": 0.5}, branches)
    with pytest.raises(ValueError, match="different labels"):
        marginalise(step, {"yes": branches["yes"], "no": {"Irrelevant": 1.0}})
    with pytest.raises(ValueError, match="no step probabilities"):
        marginalise({}, branches)


def test_marginal_step_is_the_choice_step_before_the_verdict():
    from she.reasoning.schema import marginal_step

    assert marginal_step(resolve_schema("decision")).key == "Relevant"
    assert marginal_step(resolve_schema("semantic")).key == "Similarity"
    with pytest.raises(UserError, match="choice step right before"):
        marginal_step(default_schema("hd3"))  # Attributes


def _scripted(recs, schema):
    """Judgements as if generated: the written rationale of each pair (its gold label), the last one cut before
    its Relevant line (no step to marginalise over)."""
    out = []
    for n, r in enumerate(recs):
        text = write_rationale(r, schema)
        if n == len(recs) - 1:
            text = text[: text.index("\nRelevant:")]
        p = {"Irrelevant": 0.2, "Partial": 0.3, "Exact": 0.5}
        parsed = parse_trace(text, schema)
        out.append(Judgement(r.id, text, parsed.label, p if parsed.label else None, parsed.format_ok, parsed, 0,
                             raw_label=parsed.label))
    return out


def _next_probs(model, tok, text, ids):
    """Softmax over ``ids`` of the next-token logits after ``text``, one plain float32 forward (the reference)."""
    enc = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc])).logits[0, -1].float()
    return torch.softmax(logits[ids], dim=-1).tolist()


def test_marginal_judgements_read_the_step_and_each_branch(tiny, hd_pairs):
    from she.evaluation.fast import check_prefixes, marginal_judgements
    from she.reasoning.prompts import build_messages

    model, tok = tiny
    schema = resolve_schema("decision")
    recs = hd_pairs
    given = _scripted(recs, schema)
    js = marginal_judgements(model, tok, recs, schema=schema, batch_size=3, bf16=False, judgements=given)
    step_ids = check_prefixes(tok, ["Relevant:"], ["yes", "no"])[0]
    label_ids = check_prefixes(tok, ["Verdict:"], LABELS)[0]
    for r, g, j in list(zip(recs, given, js))[:-1]:
        prompt = tok.apply_chat_template(build_messages(r, schema=schema), tokenize=False, add_generation_prompt=True)
        stem = prompt + g.text[: g.text.index("Relevant:")] + "Relevant:"
        step = dict(zip(["yes", "no"], _next_probs(model, tok, stem, step_ids)))
        branch = {v: dict(zip(LABELS, _next_probs(model, tok, f"{stem} {v}\nVerdict:", label_ids))) for v in step}
        want = {lab: step["yes"] * branch["yes"][lab] + step["no"] * branch["no"][lab] for lab in LABELS}
        assert j.step_probs == pytest.approx(step, abs=1e-5) and j.probs == pytest.approx(want, abs=1e-5)
        assert j.raw_label == j.label == max(LABELS, key=lambda lab: want[lab])
        assert j.text == g.text and j.parsed is g.parsed  # the generated trace is kept as written
    # a trace without its Relevant line keeps the generated reading
    assert js[-1].step_probs is None and js[-1].probs == given[-1].probs and js[-1].label == given[-1].label
    # offsets fitted in this mode move the label, never the raw reading
    big = {"Irrelevant": 0.0, "Partial": 50.0, "Exact": 0.0}
    shifted = marginal_judgements(model, tok, recs, schema=schema, bf16=False, judgements=given, label_offsets=big)
    assert [j.label for j in shifted] == ["Partial"] * (len(recs) - 1) + [None]  # the cut trace has no verdict
    assert [j.raw_label for j in shifted] == [j.raw_label for j in js]


def test_a_schema_without_a_choice_step_before_the_verdict_is_refused(tiny, hd_pairs):
    from she.evaluation.fast import marginal_judgements

    model, tok = tiny
    with pytest.raises(UserError, match="choice step right before"):
        marginal_judgements(model, tok, hd_pairs, schema=default_schema("hd3"), bf16=False, progress=False)


def test_marginal_eval_script_rebuilds_the_generated_judgements(load_script, hd_pairs):
    me = load_script("marginal_eval")
    schema = resolve_schema("decision")
    r = hd_pairs[0]
    text = write_rationale(r, schema)
    p = {"Irrelevant": 0.1, "Partial": 0.2, "Exact": 0.7}
    rows = [{"id": r.id, "label": "Partial", "raw_label": "Exact", "probs": p, "reasoning": text},  # calibrated row
            {"id": "x", "label": None, "probs": None, "reasoning": "Query: q"}]
    js = me.judgements_from_rows(rows, schema)
    assert js[0].raw_label == js[0].label == "Exact" and js[0].probs == p and js[0].parsed.step("relevant") is not None
    assert js[0].format_ok and js[0].text == text
    assert js[1].raw_label is None and js[1].probs is None and not js[1].format_ok


def test_computed_evidence_on_the_decision_schema_forces_the_evidence_and_marginalises_relevant(tiny, hd_pairs):
    from she.evaluation.fast import check_prefixes, computed_evidence_judgements
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import computed_evidence

    model, tok = tiny
    schema = resolve_schema("decision")
    js = computed_evidence_judgements(model, tok, hd_pairs, schema=schema, batch_size=2, bf16=False)
    step_ids = check_prefixes(tok, ["Relevant:"], ["yes", "no"])[0]
    label_ids = check_prefixes(tok, ["Verdict:"], LABELS)[0]
    for r, j in zip(hd_pairs, js):
        stem = computed_evidence(r, schema, stop_at="relevant")
        prompt = tok.apply_chat_template(build_messages(r, schema=schema), tokenize=False, add_generation_prompt=True)
        step = dict(zip(["yes", "no"], _next_probs(model, tok, prompt + stem, step_ids)))
        branch = {v: _next_probs(model, tok, f"{prompt}{stem} {v}\nVerdict:", label_ids) for v in step}
        want = {lab: step["yes"] * branch["yes"][k] + step["no"] * branch["no"][k] for k, lab in enumerate(LABELS)}
        assert j.step_probs == pytest.approx(step, abs=1e-5) and j.probs == pytest.approx(want, abs=1e-5)
        top = max(step, key=lambda v: step[v])
        assert j.text == f"{stem} {top}\nVerdict: {j.label}" and j.parsed.format_ok and j.parsed.label == j.label


def test_the_packed_read_equals_one_pass_a_text(tiny, hd_pairs):
    """marginal_reads' default (the stem and its branches packed over the stem, she.models.prefix_tree) against
    ``1 + |values|`` passes a stem; stems of different lengths in one batch."""
    from she.evaluation.fast import forced_choice_tree, marginal_reads
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import computed_evidence

    model, tok = tiny
    schema = resolve_schema("decision")
    stems = [tok.apply_chat_template(build_messages(r, schema=schema), tokenize=False, add_generation_prompt=True)
             + computed_evidence(r, schema, stop_at="relevant") for r in hd_pairs]
    packed = marginal_reads(model, tok, stems, schema, batch_size=3, bf16=False)
    rows = marginal_reads(model, tok, stems, schema, batch_size=3, bf16=False, shared_prefix=False)
    assert len(packed) == len(rows) == len(hd_pairs)
    for (d1, p1), (d2, p2) in zip(packed, rows):
        assert d1 == pytest.approx(d2, abs=1e-5) and p1 == pytest.approx(p2, abs=1e-5)
    with pytest.raises(ValueError, match="every group must have 2 texts"):
        forced_choice_tree(model, tok, [["a"]], [[1], [2]])
