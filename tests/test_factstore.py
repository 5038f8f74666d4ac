"""The fact store: build from annotation JSONL, validation and rejects, lookups, atomic writes, attach()
and its effect on the verifier, the CLI and the RL/PRM hooks."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
from dataclasses import replace

import pytest

from she.data.factstore import FactStore, attach_facts, merge_facts
from she.data.schema import Product, Record, StepFacts
from she.data.validation import DataError


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def _rec(rid, **facts):
    return Record(id=rid, query="dewalt drill without battery", product=Product(title="DeWalt 20V Drill"),
                  label="Partial", facts=StepFacts(**facts))


GOOD = [
    {"id": "r1", "facts": {"type_relation": "same", "brand": "match"}},
    {"id": 7, "facts": {"negation": "yes", "query_class": "Drills", "color": None}},
    {"id": "r3", "query": "sofa", "product": {"title": "Armless loveseat"}, "label": "Partial",
     "facts": {"type_relation": "related"}},
]


def _files(tmp_path):
    return [p for p in os.listdir(tmp_path)]


# -- build and lookup ---------------------------------------------------------------------------------
def test_build_and_lookup(tmp_path):
    src = _write(tmp_path / "a.jsonl", [GOOD[0], "", GOOD[1], GOOD[2]])
    rep = FactStore.build([src], tmp_path / "facts.sqlite")
    assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_blank, rep.n_ids) == (3, 3, 0, 1, 3)
    assert rep.out_path == tmp_path / "facts.sqlite"
    with FactStore.open(tmp_path / "facts.sqlite") as store:
        assert len(store) == 3
        assert store.get("r1") == StepFacts(type_relation="same", brand="match")
        assert store.get(7) == StepFacts(negation="yes", query_class="Drills")  # int id stored as "7"
        assert store.get("7") == store.get(7)
        assert store.get("r3") == StepFacts(type_relation="related")  # full-record line: only its facts are kept
        assert store.get("nope") is None
        assert "r1" in store and "nope" not in store and None not in store
        assert store.get_many(["r3", "nope", "r1", "r1"]) == {"r1": StepFacts(type_relation="same", brand="match"),
                                                              "r3": StepFacts(type_relation="related")}
        assert store.source_of("r3") == f"{src}:4"  # physical line, blank line 2 counted
        assert list(store.ids()) == ["7", "r1", "r3"]
    # no temporary file left next to the store
    assert sorted(_files(tmp_path)) == ["a.jsonl", "facts.sqlite"]


def test_get_many_over_chunk_boundary(tmp_path):
    src = _write(tmp_path / "a.jsonl", [{"id": i, "facts": {"brand": "match"}} for i in range(1203)])
    FactStore.build(src, tmp_path / "f.sqlite")
    store = FactStore.open(tmp_path / "f.sqlite")
    got = store.get_many(range(-5, 1300))
    assert len(got) == 1203 and set(got) == {str(i) for i in range(1203)}


@pytest.mark.parametrize("line, field, words", [
    ({"id": "x", "facts": {"brand": "maybe"}}, "facts.brand", "must be one of"),
    ({"id": "x", "facts": {"type_relation": "identical"}}, "facts.type_relation", "must be one of"),
    ({"id": "x", "facts": {"negation": True}}, "facts.negation", "must be a string or null, got true"),
    ({"id": "x", "facts": {"colour": "match"}}, "facts.colour", "unknown fact"),
    ({"id": "x", "facts": {}}, "facts", "no fact set"),
    ({"id": "x", "facts": {"brand": None}}, "facts", "no fact set"),
    ({"id": "x", "facts": ["same"]}, "facts", "must be an object"),
    ({"id": "x"}, "facts", "missing field"),
    ({"facts": {"brand": "match"}}, "id", "missing field"),
    ({"id": "", "facts": {"brand": "match"}}, "id", "non-empty"),
    ({"id": True, "facts": {"brand": "match"}}, "id", "non-empty string or integer"),
    ({"id": "x", "query": "q", "facts": {"brand": "match"}}, "product", "missing field 'product'"),
    ({"id": "x", "query": "q", "product": {"title": "t"}, "labell": "E", "facts": {"brand": "match"}}, "labell",
     "unknown field"),
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
])
def test_fail_mode_names_file_line_and_field(tmp_path, line, field, words):
    src = _write(tmp_path / "ann.jsonl", [GOOD[0], line])
    with pytest.raises(DataError) as ei:
        FactStore.build([src], tmp_path / "facts.sqlite")
    e = ei.value
    assert (e.path, e.line, e.field) == (str(src), 2, field)
    assert words in e.reason
    prefix = f"{src}:2: field {field!r}: " if field else f"{src}:2: "
    assert str(e).startswith(prefix), str(e)
    assert sorted(_files(tmp_path)) == ["ann.jsonl"]  # nothing written, no temp file left


def test_skip_mode_keeps_good_rows_and_writes_rejects(tmp_path):
    a = _write(tmp_path / "a.jsonl", [GOOD[0], {"id": "bad1", "facts": {"size": "big"}}, GOOD[1]])
    b = _write(tmp_path / "b.jsonl", ["{oops", GOOD[2]])
    out = tmp_path / "store" / "facts.sqlite"
    rep = FactStore.build([a, b], out, on_error="skip")
    assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_ids) == (5, 3, 2, 3)
    assert rep.rejects_path == out.with_name("facts.sqlite.rejects.jsonl")  # default: next to the store
    rejects = [json.loads(x) for x in rep.rejects_path.read_text().splitlines()]
    assert [(r["path"], r["line"], r["field"]) for r in rejects] == [(str(a), 2, "facts.size"), (str(b), 1, None)]
    assert rejects[0]["raw"] == json.dumps({"id": "bad1", "facts": {"size": "big"}})
    store = FactStore.open(out)
    assert len(store) == 3 and "bad1" not in store and store.get("r3") == StepFacts(type_relation="related")


def test_skip_mode_custom_rejects_path(tmp_path):
    a = _write(tmp_path / "a.jsonl", [GOOD[0], {"id": "bad", "facts": {"brand": 1}}])
    rep = FactStore.build([a], tmp_path / "f.sqlite", on_error="skip", rejects_path=tmp_path / "r.jsonl")
    assert rep.rejects_path == tmp_path / "r.jsonl"
    assert json.loads((tmp_path / "r.jsonl").read_text())["field"] == "facts.brand"


def test_duplicates_later_line_wins_and_is_counted(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"id": "r1", "facts": {"brand": "match"}},
                                      {"id": "r2", "facts": {"color": "mismatch"}}])
    b = _write(tmp_path / "b.jsonl", [{"id": "r1", "facts": {"brand": "mismatch"}},
                                      {"id": "r2", "facts": {"color": "mismatch"}},
                                      {"id": "r1", "facts": {"type_relation": "same"}}])
    rep = FactStore.build([a, b], tmp_path / "f.sqlite")
    assert (rep.n_read, rep.n_ok, rep.n_duplicates, rep.n_ids) == (5, 5, 3, 2)
    assert [(d.id, d.src, d.previous, d.same) for d in rep.duplicates] == [
        ("r1", f"{b}:1", f"{a}:1", False), ("r2", f"{b}:2", f"{a}:2", True), ("r1", f"{b}:3", f"{b}:1", False)]
    assert "duplicates 3" in rep.summary()
    store = FactStore.open(tmp_path / "f.sqlite")
    assert store.get("r1") == StepFacts(type_relation="same")  # the last line, whole (no merge across lines)
    assert store.source_of("r1") == f"{b}:3"


def test_failed_build_leaves_old_store_intact(tmp_path):
    out = tmp_path / "f.sqlite"
    FactStore.build(_write(tmp_path / "old.jsonl", [GOOD[0]]), out)
    before = out.read_bytes()
    new = _write(tmp_path / "new.jsonl", [{"id": "n1", "facts": {"brand": "match"}}, {"id": "n2", "facts": {"x": 1}}])
    with pytest.raises(DataError):
        FactStore.build([new], out)
    assert out.read_bytes() == before
    assert sorted(_files(tmp_path)) == ["f.sqlite", "new.jsonl", "old.jsonl"]
    store = FactStore.open(out)
    assert len(store) == 1 and "n1" not in store


def test_missing_input_and_not_a_store(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        FactStore.build([tmp_path / "absent.jsonl"], tmp_path / "f.sqlite")
    assert not (tmp_path / "f.sqlite").exists()
    with pytest.raises(DataError, match="no such fact store"):
        FactStore.open(tmp_path / "f.sqlite")
    (tmp_path / "junk.sqlite").write_text("hello")
    with pytest.raises(DataError, match="not a fact store"):
        FactStore.open(tmp_path / "junk.sqlite")
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE meta(key TEXT, value TEXT)")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="no she-facts metadata"):
        FactStore.open(other)


def test_store_is_read_only_and_picklable(tmp_path):
    FactStore.build(_write(tmp_path / "a.jsonl", [GOOD[0]]), tmp_path / "f.sqlite")
    store = FactStore.open(tmp_path / "f.sqlite")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store._conn().execute("DELETE FROM facts")
    copy = pickle.loads(pickle.dumps(store))  # e.g. sent to a data-loader worker: opens its own connection
    assert copy.get("r1") == StepFacts(type_relation="same", brand="match")


def test_from_records_dumps_loader_facts(tmp_path):
    from she.data.synthetic import generate

    recs = generate(n_queries=3, products_per_query=2, seed=0)
    recs.append(_rec("nofacts"))
    rep = FactStore.from_records(recs, tmp_path / "f.sqlite")
    assert (rep.n_read, rep.n_ok, rep.n_filtered, rep.n_ids) == (7, 6, 1, 6)
    store = FactStore.open(tmp_path / "f.sqlite")
    assert all(store.get(r.id) == r.facts and not r.facts.is_empty() for r in recs[:6])
    assert "nofacts" not in store and store.source_of(recs[0].id) == "record:synthetic"


# -- attach and the verifier --------------------------------------------------------------------------
TRACE = ("Query: drill without battery; brand=dewalt\nProduct: drill; brand=DeWalt\nType: same\n"
         "Attributes: brand=match; function=mismatch\nVerdict: Partial")


def _verdicts(rec):
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import default_schema
    from she.rewards.verifier import verify_steps

    return {v.step: v.verdict for v in verify_steps(parse_trace(TRACE, default_schema("hd3")), rec)}


def test_attach_turns_unknown_steps_into_verdicts(tmp_path):
    src = _write(tmp_path / "a.jsonl", [
        {"id": "ok", "facts": {"type_relation": "same", "brand": "match", "function": "mismatch"}},
        {"id": "wrong", "facts": {"type_relation": "accessory", "color": "mismatch"}},
    ])
    FactStore.build(src, tmp_path / "f.sqlite")
    # unlabelled records: the verifier can then only use facts (a gold label can decide some steps too)
    recs = [replace(_rec(rid), label=None) for rid in ("ok", "wrong", "absent")]
    before = [_verdicts(r) for r in recs]
    assert all(b["Type"] == "unknown" and b["Attributes"] == "unknown" for b in before)
    with FactStore.open(tmp_path / "f.sqlite") as store:
        out = store.attach(recs)
    after = [_verdicts(r) for r in out]
    assert (after[0]["Type"], after[0]["Attributes"]) == ("correct", "correct")
    # trace says Type: same (fact: accessory) and never mentions the colour mismatch
    assert (after[1]["Type"], after[1]["Attributes"]) == ("incorrect", "incorrect")
    assert after[2] == before[2] and out[2] is recs[2]
    assert recs[0].facts.is_empty()  # the input records are not mutated


def test_attach_store_wins_and_counts(tmp_path):
    src = _write(tmp_path / "a.jsonl", [{"id": "both", "facts": {"type_relation": "related", "brand": "match"}},
                                        {"id": "empty", "facts": {"size": "mismatch"}}])
    FactStore.build(src, tmp_path / "f.sqlite")
    recs = [_rec("both", type_relation="same", specs_met="yes", brand="match"), _rec("empty"), _rec("absent")]
    store = FactStore.open(tmp_path / "f.sqlite")
    out, stats = attach_facts(recs, store)
    assert (stats.records, stats.found, stats.filled, stats.both, stats.conflicting_fields) == (3, 2, 1, 1, 1)
    # store wins on type_relation; specs_met (not in the store) survives; brand agreed
    assert out[0].facts == StepFacts(type_relation="related", specs_met="yes", brand="match")
    assert out[1].facts == StepFacts(size="mismatch")
    out2, _ = attach_facts(recs, store, replace_facts=True)
    assert out2[0].facts == StepFacts(type_relation="related", brand="match")


def test_merge_facts_counts_only_real_conflicts():
    own = StepFacts(type_relation="same", color="match", size="unspecified")
    stored = StepFacts(type_relation="same", color="mismatch", brand="match")
    merged, conflicts = merge_facts(own, stored)
    assert conflicts == 1
    assert merged == StepFacts(type_relation="same", color="mismatch", brand="match", size="unspecified")


# -- CLI and job hooks --------------------------------------------------------------------------------
def test_cli_build_and_show(tmp_path, capsys):
    from she.cli import main

    src = _write(tmp_path / "a.jsonl", [GOOD[0], GOOD[1], {"id": "r1", "facts": {"brand": "mismatch"}}])
    out = tmp_path / "f.sqlite"
    main(["data", "facts", "build", str(src), "--out", str(out)])
    text = capsys.readouterr().out
    assert "read 3, ok 3, rejected 0" in text and "duplicates 1" in text and f"{src}:3: id 'r1' overrides" in text
    main(["data", "facts", "show", "--store", str(out), "r1", "7"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [{"id": "r1", "facts": {"brand": "mismatch"}, "src": f"{src}:3"},
                     {"id": "7", "facts": {"negation": "yes", "query_class": "Drills"}, "src": f"{src}:2"}]
    with pytest.raises(SystemExit) as ei:
        main(["data", "facts", "show", "--store", str(out), "missing"])
    assert ei.value.code == 1 and "missing" in capsys.readouterr().err


def test_cli_build_errors(tmp_path, capsys):
    from she.cli import main

    src = _write(tmp_path / "a.jsonl", [GOOD[0], {"id": "b", "facts": {"material": "wood"}}])
    with pytest.raises(SystemExit) as ei:
        main(["data", "facts", "build", str(src), "--out", str(tmp_path / "f.sqlite")])
    assert ei.value.code == 2
    assert f"{src}:2: field 'facts.material': must be one of" in capsys.readouterr().err
    assert not (tmp_path / "f.sqlite").exists()
    with pytest.raises(SystemExit) as ei:  # skip mode with rejected rows: exit 1, the store holds the good rows
        main(["data", "facts", "build", str(src), "--out", str(tmp_path / "f.sqlite"), "--on-error", "skip",
              "--rejects", str(tmp_path / "rej.jsonl")])
    assert ei.value.code == 1 and (tmp_path / "f.sqlite").exists()
    assert "rejected 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "rej.jsonl").read_text())["line"] == 2


def test_rl_config_attaches_store_facts(tmp_path):
    from she.config import RLJobConfig, load_config
    from she.training.rl import with_store_facts

    FactStore.build(_write(tmp_path / "a.jsonl", [{"id": "r1", "facts": {"brand": "mismatch"}}]), tmp_path / "f.sqlite")
    cfg_file = tmp_path / "rl.yaml"
    cfg_file.write_text(f"facts_store: {tmp_path / 'f.sqlite'}\n")
    cfg = load_config(RLJobConfig, cfg_file)
    recs = [_rec("r1"), _rec("r2")]
    out = with_store_facts(cfg, recs)
    assert [r.facts for r in out] == [StepFacts(brand="mismatch"), StepFacts()]
    assert with_store_facts(RLJobConfig(), recs)[0].facts.is_empty()  # no store: unchanged
    with pytest.raises(DataError, match="no such fact store"):
        with_store_facts(RLJobConfig(facts_store=str(tmp_path / "absent.sqlite")), recs)


def test_prm_records_get_store_facts(tmp_path):
    from she.config import DataConfig, PRMJobConfig
    from she.training.prm import _records_for

    data = _write(tmp_path / "d.jsonl", [_rec(f"r{i}").to_dict() for i in range(3)])
    FactStore.build(_write(tmp_path / "a.jsonl", [{"id": "r2", "facts": {"type_relation": "different"}}]),
                    tmp_path / "f.sqlite")
    cfg = PRMJobConfig(data=DataConfig(path=str(data), format="jsonl"), split="all", max_records=None,
                       facts_store=str(tmp_path / "f.sqlite"))
    recs = _records_for(cfg)
    assert [r.facts.type_relation for r in recs] == [None, None, "different"]


# -- facts_on_share: a partial fact pass, simulated (rl.facts_share) ------------------------------------------------

def _annotated(n):
    return [_rec(f"p{i}", type_relation=("same", "related", "different")[i % 3], brand="match") for i in range(n)]


def test_facts_on_share_keeps_a_fixed_nested_subset():
    from she.data.factstore import facts_on_share

    recs = _annotated(300)
    assert facts_on_share(recs, None) == recs
    assert all(r.facts.is_empty() for r in facts_on_share(recs, 0.0))
    assert facts_on_share(recs, 1.0) == recs
    kept = {}
    for share in (0.25, 0.5):
        out = facts_on_share(recs, share)
        assert out == facts_on_share(recs, share)  # the same subset every call
        assert [replace(r, facts=StepFacts()) for r in out] == [replace(r, facts=StepFacts()) for r in recs]
        kept[share] = {r.id for r in out if not r.facts.is_empty()}
        assert all(r.facts == recs[i].facts for i, r in enumerate(out) if r.id in kept[share])  # kept whole
        assert abs(len(kept[share]) - share * len(recs)) < 0.1 * len(recs)  # about the share
    assert kept[0.25] < kept[0.5]  # a smaller pass lies inside a larger one


def test_facts_on_share_is_the_same_subset_in_every_process():
    import subprocess
    import sys

    code = ("from she.data.factstore import facts_on_share\n"
            "from she.data.schema import Product, Record, StepFacts\n"
            "recs = [Record(id=f'p{i}', query='q', product=Product(title='t'), facts=StepFacts(type_relation='same'))"
            " for i in range(100)]\n"
            "print(','.join(r.id for r in facts_on_share(recs, 0.4) if not r.facts.is_empty()))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and next(iter(outs)).strip()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_facts_on_share_bad_value_is_a_clear_error(bad):
    from she.data.factstore import facts_on_share
    from she.errors import UserError

    with pytest.raises(UserError, match="facts_share must be a number in"):
        facts_on_share(_annotated(3), bad)


def _stop_at_class_weights(monkeypatch, rl):
    """Stops ``rl.run_rl_job`` where it resolves its class weights (after the records are prepared, before any model
    is loaded), keeping the records it got there in the returned dict under ``train``."""
    seen = {}

    def stop(cfg, train):
        seen["train"] = train
        raise RuntimeError("stop here")

    monkeypatch.setattr(rl, "resolve_class_weights", stop)
    monkeypatch.setattr(rl, "schema_of", lambda model: None)
    monkeypatch.setattr(rl, "resolve_schema", lambda spec, taxonomy: None)
    monkeypatch.setattr(rl, "build_examiner", lambda cfg: None)
    return seen


def test_rl_job_examines_only_the_shared_facts(tmp_path, monkeypatch):
    """The records the RL job trains on carry facts on the share only (read where the job resolves its class
    weights, after the share and before any model is loaded); with a fact store too, a clear error."""
    from she.config import RLJobConfig
    from she.errors import UserError
    from she.training import rl

    seen = _stop_at_class_weights(monkeypatch, rl)
    recs = _annotated(60)
    cfg = RLJobConfig(model="tiny", output_dir=str(tmp_path / "rl"), report_to="none", facts_share=0.5)
    with pytest.raises(RuntimeError, match="stop here"):
        rl.run_rl_job(cfg, recs)
    n_kept = sum(not r.facts.is_empty() for r in seen["train"])
    assert 0 < n_kept < len(recs) and len(seen["train"]) == len(recs)
    cfg.facts_store = str(tmp_path / "facts.sqlite")
    with pytest.raises(UserError, match="set one of the two"):
        rl.run_rl_job(cfg, recs)


def test_fact_coverage_note_warns_on_a_thin_credit_only():
    """Hand-counted: 3 of 12 records keep facts (25 %). At alpha 1 the credit's weight a step is 0.25 -> a warning
    naming the share and 1 / share = 4.0; at alpha 4 (1.0) and with every record's facts, only information; a tenth
    (3 of 30) warns at any alpha; with no facts at all, information saying the examiner reads the labels."""
    from she.training.rl import fact_coverage_note

    recs = [_rec(f"q{i}", type_relation="same") if i < 3 else _rec(f"q{i}") for i in range(12)]
    level, msg = fact_coverage_note(recs, 1.0)
    assert level == logging.WARNING and "3 of 12 RL records (25%)" in msg and "share x alpha = 0.25" in msg
    assert "here 4.0" in msg
    assert fact_coverage_note(recs, 4.0)[0] == logging.INFO
    assert fact_coverage_note(recs[:3], 0.1)[0] == logging.INFO  # every record annotated: no share to scale by
    level, msg = fact_coverage_note(recs[:3] + recs[3:] * 3, 10.0)  # 3 of 30: a tenth, whatever the alpha
    assert level == logging.WARNING and "3 of 30 RL records (10%)" in msg and "under the quarter" in msg
    level, msg = fact_coverage_note(recs[3:], 1.0)
    assert level == logging.INFO and "0 of 9" in msg and "only what each label implies" in msg


def test_rl_job_logs_the_fact_coverage_for_step_estimators_only(tmp_path, monkeypatch, caplog):
    from she.config import RLJobConfig
    from she.training import rl

    _stop_at_class_weights(monkeypatch, rl)
    recs = _annotated(60)
    cfg = RLJobConfig(model="tiny", output_dir=str(tmp_path / "rl"), report_to="none", facts_share=0.25)
    with caplog.at_level(logging.INFO, logger="she.training.rl"), pytest.raises(RuntimeError, match="stop here"):
        rl.run_rl_job(cfg, recs)
    warned = [r for r in caplog.records if "RL records" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    caplog.clear()
    cfg.step_rewards = False  # GRPO reads no facts: nothing to say
    with caplog.at_level(logging.INFO, logger="she.training.rl"), pytest.raises(RuntimeError, match="stop here"):
        rl.run_rl_job(cfg, recs)
    assert not [r for r in caplog.records if "RL records" in r.getMessage()]


# -- labels_from_facts: the same pairs with the labels their facts imply (rl.outcome_labels: facts) -------------------

def test_labels_from_facts_relabels_every_record_by_the_guideline():
    from she.data.guideline import labels_from_facts

    recs = [_rec("a", type_relation="same", brand="match"), _rec("b", type_relation="same", brand="mismatch"),
            _rec("c", type_relation="related"), _rec("d", type_relation="different")]
    noisy = [replace(r, label=lab) for r, lab in zip(recs, ["Irrelevant", "Exact", "Exact", "Partial"])]
    out = labels_from_facts(noisy)
    # hd3: an attribute mismatch or a related type -> Partial
    assert [r.label for r in out] == ["Exact", "Partial", "Partial", "Irrelevant"]
    assert [replace(r, label=None) for r in out] == [replace(r, label=None) for r in noisy]  # nothing else changes


def test_labels_from_facts_refuses_a_record_without_a_type_fact():
    from she.data.guideline import labels_from_facts
    from she.errors import UserError

    with pytest.raises(UserError, match="record 'b' has none"):
        labels_from_facts([_rec("a", type_relation="same"), _rec("b")])


def test_rl_job_pays_the_facts_labels_on_the_same_records(tmp_path, monkeypatch):
    """``outcome_labels: facts`` relabels the RL records before the share clears facts (the labels of the cleared
    records come from their facts too); an unknown value is a clear error."""
    from she.config import RLJobConfig
    from she.errors import UserError
    from she.training import rl

    seen = _stop_at_class_weights(monkeypatch, rl)
    recs = [replace(r, label="Exact") for r in _annotated(30)]  # same/related/different, brand match
    cfg = RLJobConfig(model="tiny", output_dir=str(tmp_path / "rl"), report_to="none", outcome_labels="facts",
                      facts_share=0.5)
    with pytest.raises(RuntimeError, match="stop here"):
        rl.run_rl_job(cfg, recs)
    want = {"same": "Exact", "related": "Partial", "different": "Irrelevant"}
    assert [r.label for r in seen["train"]] == [want[r.facts.type_relation] for r in recs]
    assert [r.id for r in seen["train"]] == [r.id for r in recs]
    assert any(r.facts.is_empty() for r in seen["train"])  # the share applied after the relabel
    cfg.outcome_labels = "gold"
    with pytest.raises(UserError, match="outcome_labels must be data or facts"):
        rl.run_rl_job(cfg, recs)
