from she.data.schema import Product, Record, StepFacts
from she.reasoning.parse import parse_trace
from she.reasoning.schema import default_schema
from she.rewards.verifier import verify_steps

SCHEMA = default_schema("hd3")


def _rec(**facts):
    return Record(id="1", query="dewalt drill without battery", product=Product(title="DeWalt 20V Drill"),
                  label="Partial", facts=StepFacts(**facts))


def _verdicts(text, rec):
    return {v.step: v.verdict for v in verify_steps(parse_trace(text, SCHEMA), rec)}


TRACE = ("Query: drill without battery; brand=dewalt\nProduct: drill; brand=DeWalt\nType: same\n"
         "Attributes: brand=match; function=mismatch\nVerdict: Partial")


def test_all_checkable_steps_correct():
    rec = _rec(type_relation="same", brand="match", function="mismatch", negation="yes")
    assert _verdicts(TRACE, rec) == {"Query": "correct", "Product": "unknown", "Type": "correct",
                                     "Attributes": "correct", "Verdict": "correct"}


def test_wrong_type_and_wrong_attribute_and_wrong_label():
    rec = _rec(type_relation="accessory", brand="mismatch", function="mismatch")
    rec.label = "Irrelevant"
    v = _verdicts(TRACE, rec)
    assert v["Type"] == "incorrect" and v["Attributes"] == "incorrect" and v["Verdict"] == "incorrect"
    assert v["Query"] == "unknown"  # no negation fact: nothing to check


def test_missed_mismatch_is_incorrect_and_unknown_without_facts():
    rec = _rec(type_relation="same", brand="match", color="mismatch")
    assert _verdicts(TRACE, rec)["Attributes"] == "incorrect"  # colour mismatch not mentioned
    assert _verdicts(TRACE, _rec()) == {"Query": "unknown", "Product": "unknown", "Type": "unknown",
                                        "Attributes": "unknown", "Verdict": "correct"}


def test_negation_must_be_mentioned():
    rec = _rec(negation="yes")
    text = TRACE.replace("drill without battery", "drill battery")
    assert _verdicts(text, rec)["Query"] == "incorrect"


def test_garbage_generation_never_crashes():
    rec = _rec(type_relation="same", brand="match")
    assert verify_steps(parse_trace("\x00 lorem ipsum \n Type: banana", SCHEMA), rec)[0].verdict in {"incorrect", "unknown"}


def _bare(label, taxonomy="hd3"):
    return Record(id="2", query="q", product=Product(title="t"), label=label, taxonomy=taxonomy)


def _trace(type_, attrs="none", verdict="Exact"):
    return f"Query: q\nProduct: t\nType: {type_}\nAttributes: {attrs}\nVerdict: {verdict}"


def test_label_without_step_facts_checks_the_type_step():
    # hd3 Exact admits only "same"; Irrelevant excludes "same"/"related"; Partial admits same or related
    assert _verdicts(_trace("same"), _bare("Exact"))["Type"] == "correct"
    assert _verdicts(_trace("related"), _bare("Exact"))["Type"] == "incorrect"
    assert _verdicts(_trace("same"), _bare("Irrelevant"))["Type"] == "incorrect"
    assert _verdicts(_trace("accessory"), _bare("Irrelevant"))["Type"] == "unknown"  # or "different"
    assert _verdicts(_trace("accessory"), _bare("Partial"))["Type"] == "incorrect"
    assert _verdicts(_trace("related"), _bare("Partial"))["Type"] == "unknown"
    # esci4: Complement admits exactly "accessory"
    esci = default_schema("esci4")
    v = verify_steps(parse_trace(_trace("accessory", verdict="Complement"), esci), _bare("Complement", "esci4"))
    assert v[2].verdict == "correct" and "implies" in v[2].rule


def test_exact_label_rules_out_attribute_mismatches():
    assert _verdicts(_trace("same", "brand=mismatch"), _bare("Exact"))["Attributes"] == "incorrect"
    assert _verdicts(_trace("same", "brand=match"), _bare("Exact"))["Attributes"] == "correct"
    assert _verdicts(_trace("same", "brand=mismatch"), _bare("Partial"))["Attributes"] == "unknown"


def test_label_semantics_need_a_guideline_taxonomy():
    rec = _bare("Exact")
    rec.taxonomy = "taobao4"
    assert _verdicts(_trace("same"), rec)["Type"] == "unknown"
