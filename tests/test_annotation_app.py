"""The annotation app over HTTP (FastAPI TestClient): auth, validation, escaping of untrusted product text,
leases, two clients answering at once, the stats page and the CLI."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
from fastapi.testclient import TestClient  # noqa: E402

from she.annotation.app import create_app, prepare, who_is  # noqa: E402
from she.data.annotations import AnnotationStore  # noqa: E402
from she.data.factstore import FactStore  # noqa: E402
from she.data.loaders import save_jsonl  # noqa: E402
from she.data.schema import Product, Record, StepFacts  # noqa: E402

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789xx"}
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _auth(who):
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def _records():
    recs = []
    for i in range(4):
        recs.append(Record(id=f"r{i}", query=f"dewalt drill {i}", label="Partial",
                           product=Product(title=f"DeWalt 20V drill {EVIL}", brand="DeWalt",
                                           description=f"desc {EVIL}", attributes={"size": EVIL})))
    return recs


@pytest.fixture
def env(tmp_path):
    save_jsonl(_records(), tmp_path / "data.jsonl")
    traces = tmp_path / "traces.jsonl"
    trace = "Query: drill\nProduct: drill; brand=DeWalt\nType: same\nAttributes: brand=match\nVerdict: Partial"
    traces.write_text("".join(json.dumps({"id": f"r{i}", "trace": trace}) + "\n" for i in range(4)))
    n = prepare(str(tmp_path / "data.jsonl"), str(tmp_path / "facts.sqlite"), traces=str(traces), qc_share=0.25)
    assert n == 4
    return tmp_path / "facts.sqlite"


def _lease(client, who):
    r = client.get("/", headers=_auth(who), follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"].rsplit("/", 1)[1].replace("%7E", "~")


def test_who_is_compares_every_token():
    assert who_is(TOKENS["bob"], TOKENS) == "bob"
    assert who_is("alice-token-012345678", TOKENS) is None  # a prefix is not a token
    assert who_is("", TOKENS) is None and who_is(None, TOKENS) is None


def test_no_or_wrong_token_is_401_and_login_sets_a_cookie(env):
    c = TestClient(create_app(env, TOKENS))
    for url in ("/", "/stats", "/api/stats", "/item/x"):
        assert c.get(url).status_code == 401
        assert c.get(url, headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    r = c.post("/api/answer", json={"item_id": "x", "steps": {"0": "right"}})
    assert r.status_code == 401 and r.json() == {"detail": "annotator token required"}
    assert c.post("/login", data={"token": "wrong"}).status_code == 401
    r = c.post("/login", data={"token": TOKENS["alice"]}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/", follow_redirects=False).status_code == 303  # the cookie now authenticates
    assert c.get("/healthz").status_code == 200


def test_page_escapes_untrusted_product_text(env):
    c = TestClient(create_app(env, TOKENS))
    iid = _lease(c, "alice")
    r = c.get(f"/item/{iid}", headers=_auth("alice"))
    assert r.status_code == 200
    assert EVIL not in r.text and "<img" not in r.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in r.text
    assert r.text.count("<script") == 2  # the JSON state block and the page's own nonce script
    assert "script-src 'nonce-" in r.headers["content-security-policy"]
    assert "Gold label" in r.text and "Partial" in r.text


def test_validation_is_4xx_and_stores_nothing(env):
    c = TestClient(create_app(env, TOKENS))
    iid = _lease(c, "alice")
    bad = [({"item_id": iid, "facts": {"brand": "maybe"}}, 422, "facts.brand"),
           ({"item_id": iid, "facts": {"query_class": "drills"}}, 422, "not a fact the page sets"),
           ({"item_id": iid, "steps": {"0": "right"}, "facts": {"colour": "match"}}, 422, "facts.colour"),
           ({"item_id": iid, "steps": {"0": "perhaps"}}, 422, "steps.0"),
           ({"item_id": iid, "steps": {"99": "right"}}, 422, "step index 99"),
           ({"item_id": iid, "steps": {"zero": "right"}}, 422, "not a step index"),
           ({"item_id": iid, "extra": 1, "steps": {"0": "right"}}, 422, "unknown field"),
           ({"steps": {"0": "right"}}, 422, "item_id"),
           ({"item_id": "nope", "steps": {"0": "right"}}, 404, "no item")]
    for body, status, words in bad:
        r = c.post("/api/answer", headers=_auth("alice"), json=body)
        assert r.status_code == status and words in r.json()["detail"], (body, r.status_code, r.text)
    r = c.post("/api/answer", headers={**_auth("alice"), "Content-Type": "text/plain"}, content=b"{}")
    assert r.status_code == 415
    st = AnnotationStore(env)
    assert st.answers() == [] and len(FactStore.open(env)) == 0


def test_right_step_states_its_facts_and_leases_are_exclusive(env):
    c = TestClient(create_app(env, TOKENS))
    iid = _lease(c, "alice")
    bob_iid = _lease(c, "bob")
    assert bob_iid != iid  # never the same item to two annotators at once
    assert c.get(f"/item/{iid}", headers=_auth("bob")).status_code == 409
    r = c.post("/api/answer", headers=_auth("bob"), json={"item_id": iid, "steps": {"2": "right"}})
    assert r.status_code == 409
    r = c.post("/api/answer", headers=_auth("alice"), json={"item_id": iid, "steps": {"2": "right", "3": "wrong"}})
    assert r.status_code == 200 and r.json()["stored"] == 3  # two marks + the Type step's fact
    rid = AnnotationStore(env).item(iid).record_id
    assert FactStore.open(env).get(rid) == StepFacts(type_relation="same")
    r = c.post("/api/answer", headers=_auth("alice"), json={"item_id": iid, "facts": {"type_relation": "related"}})
    st = r.json()["state"]["fact:type_relation"]
    assert (st["value"], st["previous"]) == ("related", "same")  # the correction shows what it replaced
    assert c.post("/api/skip", headers=_auth("alice"), json={"item_id": iid}).json() == {"next": "/"}
    assert AnnotationStore(env).lease_holder(iid) is None  # skipped: released, not done
    assert c.post("/api/other", headers=_auth("alice"), json={"item_id": iid}).status_code == 404
    assert _lease(c, "alice") == iid  # the first item again
    assert c.post("/api/finish", headers=_auth("alice"), json={"item_id": iid}).json() == {"next": "/"}
    stats = c.get("/api/stats", headers=_auth("alice")).json()
    assert stats["progress"]["annotators"]["alice"] == {"done": 1, "answers": 4}
    page = c.get("/stats", headers=_auth("alice"))
    assert page.status_code == 200 and "kappa" in page.text


def test_two_clients_answering_at_once_lose_nothing(env):
    apps = [create_app(env, TOKENS), create_app(env, TOKENS)]  # two app instances = two server processes' stores
    errors: list = []

    def work(who, app):
        c = TestClient(app)
        try:
            for _ in range(2):
                iid = _lease(c, who)
                for k in range(5):
                    for v in ("right", "wrong"):
                        r = c.post("/api/answer", headers=_auth(who), json={"item_id": iid, "steps": {str(k): v}})
                        assert r.status_code == 200, r.text
                assert c.post("/api/finish", headers=_auth(who), json={"item_id": iid}).status_code == 200
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w, a)) for w, a in zip(("alice", "bob"), apps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    st = AnnotationStore(env)
    answers = st.answers()
    # 2 items x 5 steps x 2 marks each, plus one implied Type fact per "right" on step 2
    assert len([a for a in answers if a.target.startswith("step:")]) == 40
    by = {}
    for a in answers:
        by.setdefault(a.annotator, set()).add(a.item_id)
    assert len(by["alice"]) == 2 and len(by["bob"]) == 2 and not by["alice"] & by["bob"]
    assert st.progress()["complete"] == 3  # 4 items; one is quality control and needs two annotators


def test_cli_export(env, tmp_path, capsys):
    from she.cli import main

    st = AnnotationStore(env)
    st.lease_next("alice")
    iid = st.lease_next("alice")
    st.answer(iid, "alice", facts={"brand": "match"})
    main(["data", "facts", "export", "--store", str(env), "--out", str(tmp_path / "f.jsonl"),
          "--answers", str(tmp_path / "a.jsonl")])
    assert "wrote 1 fact lines" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.jsonl").read_text())["facts"] == {"brand": "match"}
    assert json.loads((tmp_path / "a.jsonl").read_text())["annotator"] == "alice"
