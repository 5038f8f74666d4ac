"""The writable fact store: in-place migration of a built store, answers and visible corrections, validation,
leases, export/rebuild, concurrent writers, and hot reload seen by a verifier examiner between two calls."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from she.data.annotations import AnnotationStore, AnswerError, QueueItem, export_facts, latest_by_annotator
from she.data.factstore import FactStore
from she.data.schema import Product, Record, StepFacts
from she.reasoning.parse import parse_trace
from she.reasoning.schema import default_schema
from she.rewards.hybrid import VerifierExaminer
from she.rewards.live_facts import LiveFactsExaminer, count_changed

SCHEMA = default_schema("hd3")
TRACE = "Query: drill\nProduct: drill; brand=DeWalt\nType: same\nAttributes: brand=match\nVerdict: Partial"


def _store(tmp_path, lines=({"id": "r1", "facts": {"brand": "mismatch"}},)):
    src = tmp_path / "ann.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    FactStore.build([src], tmp_path / "facts.sqlite")
    return tmp_path / "facts.sqlite"


def _item(iid, rid, n_steps=5, need=1):
    return QueueItem(iid, rid, "test", need, {"steps": [{"name": f"s{k}"} for k in range(n_steps)]})


def test_migrates_a_built_store_in_place_and_old_readers_still_read_it(tmp_path):
    path = _store(tmp_path)
    st = AnnotationStore(path)
    st.set_queue([_item("i1", "r1")])
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"facts", "meta", "ann_items", "ann_leases", "ann_done", "ann_answers"} <= tables
    con.close()
    with FactStore.open(path) as fs:  # the reader of test_factstore is unchanged
        assert fs.get("r1") == StepFacts(brand="mismatch") and fs.meta()["annotation_schema"] == "1"
    AnnotationStore(path)  # migrating twice is a no-op
    assert st.item("i1").record_id == "r1"


def test_answers_update_facts_and_corrections_stay_visible(tmp_path):
    path = _store(tmp_path)
    st = AnnotationStore(path)
    st.set_queue([_item("i1", "r1")])
    a = st.answer("i1", "alice", steps={2: "right"}, facts={"brand": "match", "type_relation": "same"}, now=100.0)
    assert [(x.target, x.value, x.previous) for x in a] == [("step:2", "right", None), ("fact:brand", "match", "mismatch"),
                                                           ("fact:type_relation", "same", None)]
    assert a[1].previous_src.endswith("ann.jsonl:1")  # what the answer overrode, and where it came from
    with FactStore.open(path) as fs:
        assert fs.get("r1") == StepFacts(brand="match", type_relation="same")
        assert fs.source_of("r1") == "annotation:alice@1970-01-01T00:01:40Z"
    b = st.answer("i1", "bob", steps={2: "wrong"}, facts={"brand": None}, now=200.0)
    assert (b[0].previous, b[0].previous_src) == ("right", "annotation:alice")
    assert (b[1].value, b[1].previous) == (None, "match")
    assert FactStore.open(path).get("r1") == StepFacts(type_relation="same")
    assert len(st.answers("i1")) == 5  # append-only log
    assert latest_by_annotator(st.answers()) == {("i1", "step:2"): {"alice": "right", "bob": "wrong"},
                                                 ("i1", "fact:brand"): {"alice": "match"},
                                                 ("i1", "fact:type_relation"): {"alice": "same"}}


@pytest.mark.parametrize("kw, field", [
    ({"facts": {"brand": "maybe"}}, "facts.brand"),
    ({"facts": {"colour": "match"}}, "facts.colour"),
    ({"facts": {"negation": True}}, "facts.negation"),
    ({"steps": {9: "right"}}, "steps"),
    ({"steps": {0: "ok"}}, "steps.0"),
    ({}, "answer"),
])
def test_bad_answers_store_nothing(tmp_path, kw, field):
    path = _store(tmp_path)
    st = AnnotationStore(path)
    st.set_queue([_item("i1", "r1")])
    # a valid part next to the bad one is not stored either
    kw = {"steps": {**kw.get("steps", {}), 1: "right"}, "facts": kw.get("facts", {})} if kw else kw
    with pytest.raises(AnswerError) as ei:
        st.answer("i1", "alice", **kw)
    assert ei.value.field == field
    assert st.answers() == [] and FactStore.open(path).get("r1") == StepFacts(brand="mismatch")
    with pytest.raises(AnswerError, match="no item"):
        st.answer("nope", "alice", steps={0: "right"})


def test_leases_give_an_item_to_one_annotator_at_a_time(tmp_path):
    st = AnnotationStore(_store(tmp_path))
    st.set_queue([_item("i1", "r1"), _item("i2", "r2", need=2), _item("i3", "r3")])
    assert st.lease_next("alice", now=0) == "i1"
    assert st.lease_next("alice", now=1) == "i1"  # held: the same again
    assert st.lease_next("bob", now=1) == "i2"
    assert st.lease_holder("i1", now=1) == "alice"
    st.finish("i1", "alice", now=2)
    assert st.lease_next("alice", now=3) == "i3"  # i2 is bob's
    st.finish("i2", "bob", now=4)
    st.finish("i3", "alice", now=4)
    assert st.lease_next("bob", now=5) is None  # i1 and i3 need one annotator; bob did i2
    assert st.lease_next("alice", now=5) == "i2"  # needs two: alice is the second
    assert st.lease_next("carol", ttl_s=10, now=5) is None  # i2 leased to alice
    assert st.lease_next("carol", now=5 + 601) == "i2"  # alice's lease expired
    p = st.progress()
    assert (p["items"], p["complete"], p["annotators"]["alice"]["done"]) == (3, 2, 2)


def test_export_rebuilds_the_same_store(tmp_path):
    path = _store(tmp_path, [{"id": "r1", "facts": {"brand": "mismatch"}}, {"id": "r2", "facts": {"color": "match"}}])
    st = AnnotationStore(path)
    st.set_queue([_item("i1", "r1"), _item("i3", "r3")])
    st.answer("i1", "alice", facts={"brand": "match"}, now=0)
    st.answer("i3", "bob", facts={"negation": "yes"}, steps={0: "wrong"}, now=0)
    n, m = export_facts(path, tmp_path / "out.jsonl", answers_out=tmp_path / "log.jsonl")
    assert (n, m) == (3, 3)
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == [{"id": "r1", "facts": {"brand": "match"}}, {"id": "r2", "facts": {"color": "match"}},
                     {"id": "r3", "facts": {"negation": "yes"}}]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0] == {"item_id": "i1", "id": "r1", "annotator": "alice", "time": "1970-01-01T00:00:00Z",
                      "target": "fact:brand", "value": "match", "previous": "mismatch",
                      "previous_src": f"{tmp_path / 'ann.jsonl'}:1"}
    FactStore.build([tmp_path / "out.jsonl"], tmp_path / "again.sqlite")
    with FactStore.open(tmp_path / "again.sqlite") as fs:
        assert fs.get_many(["r1", "r2", "r3"]) == {"r1": StepFacts(brand="match"), "r2": StepFacts(color="match"),
                                                   "r3": StepFacts(negation="yes")}


def _writer(path, who, n, barrier):
    st = AnnotationStore(path)
    barrier.wait()
    for k in range(n):
        # every writer also writes the shared record r0: the read-modify-write of its facts row must not lose
        st.answer(f"i{k % 4}", who, steps={k % 5: "right" if k % 2 else "wrong"}, now=float(k))
        st.answer("shared", who, facts={("brand" if who == "a" else "color"): "match"}, now=float(k))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = _store(tmp_path)
    st = AnnotationStore(path)
    st.set_queue([_item(f"i{k}", f"r{k}") for k in range(4)] + [_item("shared", "r0")])
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(path), who, 40, barrier)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    answers = st.answers()
    assert len(answers) == 160 and len({a.n for a in answers}) == 160
    assert sum(a.annotator == "a" for a in answers) == 80
    assert FactStore.open(path).get("r0") == StepFacts(brand="match", color="match")  # both writers' facts


def _rec(rid="r1", label="Partial"):
    return Record(id=rid, query="dewalt drill", product=Product(title="DeWalt 20V drill", brand="DeWalt"), label=label,
                  taxonomy="esci4" if label in ("Substitute", "Complement") else "hd3")


def test_refresh_sees_in_place_writes_and_rebuilds(tmp_path):
    path = _store(tmp_path)
    fs = FactStore.open(path)
    assert fs.refresh() is False  # first call records the state
    assert fs.refresh() is False
    AnnotationStore(path).set_queue([_item("i1", "r1")])
    assert fs.refresh() is True and fs.generation == 1
    assert fs.refresh() is False
    FactStore.build([_write_lines(tmp_path / "new.jsonl", [{"id": "r9", "facts": {"color": "match"}}])], path)
    assert fs.refresh() is True and fs.get("r9") == StepFacts(color="match")  # reopened: the new file
    assert fs.get("r1") is None


def _write_lines(p, lines):
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def test_live_examiner_sees_new_facts_between_two_calls(tmp_path):
    path = _store(tmp_path, [{"id": "other", "facts": {"brand": "match"}}])
    rec = _rec()  # no facts of its own; label Partial allows several type relations: Type is undecidable
    parsed = parse_trace(TRACE, SCHEMA)
    ex = LiveFactsExaminer(VerifierExaminer(), path)
    first = ex.examine_batch([(parsed, rec)])[0]
    # Type undecidable; Attributes wrong already: Type same + brand=match implies Exact, the label says Partial
    assert first.scores[2:4] == [None, 0.0] and ex.last_new_fact_decisions == 0
    st = AnnotationStore(path)
    st.set_queue([_item("i1", "r1")])
    st.answer("i1", "alice", facts={"type_relation": "same", "brand": "mismatch"})
    second = ex.examine_batch([(parsed, rec)])[0]
    assert second.scores[2:4] == [1.0, 0.0]  # Type now right, Attributes (brand=match said) wrong
    assert second.sources[2:4] == ["verifier", "verifier"]
    assert (ex.last_new_fact_decisions, ex.new_fact_decisions, ex.reloads) == (1, 1, 1)  # only Type changed
    st.answer("i1", "bob", facts={"brand": "match"})  # a correction flips the Attributes step
    third = ex.examine_batch([(parsed, rec)])[0]
    assert third.scores[3] == 1.0 and ex.metrics() == {"facts/new_fact_decisions": 2.0,
                                                       "facts/new_fact_decisions_total": 3.0, "facts/store_reloads": 2.0}
    assert rec.facts == StepFacts()  # the trainer's record is untouched
    assert count_changed([None, 1.0, 0.0], [None, 1.0, 1.0]) == 1
