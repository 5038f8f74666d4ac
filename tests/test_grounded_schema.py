"""The grounded schema: computed ``Numbers`` and ``Head`` steps, their exact verifier checks, the writer, the parser.

Every expectation below is worked out by hand from the rules in docs/reasoning-format.md ("The grounded schema").
"""

from __future__ import annotations

import csv
import itertools
import os
import random
from fractions import Fraction as F
from pathlib import Path

import pytest

from she.data.labels import rating_to_label
from she.data.schema import Product, Record
from she.reasoning.parse import parse_trace
from she.reasoning.prompts import build_messages
from she.reasoning.quantities import (
    MAX_NUMBERS, UNITS, Quantity, compare_quantities, numbers_text, parse_numbers, quantities,
)
from she.reasoning.rationale import head_check, head_text, number_checks, parse_head, query_head, write_rationale
from she.reasoning.schema import SCHEMAS, resolve_schema
from she.rewards.hybrid import VerifierExaminer
from she.rewards.verifier import verify_steps

Q = Quantity


def rec(query, title, label="Partial", **product):
    return Record(id="r1", query=query, product=Product(title=title, **product), label=label)


# -- quantities ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("DEWALT 20V MAX 1/2 in. Drill", [Q(F(20), "v"), Q(F(1, 2), "in")]),
        ('3/4" x 50\' Hose', [Q(F(3, 4), "in"), Q(F(50), "ft")]),  # quote marks glued to the number
        ("3/4 inch x 50 feet hose", [Q(F(3, 4), "in"), Q(F(50), "ft")]),
        ("3/4in. x 50ft.", [Q(F(3, 4), "in"), Q(F(50), "ft")]),
        ("2x4x8 stud", [Q(F(2)), Q(F(4)), Q(F(8))]),  # a dimension: its parts
        ("2 in. x 4 in. x 8 ft. Stud", [Q(F(2), "in"), Q(F(4), "in"), Q(F(8), "ft")]),
        ("1-1/2 in. pipe", [Q(F(3, 2), "in")]),  # mixed numbers, hyphen or space, decimals, vulgar fractions
        ("1 1/2 inches", [Q(F(3, 2), "in")]),
        ("1.5in", [Q(F(3, 2), "in")]),
        ('1½"', [Q(F(3, 2), "in")]),
        ("0.5 gal", [Q(F(1, 2), "gal")]),
        (".5 Gallon", [Q(F(1, 2), "gal")]),
        ("1/2 Gal.", [Q(F(1, 2), "gal")]),
        ("20v 20 volt 20-Volt", [Q(F(20), "v")]),  # one entry per quantity
        ("60-Watt 1000W", [Q(F(60), "w"), Q(F(1000), "w")]),
        ("15 Amp 5.0Ah", [Q(F(15), "amp"), Q(F(5), "ah")]),
        ("10 lbs. 12 oz", [Q(F(10), "lb"), Q(F(12), "oz")]),
        ("1,000 sq. ft.", [Q(F(1000), "sq ft")]),
        ("1.9 cu. ft. Microwave", [Q(F(19, 10), "cu ft")]),
        ("Stakes (4-Pack)", [Q(F(4), "pack")]),
        ("12-Gauge Angle", [Q(F(12), "ga")]),
        ("20 mm 3 cm", [Q(F(20), "mm"), Q(F(3), "cm")]),
        ("8'6\" door", [Q(F(8), "ft"), Q(F(6), "in")]),
        ('5 "Premium" paint', [Q(F(5))]),  # a quote after a space is not a unit
        ("１２Ｖ ドリル", [Q(F(12), "v")]),  # full-width digits and letters
        ("電動ドリル18V", [Q(F(18), "v")]),  # glued to a non-Latin word: still a quantity
        ("dw059 r-13 2nd #SC-141", []),  # model numbers, ordinals: not quantities
        ("#8 screws", [Q(F(8))]),
        ("cordless drill", []),
        ("", []),
        (None, []),
    ],
)
def test_quantities(text, expected):
    assert quantities(text) == expected


def test_every_canonical_unit_reads_back_as_itself():
    """The line the writer prints must parse to what it meant, for every unit and a fractional value."""
    for unit, _ in UNITS:
        for v in (F(3, 2), F(7), F(1, 3)):
            q = Q(v, unit)
            assert parse_numbers(f"{q}=match") == {q: "match"}, str(q)


@pytest.mark.parametrize(
    "query,title,expected",
    [
        ("20v drill", "DEWALT 18-Volt Drill", [(Q(F(20), "v"), "mismatch")]),  # same unit, other value
        ("1/2 in drill bit", "0.5 in. Bit", [(Q(F(1, 2), "in"), "match")]),
        ("3/4 x 50 ft hose", "3/4 in. x 25 ft. Hose",  # a bare number matches any unit; 25 ft contradicts 50 ft
         [(Q(F(3, 4)), "match"), (Q(F(50), "ft"), "mismatch")]),
        ("5 gal bucket", "Homer Bucket", [(Q(F(5), "gal"), "missing")]),  # no gal at all: not stated
        ("2x4", "2 in. x 6 in. x 8 ft. Board", [(Q(F(2)), "match"), (Q(F(4)), "missing")]),  # bare: never mismatch
        ("24 in vanity", "Vanity 24", [(Q(F(24), "in"), "match")]),  # the product's number has no unit
        ("12 in ruler", "1 ft. Ruler", [(Q(F(12), "in"), "missing")]),  # units are not converted
        ("cordless drill", "18-Volt Drill", []),
        ("20v drill", "", [(Q(F(20), "v"), "missing")]),  # empty title
        ("1 2 3 4 5 6", "Box of 6", [(Q(F(n)), "missing") for n in (1, 2, 3, 4)]),  # the first MAX_NUMBERS only
    ],
)
def test_compare_quantities(query, title, expected):
    assert MAX_NUMBERS == 4
    assert compare_quantities(query, title) == expected
    assert number_checks(rec(query, title)) == expected


def test_number_checks_read_the_product_fields_but_not_identifiers():
    assert number_checks(rec("20v drill", "Drill", attributes={"voltage": "20 Volt"})) == [(Q(F(20), "v"), "match")]
    # a Home Depot product_uid is no size: a query number equal to it stays missing
    assert number_checks(rec("100001", "Drill", attributes={"product_uid": "100001"})) == [(Q(F(100001)), "missing")]


def test_numbers_text():
    assert numbers_text([]) == "none"
    line = numbers_text([(Q(F(3, 4), "in"), "match"), (Q(F(50), "ft"), "missing"), (Q(F(3, 2), "gal"), "mismatch")])
    assert line == "3/4 in=match; 50 ft=missing; 1.5 gal=mismatch"  # lengths as fractions, other units decimal
    assert numbers_text([(Q(F(3, 2)), "match"), (Q(F(10, 3)), "match")]) == "1-1/2=match; 10/3=match"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("none", {}),
        ("None.", {}),
        ("3/4 in=match; 50 ft=missing", {Q(F(3, 4), "in"): "match", Q(F(50), "ft"): "missing"}),
        ("50' = absent, 0.75\" = found.", {Q(F(3, 4), "in"): "match", Q(F(50), "ft"): "missing"}),  # any spelling
        ("20 Volts: mismatched", {Q(F(20), "v"): "mismatch"}),
        ("1,000 sq ft=match", {Q(F(1000), "sq ft"): "match"}),
        ("3/4 in x 50 ft=match", None),  # two quantities in one item
        ("drill=match", None),  # no quantity
        ("size 3/4 in=match", None),  # words besides the quantity
        ("20v=maybe", None),  # unknown state
        ("20v=match; 20 volt=missing", None),  # one quantity, two states
        ("20v", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_numbers(text, expected):
    assert parse_numbers(text) == expected


# -- head ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query,head",
    [
        ("cordless drills", "drill"),  # function adjective skipped, plural stripped
        ("20v batteries", "battery"),
        ("tool boxes", "box"),
        ("microwave over stove", "microwave"),  # before the first preposition after a content word
        ("cover for grill", "cover"),
        ("door white", "door"),  # colour skipped ...
        ("white", "white"),  # ... unless nothing else is left
        ("drill dewalt", "drill"),  # brands skipped
        ("hampton bay ceiling fan", "fan"),
        ("garden hose 50 ft", "hose"),  # quantities and units dropped
        ("3/4 in", None),
        ("電動ドリル 18V", "電動ドリル"),
    ],
)
def test_query_head(query, head):
    assert query_head(rec(query, "x")) == head


@pytest.mark.parametrize(
    "query,title,expected",
    [
        ("cordless drills", "DEWALT 18-Volt Drill/Driver Kit", ("drill", "found")),
        ("cordless drills", "DEWALT 18-Volt Impact Driver", ("drill", "absent")),
        ("tool boxes", "Husky Tool Box", ("box", "found")),  # plural normalised on both sides
        ("anti-slip mat", "Anti-Slip Mats", ("mat", "found")),
        ("t-shirt", "Cotton Shirt", ("t-shirt", "absent")),  # a hyphenated head is one word
        ("microwave over stove", "Over the Range Stove", ("microwave", "absent")),
        ("cordless drill", "", ("drill", "absent")),  # empty title
        ("3/4 in", "3/4 in. Pipe", ("", "none")),
        ("café", "Table de Café Émaillée", ("café", "found")),
        ("電動ドリル", "マキタ 電動ドリル 18V", ("電動ドリル", "found")),
        ("電動ドリル", "マキタ電動ドリルセット", ("電動ドリル", "found")),  # no spaces: found inside the title
        ("電動ドリル", "マキタ 丸ノコ", ("電動ドリル", "absent")),
    ],
)
def test_head_check(query, title, expected):
    assert head_check(rec(query, title)) == expected


def test_head_check_reads_the_title_only():
    assert head_check(rec("drill", "Impact Driver", brand="Drill Master", attributes={"type": "drill"})) == \
        ("drill", "absent")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("drill found", ("drill", "found")),
        ("Drills: found.", ("drill", "found")),
        ("drill=absent", ("drill", "absent")),
        ("**drill** not found", ("drill", "absent")),
        ("drill in title", ("drill", "found")),
        ("none", ("", "none")),
        ("drill", None),
        ("found", None),
        ("drill maybe", None),
        ("drillfound", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_head(text, expected):
    assert parse_head(text) == expected


def test_head_text():
    assert head_text(("drill", "found")) == "drill found"
    assert head_text(("drill", "absent")) == "drill absent"
    assert head_text(("", "none")) == "none"


# -- schema, writer, parser ------------------------------------------------------------------------------------
def test_grounded_schema_resolves():
    assert "grounded" in SCHEMAS
    g = resolve_schema("grounded", "hd3")
    assert [s.name for s in g.steps] == ["query", "product", "coverage", "numbers", "head", "type", "attributes",
                                         "verdict"]
    assert [s.key for s in g.steps][2:5] == ["Missing", "Numbers", "Head"]
    esci = resolve_schema("grounded", "esci4")
    assert esci.taxonomy == "esci4" and esci.for_taxonomy("hd3") == g
    cov = resolve_schema("coverage", "hd3")
    assert [s for s in g.steps if s.name not in ("numbers", "head")] == cov.steps  # the coverage schema plus two


def test_she_json_grounded(tmp_path):
    from she.models.metadata import model_step_schema, save_she_meta, schema_of

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    save_she_meta(tmp_path / "m", {"prompt_style": "compact", "schema": "grounded"})
    assert schema_of(tmp_path / "m") == "grounded"
    assert model_step_schema(tmp_path / "m", "esci4") == resolve_schema("grounded", "esci4")


def test_a_config_with_schema_grounded_resolves():
    from she.config import DemoConfig, SFTJobConfig, load_config

    cfg = load_config(DemoConfig, Path(__file__).resolve().parents[1] / "configs" / "home-depot-sft-grounded.yaml")
    assert cfg.sft.schema == "grounded"
    assert resolve_schema(cfg.sft.schema, cfg.data.taxonomy) == resolve_schema("grounded", cfg.data.taxonomy)
    assert load_config(SFTJobConfig, None, {"schema": "grounded"}).schema == "grounded"


DRILL = ("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit")


def test_rationale_writes_the_computed_steps_label_free():
    g = resolve_schema("grounded", "hd3")
    for label in ("Exact", "Partial", "Irrelevant"):
        lines = write_rationale(rec(*DRILL, label=label), g).splitlines()
        assert [ln.split(":")[0] for ln in lines] == [s.key for s in g.steps]
        # the same evidence whatever the label: query words cordless and 20 are not in the product text, the
        # query's 20v meets the product's 18-Volt (same unit, other value), and the head drill is in the title
        assert lines[2:5] == ["Missing: cordless, 20", "Numbers: 20 v=mismatch", "Head: drill found"]
        assert lines[-1] == f"Verdict: {label}"


def test_grounded_trace_round_trips_through_the_parser():
    g = resolve_schema("grounded", "hd3")
    r = rec("garden hose 3/4 in x 50 ft", "Pocket Hose 3/4 in. x 25 ft. Expanding Garden Hose", label="Partial")
    text = write_rationale(r, g)
    lines = text.splitlines()
    assert lines[3] == "Numbers: 3/4 in=match; 50 ft=mismatch" and lines[4] == "Head: hose found"
    p = parse_trace(text, g)
    assert p.format_ok and p.label == "Partial" and [s.key for s in p.steps] == [s.key for s in g.steps]
    assert p.step("numbers").conclusion == "3/4 in=match; 50 ft=mismatch"
    assert parse_numbers(p.step("numbers").conclusion) == {Q(F(3, 4), "in"): "match", Q(F(50), "ft"): "mismatch"}
    assert parse_head(p.step("head").conclusion) == ("hose", "found")
    # aliases and decoration are tolerated like for every step
    loose = text.replace("Numbers:", "- **Quantities:**").replace("Head:", "Head noun:")
    lp = parse_trace(loose, g)
    assert lp.format_ok and lp.step("numbers").key == "Numbers" and lp.step("head").key == "Head"


def test_prompt_names_the_new_steps():
    g = resolve_schema("grounded", "hd3")
    system = build_messages(rec(*DRILL), style="compact", schema=g)[0]["content"]
    assert "Missing, Numbers, Head, Type" in system
    full = build_messages(rec(*DRILL), style="full", schema=g)[0]["content"]
    assert "Numbers: <each query number with unit =match|mismatch|missing" in full
    assert "Head: <query head noun> found|absent" in full
    assert "Numbers" not in build_messages(rec(*DRILL), style="compact", schema=resolve_schema("coverage"))[0]["content"]


# -- verifier --------------------------------------------------------------------------------------------------
NUM_PAIR = ("20v drill 1/2 in", "DEWALT 18-Volt 0.5 in. Drill")  # truth: 20 v=mismatch; 1/2 in=match
NUM_LINE = "Numbers: 20 v=mismatch; 1/2 in=match"


def _verdicts(text, r):
    p = parse_trace(text, resolve_schema("grounded", "hd3"))
    return {v.step: v for v in verify_steps(p, r)}, p


@pytest.mark.parametrize(
    "line,verdict,similarity",
    [
        (NUM_LINE, "correct", 1.0),
        ('Numbers: 0.5"=found; 20 Volt=mismatch', "correct", 1.0),  # by meaning, any order
        ("Numbers: 20 v=mismatch", "incorrect", 1 / 2),  # one of two pairs
        ("Numbers: 20 v=match; 1/2 in=match", "incorrect", 1 / 3),  # {20 v=match, 1/2 in=match} vs truth: 1 of 3
        ("Numbers: 20 v=mismatch; 1/2 in=match; 4 ft=missing", "incorrect", 2 / 3),
        ("Numbers: none", "incorrect", 0.0),
        ("Numbers: twenty volts, wrong", "incorrect", None),  # unparseable
    ],
)
def test_verifier_checks_numbers(line, verdict, similarity):
    r = rec(*NUM_PAIR)
    text = write_rationale(r, resolve_schema("grounded", "hd3"))
    assert NUM_LINE in text.splitlines()
    v, p = _verdicts(text.replace(NUM_LINE, line), r)
    assert v["Numbers"].verdict == verdict, v["Numbers"].rule
    assert v["Numbers"].similarity == (pytest.approx(similarity) if similarity is not None else None)
    if similarity is None:
        assert v["Numbers"].rule == "numbers unparsed"
    graded = VerifierExaminer(graded=True).score_steps(p, r)
    exact = VerifierExaminer().score_steps(p, r)
    k = [s.key for s in p.steps].index("Numbers")
    assert exact[k] == (1.0 if verdict == "correct" else 0.0)
    assert graded[k] == pytest.approx(similarity if similarity is not None else 0.0)


def test_verifier_numbers_none_when_the_query_has_no_quantity():
    r = rec("cordless drill", "18-Volt Drill")
    text = write_rationale(r, resolve_schema("grounded", "hd3"))
    assert "Numbers: none" in text.splitlines()
    assert _verdicts(text, r)[0]["Numbers"].verdict == "correct"
    v, _ = _verdicts(text.replace("Numbers: none", "Numbers: 18 v=match"), r)
    assert v["Numbers"].verdict == "incorrect" and v["Numbers"].similarity == 0.0


@pytest.mark.parametrize(
    "line,verdict",
    [
        ("Head: drill found", "correct"),
        ("Head: Drills: found.", "correct"),
        ("Head: drill absent", "incorrect"),  # wrong state
        ("Head: driver found", "incorrect"),  # wrong word
        ("Head: none", "incorrect"),
        ("Head: the drill is there", "incorrect"),  # unparseable
    ],
)
def test_verifier_checks_head(line, verdict):
    r = rec(*DRILL)
    text = write_rationale(r, resolve_schema("grounded", "hd3"))
    assert "Head: drill found" in text.splitlines()
    v, p = _verdicts(text.replace("Head: drill found", line), r)
    assert v["Head"].verdict == verdict, v["Head"].rule
    assert v["Head"].similarity is None
    k = [s.key for s in p.steps].index("Head")
    assert VerifierExaminer(graded=True).score_steps(p, r)[k] == (1.0 if verdict == "correct" else 0.0)
    if line == "Head: the drill is there":
        assert v["Head"].rule == "head unparsed"


def test_verifier_head_none_when_the_query_has_no_word():
    r = rec("3/4 in", "3/4 in. Copper Pipe")
    text = write_rationale(r, resolve_schema("grounded", "hd3"))
    assert "Head: none" in text.splitlines()
    assert _verdicts(text, r)[0]["Head"].verdict == "correct"
    assert _verdicts(text.replace("Head: none", "Head: pipe found"), r)[0]["Head"].verdict == "incorrect"


def test_reward_steps_can_name_the_computed_steps():
    """RL's ``reward_steps`` filters by step key: the grounded trace's keys are the names a config writes."""
    from she.config import RLJobConfig

    cfg = RLJobConfig(reward_steps=["Missing", "Numbers", "Head"])
    keys = [s.key for s in parse_trace(write_rationale(rec(*DRILL), resolve_schema("grounded")),
                                       resolve_schema("grounded")).steps]
    assert set(cfg.reward_steps) <= set(keys)


# -- many records: the writer's computed lines always pass the verifier's exact checks ---------------------------
def _all_computed_correct(r: Record) -> None:
    g = resolve_schema("grounded", r.taxonomy)
    text = write_rationale(r, g)
    v, p = _verdicts(text, r)
    assert p.format_ok, (text, p.errors)
    for key in ("Missing", "Numbers", "Head"):
        assert v[key].verdict == "correct", (key, v[key].rule, text)


def test_random_records_computed_steps_are_correct():
    rng = random.Random(13)
    vocab = ("drill cordless dewalt 20v 12v 18-Volt white steel battery blade cover for with in sink faucet 3/4 in. "
             "ft. 50' 1-1/2\" 0.5 gal (2-Pack) 2x4 x 60-watt 1,500 sq. ft. hampton bay é 長 🔨 ½ ２０Ｖ - , & # "
             "dw059").split()
    for i in range(300):
        q = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6)))
        t = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        _all_computed_correct(Record(id=str(i), query=q, product=Product(title=t),
                                     label=rng.choice(["Exact", "Partial", "Irrelevant"])))


def test_real_home_depot_rows_if_present():
    root = Path(os.environ.get("SHE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    path = root / "home-depot-product-search-relevance" / "train.csv"
    if not path.exists():
        pytest.skip(f"Home Depot data not found at {path}")
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), 300))
    for i, row in enumerate(rows):
        _all_computed_correct(Record(id=str(i), query=row["search_term"], product=Product(title=row["product_title"]),
                                     label=rating_to_label(float(row["relevance"])), source="home-depot"))


# -- the evidence schema: the grounded evidence, no label-derived conclusions ----------------------------------
def test_evidence_schema_is_grounded_without_type_and_attributes():
    assert "evidence" in SCHEMAS
    e = resolve_schema("evidence", "hd3")
    assert [s.key for s in e.steps] == ["Query", "Product", "Missing", "Numbers", "Head", "Verdict"]
    g = resolve_schema("grounded", "hd3")
    assert e.steps == [s for s in g.steps if s.key not in ("Type", "Attributes")]
    assert resolve_schema("evidence", "esci4").labels == resolve_schema("grounded", "esci4").labels


def test_evidence_rationale_states_only_label_free_steps_then_the_label():
    e = resolve_schema("evidence", "hd3")
    texts = {label: write_rationale(rec(*DRILL, label=label), e) for label in ("Exact", "Partial", "Irrelevant")}
    for label, text in texts.items():
        lines = text.splitlines()
        assert lines[2:5] == ["Missing: cordless, 20", "Numbers: 20 v=mismatch", "Head: drill found"]
        assert lines[-1] == f"Verdict: {label}" and len(lines) == 6
        p = parse_trace(text, e)
        assert p.format_ok and p.label == label and p.step("type") is None
    # every line but the verdict is the same whatever the gold label: nothing in the trace is derived from it
    assert len({t.rsplit("\n", 1)[0] for t in texts.values()}) == 1


def test_evidence_schema_verifier_checks_the_computed_steps_and_the_verdict():
    e = resolve_schema("evidence", "hd3")
    r = rec(*NUM_PAIR, label="Partial")
    text = write_rationale(r, e)
    v = {x.step: x for x in verify_steps(parse_trace(text, e), r)}
    assert set(v) == {"Query", "Product", "Missing", "Numbers", "Head", "Verdict"}
    assert [v[k].verdict for k in ("Missing", "Numbers", "Head", "Verdict")] == ["correct"] * 4
    wrong = text.replace(NUM_LINE, "Numbers: 20 v=match; 1/2 in=match").replace("Verdict: Partial", "Verdict: Exact")
    v = {x.step: x for x in verify_steps(parse_trace(wrong, e), r)}
    assert v["Numbers"].verdict == "incorrect" and v["Verdict"].verdict == "incorrect"
    assert v["Missing"].verdict == "correct"


def test_the_evidence_config_resolves():
    from she.config import DemoConfig, load_config

    cfg = load_config(DemoConfig, Path(__file__).resolve().parents[1] / "configs" / "home-depot-sft-evidence.yaml")
    assert cfg.sft.schema == "evidence"
    assert [s.key for s in resolve_schema(cfg.sft.schema, cfg.data.taxonomy).steps][-2:] == ["Head", "Verdict"]
