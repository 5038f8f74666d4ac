"""The coverage step schema (``Missing``), schemas passed explicitly, and the schema a model carries in she.json."""

import json

import pytest

from she.data.schema import Product, Record
from she.reasoning.parse import parse_trace
from she.reasoning.prompts import build_messages
from she.reasoning.rationale import missing_query_words, parse_coverage, write_rationale
from she.reasoning.schema import builtin_schema, default_schema, resolve_schema, schema_for
from she.rewards.verifier import verify_steps


def rec(query, title, label="Partial", **product):
    return Record(id="r1", query=query, product=Product(title=title, **product), label=label)


@pytest.mark.parametrize(
    "query,title,kw,expected",
    [
        ("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit", {}, ["cordless", "20"]),  # v is a unit
        ("drills for the garage", "Cordless Drill", {}, ["garage"]),  # stopwords are not requirements
        ("red drill", "Cordless Drill", {"color": "Red"}, []),  # the colour field is product text
        ("ryobi drill", "Cordless Drill", {"brand": "RYOBI"}, []),
        ("drill drills bits", "Drill Bit Set", {}, []),  # one entry per stem
        ("anti-slip mat", "Slip Resistant Anti Fatigue Mat", {}, []),  # every part of a hyphenated word
        ("anti-slip mat", "Rubber Mat", {}, ["anti-slip"]),
        ("a b c d e f g h", "nothing", {}, ["b", "c", "d", "e", "f", "g"]),  # "a" is a stopword; at most 6
    ],
)
def test_missing_query_words(query, title, kw, expected):
    assert missing_query_words(rec(query, title, **kw)) == expected


def test_parse_coverage():
    assert parse_coverage("none") == set()
    assert parse_coverage("None.") == set()
    assert parse_coverage("Cordless, 20") == {"cordless", "20"}
    assert parse_coverage("drills; bits") == {"drill", "bit"}  # the verifier compares stems
    assert parse_coverage("  ") is None
    assert parse_coverage(None) is None


def test_resolve_schema_and_the_builtin_default():
    assert [s.name for s in default_schema().steps] == [s.name for s in builtin_schema().steps]
    names = [s.name for s in resolve_schema("coverage", "hd3").steps]
    assert names == ["query", "product", "coverage", "type", "attributes", "verdict"]
    esci = resolve_schema("coverage", "esci4")
    assert esci.taxonomy == "esci4" and esci.step("coverage")
    assert resolve_schema("default", "hd3") == default_schema("hd3") and resolve_schema(None) == default_schema()
    # schema_for: a job's schema for one record's taxonomy; None is the built-in one
    cov = resolve_schema("coverage", "hd3")
    assert schema_for(cov, "hd3") is cov and schema_for(cov, "esci4") == esci
    assert schema_for(None, "esci4") == default_schema("esci4")


def test_bad_schema_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="coverage"):
        resolve_schema("nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_schema(str(tmp_path / "missing.yaml"))


def test_schema_file_spec(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("steps:\n  - {name: query, key: Query, kind: free}\n  - {name: verdict, key: Verdict, kind: label}\n")
    assert [s.key for s in resolve_schema(str(f)).steps] == ["Query", "Verdict"]
    assert resolve_schema(str(f), "esci4").for_taxonomy("hd3") == resolve_schema(str(f), "hd3")


def test_two_schemas_side_by_side_in_one_thread():
    """Each call gets the schema it is given: interleaved coverage and default traces of the same record parse,
    verify, prompt and write as their own schema (nothing is left "in effect" by the previous call)."""
    r = rec("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit", label="Partial")
    cov, dft = resolve_schema("coverage", "hd3"), default_schema("hd3")
    cov_text, dft_text = write_rationale(r, cov), write_rationale(r, dft)
    assert "Missing: cordless, 20" in cov_text.splitlines() and "Missing" not in dft_text
    for _ in range(2):  # interleaved, twice: the order of the calls changes nothing
        for schema, text, other in ((cov, cov_text, dft), (dft, dft_text, cov)):
            parsed = parse_trace(text, schema)
            assert parsed.format_ok and parsed.label == "Partial"
            verdicts = {v.step: v.verdict for v in verify_steps(parsed, r)}
            assert verdicts["Verdict"] == "correct"
            assert ("Missing" in verdicts) == (schema is cov)
            if schema is cov:
                assert verdicts["Missing"] == "correct"
            assert [s.key for s in parsed.steps] == [s.key for s in schema.steps]
            misread = parse_trace(text, other)  # the other schema: a missing step, or a line it does not know
            assert not misread.format_ok or misread.extra_lines
            assert ("Missing" in build_messages(r, style="compact", schema=schema)[0]["content"]) == (schema is cov)
    assert "Missing" not in write_rationale(r)  # no schema given: the built-in one


def test_two_schemas_side_by_side_in_threads():
    """What a context variable made fragile: threads (a server's worker) see only the schema they are given."""
    import concurrent.futures

    r = rec("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit", label="Partial")

    def steps(spec):
        schema = resolve_schema(spec, "hd3")
        return [s.key for s in parse_trace(write_rationale(r, schema), schema).steps]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(steps, ["coverage", "default"] * 8))
    assert all(("Missing" in g) == (i % 2 == 0) for i, g in enumerate(got))


def test_coverage_rationale_prompt_and_verifier():
    r = rec("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit", label="Partial")
    cov = resolve_schema("coverage", "hd3")
    text = write_rationale(r, cov)
    lines = text.splitlines()
    assert lines[2] == "Missing: cordless, 20" and lines[1].startswith("Product:")
    parsed = parse_trace(text, cov)
    assert parsed.format_ok
    v = {x.step: x.verdict for x in verify_steps(parsed, r)}
    assert v["Missing"] == "correct" and v["Verdict"] == "correct"
    for wrong in ("Missing: none", "Missing: cordless", "Missing: cordless, 20, drill"):
        bad = parse_trace(text.replace("Missing: cordless, 20", wrong), cov)
        assert {x.step: x.verdict for x in verify_steps(bad, r)}["Missing"] == "incorrect", wrong
    reordered = parse_trace(text.replace("Missing: cordless, 20", "Missing: 20, Cordless."), cov)
    assert {x.step: x.verdict for x in verify_steps(reordered, r)}["Missing"] == "correct"
    assert "Missing" in build_messages(r, style="compact", schema=cov)[0]["content"]
    assert "query words the product lacks" in build_messages(r, style="full", schema=cov)[0]["content"]
    assert "Missing" not in write_rationale(r)  # the built-in schema is untouched


def test_she_json_records_the_schema(tmp_path):
    from she.models.metadata import load_she_meta, model_step_schema, save_she_meta, schema_of

    for name in ("a", "b", "d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    save_she_meta(tmp_path / "a", {"prompt_style": "compact", "schema": "coverage"})
    save_she_meta(tmp_path / "b", {"prompt_style": "compact"})
    save_she_meta(tmp_path / "d", {"prompt_style": "compact", "schema": "default"})
    assert load_she_meta(tmp_path / "a")["schema"] == "coverage"
    assert "schema" not in load_she_meta(tmp_path / "b") and "schema" not in load_she_meta(tmp_path / "d")
    assert schema_of(tmp_path / "a") == "coverage" and schema_of(tmp_path / "b") == "default"
    assert model_step_schema(tmp_path / "a", "esci4") == resolve_schema("coverage", "esci4")
    (tmp_path / "c").mkdir()  # a folder without she.json (a Trainer checkpoint) says nothing: the caller decides
    (tmp_path / "c" / "config.json").write_text("{}")
    assert schema_of(tmp_path / "c") == "default" and schema_of(tmp_path / "c", default="coverage") == "coverage"
    assert schema_of(tmp_path / "a", default="default") == "coverage"  # what the folder says wins


@pytest.mark.slow
def test_sft_with_coverage_schema_then_eval_reads_it(tmp_path, tiny_model_dir, monkeypatch):
    from she.cli import main
    import she.evaluation.evaluate as ev

    data = tmp_path / "data.jsonl"
    main(["data", "generate", "--out", str(data), "--queries", "8", "--seed", "1"])
    out = tmp_path / "sft"
    main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
          "--max-steps", "1", "--schema", "coverage"])
    final = out / "final"
    assert json.loads((final / "she.json").read_text())["schema"] == "coverage"
    seen = []
    real = ev.generate_judgements

    def spy(*a, **k):
        seen.append([s.key for s in k["schema"].steps])
        return real(*a, **k)

    monkeypatch.setattr(ev, "generate_judgements", spy)
    main(["eval", "--model", str(final), "--data", str(data), "--split", "test", "--out", str(tmp_path / "ev"),
          "--max-new-tokens", "8", "--no-bf16"])
    assert seen and "Missing" in seen[0]


def test_step_checks_counts_label_and_string_checks_without_facts():
    """score() reports, per step key, the verifier's checks on records that have no step facts (Home Depot)."""
    from she.evaluation.evaluate import score
    from she.evaluation.generate import Judgement

    exact = rec("cordless drill", "Cordless Drill", label="Exact")  # nothing missing
    partial = rec("cordless 20v drill", "Drill", label="Partial")  # cordless, 20 missing
    texts = {
        # Missing right, Type same (Exact forces same: correct), no mismatch (correct)
        "e_ok": (exact, "Query: drill\nProduct: drill\nMissing: none\nType: same\nAttributes: none\nVerdict: Exact"),
        # Missing wrong, Type different (Exact excludes it: incorrect), attributes mismatch (Exact: incorrect)
        "e_bad": (exact, "Query: drill\nProduct: drill\nMissing: drill\nType: different\n"
                         "Attributes: function=mismatch\nVerdict: Irrelevant"),
        # Missing right; Partial allows same/related (unknown) and mismatches (unknown)
        "p": (partial, "Query: drill\nProduct: drill\nMissing: cordless, 20\nType: same\n"
                       "Attributes: function=mismatch\nVerdict: Partial"),
    }
    recs, js = [], []
    for key, (r, t) in texts.items():
        p = parse_trace(t, resolve_schema("coverage", "hd3"))
        recs.append(r)
        js.append(Judgement(r.id, t, p.label, None, p.format_ok, p))
    m = score(recs, js, "hd3")
    c = m["step_checks"]
    assert c["Missing"] == {"correct": 2, "incorrect": 1, "accuracy": 2 / 3}
    assert c["Type"] == {"correct": 1, "incorrect": 1, "accuracy": 0.5}
    assert c["Attributes"] == {"correct": 1, "incorrect": 1, "accuracy": 0.5}
    assert "Verdict" not in c and "Query" not in c
    assert "step_accuracy" not in m  # that one stays about human step facts, which these records lack


def test_schema_of_a_name_that_is_no_model_says_nothing(tmp_path):
    from she.models.metadata import schema_of

    assert schema_of(tmp_path / "nothing-here") == "default"
    assert schema_of("not-a-registered-name", default="coverage") == "coverage"
    assert schema_of(("model", "tokenizer")) == "default"  # a loaded pair has no folder to read
