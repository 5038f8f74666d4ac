"""Step schema, renderer, tolerant parser (spans!), consistent_label and prompts."""

from __future__ import annotations

import random

import pytest

from she.data.schema import Product, Record
from she.reasoning.parse import consistent_label, parse_attributes, parse_label, parse_trace
from she.reasoning.prompts import DEFAULT_SYSTEM, build_messages, format_product, system_prompt
from she.reasoning.render import render_trace
from she.reasoning.schema import StepSchema, StepSpec, default_schema, load_schema

SCHEMA = default_schema("hd3")
GOOD = (
    "Query: cordless drill; brand=dewalt; size=20v\n"
    "Product: drill/driver kit; brand=DeWalt; size=20V; color=yellow\n"
    "Type: same\n"
    "Attributes: brand=match; size=match\n"
    "Verdict: Exact"
)
GOOD_LINES = GOOD.split("\n")


# -- schema -------------------------------------------------------------------------------------
def test_default_schema_steps_and_vocabulary():
    s = default_schema()
    assert [st.key for st in s.steps] == ["Query", "Product", "Type", "Attributes", "Verdict"]
    assert [st.kind for st in s.steps] == ["free", "free", "choice", "attributes", "label"]
    assert s.step("type").choices == ("same", "related", "accessory", "different")
    assert s.step("attributes").choices == ("brand", "color", "material", "size", "function")
    assert default_schema("esci4").labels == ("Irrelevant", "Complement", "Substitute", "Exact")


def test_schema_from_dict_with_extra_negation_step_and_yaml(tmp_path):
    d = default_schema().to_dict()
    d["steps"].insert(2, {"name": "negation", "key": "Negation", "kind": "choice", "choices": ["yes", "no"]})
    s = StepSchema.from_dict(d)
    assert [st.key for st in s.steps][2] == "Negation"
    import yaml

    p = tmp_path / "steps.yaml"
    p.write_text(yaml.safe_dump(d["steps"]))  # a bare list of steps is accepted too
    loaded = load_schema(p, taxonomy="esci4")
    assert loaded.taxonomy == "esci4" and loaded.step("negation").choices == ("yes", "no")
    text = GOOD.replace("Type: same", "Negation: no\nType: same")
    assert parse_trace(text, s).format_ok
    assert not parse_trace(GOOD, s).format_ok  # the new step is required


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"name": "verdict", "key": "Verdict", "kind": "label"}, {"name": "q", "key": "Q", "kind": "free"}], "last"),
        ([{"name": "q", "key": "Q", "kind": "free"}], "exactly one 'label' step"),
        ([{"name": "t", "key": "T", "kind": "choice"}, {"name": "v", "key": "V", "kind": "label"}], "choices"),
        ([{"name": "t", "key": "T", "kind": "weird"}, {"name": "v", "key": "V", "kind": "label"}], "kind must be"),
        ([{"name": "a", "key": "Same", "kind": "free"}, {"name": "b", "key": "same", "kind": "label"}], "used by two steps"),
        ([{"name": "a", "key": "A", "kind": "attributes", "choices": ["weight"]}, {"name": "v", "key": "V", "kind": "label"}], "unknown attribute"),
        ([{"name": "a", "kind": "free"}, {"name": "v", "key": "V", "kind": "label"}], "missing field 'key'"),
    ],
)
def test_schema_errors_name_the_step(steps, message, tmp_path):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"taxonomy": "hd3", "steps": steps}))
    with pytest.raises(ValueError, match=message) as e:
        load_schema(p)
    assert "bad.yaml" in str(e.value)


def test_schema_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("steps:\n  - name: q\n    key: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: line \d+"):
        load_schema(p)


# -- render -------------------------------------------------------------------------------------
def test_render_is_canonical_and_deterministic():
    steps = {
        "query": "cordless drill; brand=dewalt; size=20v",
        "product": "drill/driver kit;\n brand=DeWalt;  size=20V; color=yellow",  # newline collapsed
        "type": "Same",
        "attributes": {"size": "match", "brand": "match"},  # rendered in the fixed attribute order
        "verdict": "exact",
    }
    assert render_trace(steps, SCHEMA) == GOOD
    assert render_trace({**steps, "attributes": "size=match; brand=match"}, SCHEMA) == GOOD
    assert render_trace({**steps, "attributes": {}}, SCHEMA).split("\n")[3] == "Attributes: none"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"type": "similar"}, "not one of"),
        ({"verdict": "Great"}, "unknown label"),
        ({"attributes": {"weight": "match"}}, "unknown attribute"),
        ({"attributes": {"brand": "yes"}}, "must be one of"),
        ({"query": "  \n "}, "must not be empty"),
        ({"extra": "x"}, "unknown step 'extra'"),
    ],
)
def test_render_rejects_bad_values(change, message):
    steps = {"query": "q", "product": "p", "type": "same", "attributes": {}, "verdict": "Exact", **change}
    with pytest.raises(ValueError, match=message):
        render_trace(steps, SCHEMA)


def test_render_requires_every_step():
    with pytest.raises(ValueError, match=r"missing step\(s\) \['attributes'\]"):
        render_trace({"query": "q", "product": "p", "type": "same", "verdict": "Exact"}, SCHEMA)


# -- parse: the good path and spans --------------------------------------------------------------
def test_parse_good_trace_conclusions_and_spans():
    p = parse_trace(GOOD, SCHEMA)
    assert p.format_ok and p.errors == [] and p.extra_lines == []
    assert [s.name for s in p.steps] == ["query", "product", "type", "attributes", "verdict"]
    assert [GOOD[s.span[0] : s.span[1]] for s in p.steps] == GOOD_LINES
    assert [s.text for s in p.steps] == GOOD_LINES
    assert p.steps[2].conclusion == "same"
    assert p.steps[3].conclusion == {"brand": "match", "size": "match"}
    assert p.label == "Exact" and GOOD[p.label_span[0] : p.label_span[1]] == "Exact"
    assert p.label_span == (len(GOOD) - 5, len(GOOD))
    assert p.steps[0].conclusion == "cordless drill; brand=dewalt; size=20v"


def test_spans_round_trip_with_multibyte_text_and_crlf():
    text = (
        "  Query: perceuse sans fil 🔨 — café\r\n"
        "Product: 電動ドリル «Bosch» naïve 🇫🇷\r\n"
        "\r\n"
        "Type: related\r\n"
        "Attributes: brand=mismatch\r\n"
        "Verdict: Partial  \r\n"
    )
    p = parse_trace(text, SCHEMA)
    assert p.format_ok, p.errors
    expected = ["Query: perceuse sans fil 🔨 — café", "Product: 電動ドリル «Bosch» naïve 🇫🇷", "Type: related",
                "Attributes: brand=mismatch", "Verdict: Partial"]
    assert [text[a:b] for a, b in (s.span for s in p.steps)] == expected
    assert text[p.label_span[0] : p.label_span[1]] == "Partial"


# -- parse: tolerance ----------------------------------------------------------------------------
TOLERATED = {
    "lowercase keys": GOOD.lower(),
    "markdown bold inside": GOOD.replace("Type:", "**Type:**").replace("Verdict: Exact", "**Verdict:** **Exact**"),
    "markdown bold outside": GOOD.replace("Type:", "**Type**:").replace("Attributes:", "__Attributes__:"),
    "numbering": "\n".join(f"{i}. {line}" for i, line in enumerate(GOOD_LINES, 1)),
    "paren numbering": "\n".join(f"{i}) {line}" for i, line in enumerate(GOOD_LINES, 1)),
    "bullets": "\n".join(f"- {line}" for line in GOOD_LINES),
    "step prefix": "\n".join(f"Step {i}: {line}" for i, line in enumerate(GOOD_LINES, 1)),
    "headings": "\n".join(f"### {line}" for line in GOOD_LINES),
    "full-width colon": GOOD.replace("Type:", "Type："),
    "chatter around": "Sure! Here is my analysis.\n\n" + GOOD + "\nHope this helps.",
    "aliases": GOOD.replace("Verdict:", "Label:").replace("Type:", "Type relation:"),
    "choice with explanation": GOOD.replace("Type: same", "Type: Same (both are drills)."),
    "attribute synonyms": GOOD.replace("brand=match; size=match", "Brand: matches, Size=match."),
    "verdict with trailing words": GOOD.replace("Verdict: Exact", "Verdict: Exact match, clearly."),
    "extra spaces": GOOD.replace("Type: same", "Type :   same   "),
}


@pytest.mark.parametrize("name", sorted(TOLERATED))
def test_parser_tolerance(name):
    text = TOLERATED[name]
    p = parse_trace(text, SCHEMA)
    assert p.format_ok, (name, p.errors)
    assert p.label == "Exact" and text[p.label_span[0] : p.label_span[1]].lower().startswith("exact")
    assert p.step("type").conclusion == "same"
    assert p.step("attributes").conclusion == {"brand": "match", "size": "match"}
    for s in p.steps:  # every span is exactly one stripped line of the original text
        line = text[s.span[0] : s.span[1]]
        assert "\n" not in line and line == line.strip() and line == s.text


def test_chatter_lines_are_reported_with_spans():
    text = "Sure!\n" + GOOD + "\nThe product is a drill."
    p = parse_trace(text, SCHEMA)
    assert p.format_ok
    assert [text[a:b] for a, b in p.extra_lines] == ["Sure!", "The product is a drill."]


@pytest.mark.parametrize(
    "text, error",
    [
        ("\n".join(GOOD_LINES[:2] + GOOD_LINES[3:]), "missing step(s): Type"),
        (GOOD.replace("Type: same", "Type: same\nType: related"), "duplicated step(s): Type"),
        ("\n".join([GOOD_LINES[2], GOOD_LINES[0], GOOD_LINES[1]] + GOOD_LINES[3:]), "out of order"),
        (GOOD.replace("Type: same", "Type: maybe"), "is not one of same/related/accessory/different"),
        (GOOD.replace("Verdict: Exact", "Verdict: Great"), "is not a label of hd3"),
        (GOOD.replace("brand=match; size=match", ""), "write 'none'"),
        (GOOD.replace("brand=match", "weight=match"), "unknown attribute 'weight'"),
        (GOOD.replace("brand=match", "brand=good"), "brand: value 'good'"),
        (GOOD.replace("size=match", "brand=mismatch"), "brand checked twice"),
        (GOOD.replace("Query: cordless drill; brand=dewalt; size=20v", "Query: ..."), "step Query: empty"),
    ],
)
def test_format_errors(text, error):
    p = parse_trace(text, SCHEMA)
    assert not p.format_ok
    assert any(error in e for e in p.errors), p.errors


def test_error_messages_name_the_line():
    p = parse_trace(GOOD.replace("Type: same", "Type: maybe"), SCHEMA)
    assert p.errors[0].startswith("line 3: step Type:")


def test_label_reading_rules():
    assert parse_label("Exact", "hd3") == ("Exact", (0, 5))
    assert parse_label("**exact**.", "hd3") == ("Exact", (2, 7))
    assert parse_label("E", "hd3") == ("Exact", (0, 1))  # an alias alone is accepted...
    assert parse_label("I think it is Exact", "hd3") == (None, None)  # ...but not as the first word of a sentence
    assert parse_label("partially relevant", "hd3") == ("Partial", (0, 18))
    assert parse_label("Complement", "esci4") == ("Complement", (0, 10))
    assert parse_label("Complement", "hd3") == (None, None)


def test_first_readable_verdict_wins_but_duplicate_breaks_format():
    text = GOOD + "\nVerdict: Irrelevant"
    p = parse_trace(text, SCHEMA)
    assert p.label == "Exact" and not p.format_ok
    assert text[p.label_span[0] : p.label_span[1]] == "Exact"
    bad_first = GOOD.replace("Verdict: Exact", "Verdict: ???\nVerdict: Partial")
    p = parse_trace(bad_first, SCHEMA)
    assert p.label == "Partial" and bad_first[p.label_span[0] : p.label_span[1]] == "Partial"


def test_parse_attributes_none_and_partial_errors():
    allowed = SCHEMA.step("attributes").choices
    assert parse_attributes("none", allowed) == ({}, [])
    assert parse_attributes("colour=mismatch; function: unspecified;", allowed) == (
        {"color": "mismatch", "function": "unspecified"}, [])
    d, errs = parse_attributes("brand=match; size is big", allowed)
    assert d == {"brand": "match"} and len(errs) == 1 and "size is big" in errs[0]


# -- parse: never raises --------------------------------------------------------------------------
def test_parser_never_raises_on_pathological_strings():
    cases = [
        "", " ", "\n\n\n", "garbage", "\x00\x01\x02", "Verdict:", ":::", "**:**", "1.", "Type:" * 1000,
        "x" * 100_000, "Type: " + "a " * 50_000, "Verdict: Exact\n" * 20_000, "\u2028Type: same\u2029",
        "🔥" * 10_000, "Query: " + "長" * 100_000, "\r" * 1000, "- - - - - Type: same", "(((((((((1) Type: same",
        "**Verdict**: **", "Attributes: ;;;;,,,", "Attributes: =", "Verdict: \U0001F600 Exact", "Type: \u00e9",
    ]
    for text in cases:
        p = parse_trace(text, SCHEMA)
        assert isinstance(p.format_ok, bool) and len(p.errors) <= 21
        for s in p.steps:
            assert text[s.span[0] : s.span[1]] == s.text
        if p.label_span is not None:
            assert text[p.label_span[0] : p.label_span[1]]
    assert parse_trace(None, SCHEMA).errors == ["input is not a string (NoneType)"]  # type: ignore[arg-type]


def test_parser_fuzz_random_mutations_of_good_traces():
    rng = random.Random(0)
    alphabet = list("abcXYZ:;=*_#-.,() \n\r\t") + ["é", "🔨", "長", "Type", "Verdict", "Exact", "same", "brand", "match"]
    for _ in range(1500):
        chars = list(GOOD)
        for _ in range(rng.randint(1, 12)):
            op = rng.random()
            i = rng.randrange(len(chars) + 1)
            if op < 0.4:
                chars.insert(i, rng.choice(alphabet))
            elif op < 0.8 and chars:
                del chars[min(i, len(chars) - 1)]
            else:
                j = rng.randrange(len(chars) + 1)
                chars[i:j] = chars[j:i]
        text = "".join(chars)
        p = parse_trace(text, SCHEMA)
        for s in p.steps:
            assert text[s.span[0] : s.span[1]] == s.text and s.text.strip() == s.text
        if p.label is not None:
            assert SCHEMA.labels.count(p.label) == 1
            assert text[p.label_span[0] : p.label_span[1]]
        if p.format_ok:
            assert p.label is not None and len(p.steps) == len(SCHEMA.steps)


# -- consistent_label -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "type_rel, attrs, taxonomy, expected",
    [
        ("same", "brand=match; size=match", "hd3", "Exact"),
        ("same", "none", "hd3", "Exact"),
        ("same", "brand=match; color=unspecified", "hd3", "Exact"),
        ("same", "brand=match; size=mismatch", "hd3", "Partial"),
        ("related", "brand=match", "hd3", "Partial"),
        ("accessory", "brand=match", "hd3", "Irrelevant"),
        ("different", "none", "hd3", "Irrelevant"),
        ("same", "none", "esci4", "Exact"),
        ("same", "color=mismatch", "esci4", "Substitute"),
        ("related", "none", "esci4", "Substitute"),
        ("accessory", "none", "esci4", "Complement"),
        ("different", "none", "esci4", "Irrelevant"),
        ("same", "none", "taobao4", "Excellent"),
        ("same", "size=mismatch", "taobao4", "Mismatch"),
        ("related", "none", "taobao4", "Related"),
        ("accessory", "none", "taobao4", "Irrelevant"),
    ],
)
def test_consistent_label_follows_the_guideline(type_rel, attrs, taxonomy, expected):
    text = f"Query: q\nProduct: p\nType: {type_rel}\nAttributes: {attrs}\nVerdict: {expected}"
    p = parse_trace(text, default_schema(taxonomy))
    assert p.format_ok, p.errors
    assert consistent_label(p, taxonomy) == expected


def test_consistent_label_none_when_steps_unreadable():
    assert consistent_label(parse_trace(GOOD.replace("Type: same", "Type: ?"), SCHEMA), "hd3") is None
    assert consistent_label(parse_trace(GOOD.replace("brand=match", "brand=good"), SCHEMA), "hd3") is None
    assert consistent_label(parse_trace("Verdict: Exact", SCHEMA), "hd3") is None
    # a schema without an attributes step: nothing checked
    s = StepSchema([StepSpec("type", "Type", "choice", ("same", "related", "accessory", "different")),
                    StepSpec("verdict", "Verdict", "label")])
    assert consistent_label(parse_trace("Type: same\nVerdict: Partial", s), "hd3") == "Exact"


# -- prompts -------------------------------------------------------------------------------------------
def _record(**kw):
    base = dict(id="r1", query="cordless drill", label="Exact",
                product=Product(title="DeWalt 20V MAX Drill/Driver Kit", brand="DeWalt", color="Yellow",
                                description="word " * 100))
    base.update(kw)
    return Record(**base)


def test_build_messages_shape_and_content():
    msgs = build_messages(_record())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == DEFAULT_SYSTEM
    user = msgs[1]["content"].split("\n")
    assert user[0] == "Query: cordless drill"
    assert user[1] == "Product: DeWalt 20V MAX Drill/Driver Kit"
    assert user[2] == "Brand: DeWalt" and user[3] == "Color: Yellow"
    assert user[4].startswith("Description: word word") and user[4].endswith("...")
    assert len(user[4]) <= len("Description: ") + 200 + 3
    assert "Exact" not in msgs[1]["content"]  # the gold label is never shown


def test_format_product_omits_missing_fields():
    assert format_product(Product(title="Drill  Kit\n")) == "Product: Drill Kit"
    assert format_product(Product(title="T", description="short text")) == "Product: T\nDescription: short text"


def test_system_prompt_lists_steps_and_labels_of_the_taxonomy():
    for key in ("Query:", "Product:", "Type: same|related|accessory|different", "Attributes:", "Verdict: Irrelevant|Partial|Exact"):
        assert key in DEFAULT_SYSTEM
    esci = build_messages(_record(taxonomy="esci4", label="Exact"))[0]["content"]
    assert "Verdict: Irrelevant|Complement|Substitute|Exact" in esci
    assert "Complement = accessory/part for it" in esci
    assert build_messages(_record(), system="custom")[0]["content"] == "custom"
    assert len(DEFAULT_SYSTEM) < 600  # short: the policy runs on CPU
    d = default_schema().to_dict()
    d["steps"].insert(2, {"name": "negation", "key": "Negation", "kind": "choice", "choices": ["yes", "no"]})
    assert "Negation: yes|no" in system_prompt(StepSchema.from_dict(d))
