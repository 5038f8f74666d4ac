"""The relevance service: batcher (fake scorer), fast scorer (hand-computed), HTTP API on the tiny model,
validation messages, metrics, the OpenAI chat endpoint and RemoteJudge against it over real HTTP."""

import asyncio
import json
import shutil
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from she.data.schema import Product, Record  # noqa: E402
from she.serving.backend import ChatResult, ItemError, apply_stop  # noqa: E402
from she.serving.batcher import DeadlineExceeded, DynamicBatcher, QueueFull, retry_after_s  # noqa: E402
from she.serving.metrics import percentile  # noqa: E402
from she.serving.schemas import loc_to_param  # noqa: E402

LABELS = ["Irrelevant", "Partial", "Exact"]


def _rec(i, query="cordless drill", title="DeWalt 20V cordless drill", **kw):
    return Record(id=str(i), query=query, product=Product(title=title, **kw))


# -- pure helpers ------------------------------------------------------------------------------------
def test_percentile_nearest_rank():
    vals = [5, 1, 4, 2, 3, 10, 9, 8, 7, 6]
    assert percentile(vals, 50) == 5
    assert percentile(vals, 90) == 9
    assert percentile(vals, 99) == 10
    assert percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(vals, 0)


def test_loc_to_param():
    assert loc_to_param(("body", "pairs", 3, "query")) == "pairs[3].query"
    assert loc_to_param(("body",)) == "body"
    assert loc_to_param(("body", "mode")) == "mode"


def test_apply_stop():
    assert apply_stop("1: good\n2: bad\nEND more", ["END", "\n2"]) == ("1: good", True)
    assert apply_stop("abc", ["x"]) == ("abc", False)


# -- batcher with a fake scoring function -----------------------------------------------------------
def test_batcher_splits_one_request_into_max_batch_chunks_in_order():
    sizes = []

    def score(key, items):
        sizes.append(len(items))
        return [x * 10 for x in items]

    b = DynamicBatcher(score, max_batch=4, max_wait_ms=20)
    try:
        assert b.submit("k", list(range(10))).result(timeout=10) == [x * 10 for x in range(10)]
        assert sizes == [4, 4, 2]
        assert b.stats_dict()["batch_sizes"] == {"2": 1, "4": 2}
    finally:
        b.close()


def test_batcher_groups_requests_by_key_oldest_first():
    gate = threading.Event()
    calls = []

    def score(key, items):
        if key == "gate":
            gate.wait(10)
        calls.append((key, list(items)))
        return [f"{key}:{x}" for x in items]

    b = DynamicBatcher(score, max_batch=8, max_wait_ms=0)
    try:
        g = b.submit("gate", [0])
        time.sleep(0.05)  # the worker is now blocked inside the gate batch
        f1, f2, f3 = b.submit("A", [1]), b.submit("B", [2]), b.submit("A", [3, 4])
        gate.set()
        assert f1.result(10) == ["A:1"] and f2.result(10) == ["B:2"] and f3.result(10) == ["A:3", "A:4"]
        assert g.result(10) == ["gate:0"]
        # both A requests share one batch, and A (older) goes before B
        assert calls == [("gate", [0]), ("A", [1, 3, 4]), ("B", [2])]
    finally:
        b.close()


def test_batcher_collects_concurrent_threads():
    sizes = []

    def score(key, items):
        sizes.append(len(items))
        return list(items)

    b = DynamicBatcher(score, max_batch=64, max_wait_ms=300)
    barrier = threading.Barrier(8)
    out = {}

    def client(i):
        barrier.wait()
        out[i] = b.submit("k", [i]).result(10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        b.close()
    assert out == {i: [i] for i in range(8)}  # every request got its own result back
    assert sum(sizes) == 8 and max(sizes) > 1


def test_batcher_waits_at_most_about_max_wait_for_a_lone_item():
    b = DynamicBatcher(lambda k, xs: xs, max_batch=8, max_wait_ms=150)
    try:
        t0 = time.monotonic()
        assert b.submit("k", [1]).result(10) == [1]
        assert time.monotonic() - t0 >= 0.14  # it did wait for company
    finally:
        b.close()
    b = DynamicBatcher(lambda k, xs: xs, max_batch=1, max_wait_ms=10_000)
    try:
        t0 = time.monotonic()
        assert b.submit("k", [1]).result(10) == [1]
        assert time.monotonic() - t0 < 5  # a full batch never waits
    finally:
        b.close()


def test_batcher_errors_reach_the_request_and_the_worker_survives():
    def score(key, items):
        if key == "boom":
            raise RuntimeError("model exploded")
        if key == "short":
            return items[:-1]
        return items

    b = DynamicBatcher(score, max_batch=8, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            b.submit("boom", [1, 2]).result(10)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            b.submit("short", [1, 2]).result(10)
        assert b.submit("ok", [5]).result(10) == [5]
        assert b.stats_dict()["failed_batches"] == 2
    finally:
        b.close()


def _gated_scorer():
    """(gate, seen, score): ``score`` echoes its items and records each batch in ``seen``; a batch of key
    "gate" blocks until ``gate`` is set, so a test can queue requests behind it."""
    gate = threading.Event()
    seen = []

    def score(key, items):
        if key == "gate":
            gate.wait(10)
        seen.append(list(items))
        return list(items)

    return gate, seen, score


def test_batcher_skips_cancelled_requests():
    gate, seen, score = _gated_scorer()
    b = DynamicBatcher(score, max_batch=8, max_wait_ms=0)
    try:
        b.submit("gate", [0])
        time.sleep(0.05)
        gone, kept = b.submit("k", [1]), b.submit("k", [2])
        assert gone.cancel()  # what asyncio does when a client's request times out
        gate.set()
        assert kept.result(10) == [2]
        assert seen == [[0], [2]]  # the cancelled pair never reached the scorer
        assert b.stats_dict()["cancelled_items"] == 1  # ... and is counted, not silently gone
    finally:
        b.close()


def test_batcher_queue_limit():
    gate = threading.Event()
    b = DynamicBatcher(lambda k, xs: (gate.wait(10), xs)[1], max_batch=1, max_wait_ms=0, max_queue=2)
    try:
        b.submit("k", [0])
        time.sleep(0.05)  # taken by the worker, no longer queued
        b.submit("k", [1, 2])
        with pytest.raises(QueueFull, match="limit 2") as e:
            b.submit("k", [3])
        assert e.value.retry_after_s == 1  # no batch finished yet: nothing measured, the floor
    finally:
        gate.set()
        b.close()


def test_retry_after_is_the_queue_over_the_recent_rate_rounded_up():
    assert retry_after_s(100, [(10, 1.0), (30, 1.0)]) == 5  # 40 items in 2 s: 20/s, 100 queued -> 5 s
    assert retry_after_s(101, [(10, 1.0), (30, 1.0)]) == 6  # rounded up
    assert retry_after_s(1, [(64, 0.5)]) == 1  # at least 1
    assert retry_after_s(0, [(64, 0.5)]) == 1
    assert retry_after_s(500, []) == 1  # nothing measured yet


def test_batcher_drops_items_whose_deadline_passed_in_the_queue():
    gate, seen, score = _gated_scorer()
    b = DynamicBatcher(score, max_batch=8, max_wait_ms=0)
    try:
        b.submit("gate", [0])
        time.sleep(0.05)  # the worker is blocked inside the gate batch
        late = b.submit("k", [1, 2], deadline=time.monotonic() - 1)  # already passed
        soon = b.submit("k", [3], deadline=time.monotonic() + 0.05)  # passes while queued
        kept = b.submit("k", [4], deadline=time.monotonic() + 60)
        time.sleep(0.1)
        gate.set()
        assert kept.result(10) == [4]
        for fut in (late, soon):
            with pytest.raises(DeadlineExceeded, match="in the queue; the request's pairs not yet scored were dropped"):
                fut.result(10)
        assert seen == [[0], [4]]  # the expired items never reached the scorer
        assert b.stats_dict()["expired_items"] == 3
    finally:
        gate.set()
        b.close()


# -- fast scorer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from she.models.registry import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir)


def _hand_fast_probs(model, tok, record, style="full", prefix="Verdict:"):
    """Forward of the single unpadded sequence; softmax over the three label tokens at its last position."""
    import torch

    from she.reasoning.prompts import build_messages

    text = tok.apply_chat_template(build_messages(record, style=style), tokenize=False,
                                   add_generation_prompt=True) + prefix
    ids = tok.encode(text, add_special_tokens=False)
    label_ids = [tok.encode(" " + lab, add_special_tokens=False)[0] for lab in LABELS]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    p = torch.softmax(logits[label_ids], dim=-1)
    return dict(zip(LABELS, p.tolist()))


def test_score_labels_fast_matches_hand_computation_in_mixed_batch(tiny):
    from she.evaluation.fast import score_labels_fast

    model, tok = tiny
    recs = [_rec(0), _rec(1, query="white paint", title="Behr Premium Plus interior white flat paint 1 gal",
                          brand="Behr", color="white", description="Low odor paint for walls")]
    js = score_labels_fast(model, tok, recs, batch_size=2)  # different lengths: padding must not matter
    for r, j in zip(recs, js):
        want = _hand_fast_probs(model, tok, r)
        assert j.record_id == r.id and j.text == "" and j.format_ok is True
        assert set(j.probs) == set(LABELS)
        for lab in LABELS:
            assert j.probs[lab] == pytest.approx(want[lab], abs=1e-5)
        assert j.label == max(LABELS, key=want.get)
        assert 0.0 < j.label_mass <= 1.0


def test_score_labels_fast_with_a_per_record_prefix(tiny):
    from she.evaluation.fast import score_labels_fast

    model, tok = tiny
    recs = [_rec(0), _rec(1, query="white paint", title="Behr paint")]
    pf = lambda r: f"Query: {r.query}\nType: same\nVerdict:"  # noqa: E731
    js = score_labels_fast(model, tok, recs, prefix=pf, batch_size=2)
    for r, j in zip(recs, js):
        assert j.probs == pytest.approx(_hand_fast_probs(model, tok, r, prefix=pf(r)), abs=1e-5)
    assert js[0].probs != pytest.approx(score_labels_fast(model, tok, recs[:1])[0].probs, abs=1e-6)
    with pytest.raises(ValueError, match="does not tokenize as"):
        score_labels_fast(model, tok, recs, prefix=lambda r: "Type: same\nVerdict: ")


def test_prefix_label_tokens_rejects_a_prefix_that_splits_the_label(tiny):
    from she.evaluation.fast import prefix_label_tokens

    _, tok = tiny
    ids, sep = prefix_label_tokens(tok, "Verdict:", LABELS)
    assert sep == " " and ids == [tok.encode(" " + lab, add_special_tokens=False)[0] for lab in LABELS]
    # "Verdict: " ends in a space token, but in real text the space is part of " Exact"
    with pytest.raises(ValueError, match="does not tokenize as"):
        prefix_label_tokens(tok, "Verdict: ", LABELS)


# -- the HTTP API on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_model_dir):
    from she.serving.app import create_app

    # fp32 everywhere (bf16=False), so fast answers can be checked against an unbatched fp32 forward to 1e-5;
    # the default precision is checked against `she predict --fast` below
    app = create_app(tiny_model_dir, max_new_tokens=12, max_request_pairs=8, max_text_chars=100, batch_wait_ms=1,
                     bf16=False)
    with TestClient(app) as c:
        yield c


PAIRS = [{"query": "cordless drill", "title": "DeWalt 20V cordless drill", "id": "a"},
         {"query": "white paint", "title": "Behr white flat paint", "brand": "Behr", "color": "white"},
         {"query": "drill bit", "title": "Cordless drill", "description": "A drill", "id": 7}]


def test_relevance_fast_shape_probs_and_hand_values(client, tiny):
    r = client.post("/v1/relevance", json={"pairs": PAIRS, "mode": "fast"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "fast" and body["taxonomy"] == "hd3"
    assert body["approximate"] is True  # tiny has no she.json: not a label-target model
    res = body["results"]
    assert [x["id"] for x in res] == ["a", 1, 7]  # echoed, or the position when absent
    model, tok = tiny
    for pair, x in zip(PAIRS, res):
        assert set(x) == {"id", "label", "probs", "format_ok", "label_mass"}  # no reasoning in fast mode
        assert sum(x["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert x["label"] == max(x["probs"], key=x["probs"].get)
        rec = Record(id="x", query=pair["query"], product=Product(title=pair["title"], brand=pair.get("brand"),
                                                                  color=pair.get("color"),
                                                                  description=pair.get("description")))
        want = _hand_fast_probs(model, tok, rec)
        assert x["probs"] == pytest.approx(want, abs=1e-5)


def test_relevance_full_generates_the_same_reasoning_as_generate_judgements(client, tiny):
    from she.evaluation.generate import generate_judgements

    r = client.post("/v1/relevance", json={"pairs": PAIRS[:2], "mode": "full", "return_reasoning": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert r.json()["approximate"] is False
    model, tok = tiny
    recs = [Record(id=str(i), query=p["query"], product=Product(title=p["title"], brand=p.get("brand"),
                                                                 color=p.get("color"))) for i, p in enumerate(PAIRS[:2])]
    want = generate_judgements(model, tok, recs, max_new_tokens=12, bf16=False, progress=False)
    for x, j in zip(res, want):
        assert set(x) == {"id", "label", "probs", "format_ok", "reasoning"}
        assert x["reasoning"] == j.text and x["label"] == j.label and x["format_ok"] == j.format_ok
        if x["probs"] is not None:
            assert sum(x["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    r = client.post("/v1/relevance", json={"pairs": PAIRS[:1], "mode": "full"})
    assert "reasoning" not in r.json()["results"][0]


@pytest.mark.parametrize("body,status,param,words", [
    ({"pairs": []}, 422, "pairs", "at least one"),
    ({"pairs": [PAIRS[0]] * 9}, 422, "pairs", "over the limit of 8"),
    ({"pairs": [PAIRS[0], PAIRS[0], PAIRS[0], {"title": "x"}]}, 422, "pairs[3].query", "Field required"),
    ({"pairs": [{"query": 5, "title": "x"}]}, 422, "pairs[0].query", "valid string"),
    ({"pairs": [{"query": "   ", "title": "x"}]}, 422, "pairs[0].query", "must not be empty"),
    ({"pairs": [{"query": "q", "title": "x" * 101}]}, 422, "pairs[0].title", "101 characters, over the limit of 100"),
    ({"pairs": [{"query": "q", "title": "t", "description": "d" * 500}]}, 422, "pairs[0].description", "500"),
    ({"pairs": [{"query": "q", "title": "t", "titel": "x"}]}, 422, "pairs[0].titel", "Extra inputs"),
    ({"pairs": [{"query": "q", "title": "t", "id": 1.5}]}, 422, "pairs[0].id", "string or an integer"),
    ({"pairs": [{"query": "q", "title": "t"}], "mode": "slow"}, 422, "mode", "'fast', 'full', 'computed' or 'marginal'"),
    ({"pairs": [{"query": "q", "title": "t"}], "return_reasoning": "yes"}, 422, "return_reasoning", "boolean"),
    ({"pairs": [{"query": "q", "title": "t"}], "mode": "fast", "return_reasoning": True}, 422, "return_reasoning",
     "fast mode scores the label without writing reasoning"),
    ({"pairs": "q"}, 422, "pairs", "valid list"),
    ([1, 2], 422, "body", "dictionary"),
])
def test_relevance_validation_names_the_field(client, body, status, param, words):
    r = client.post("/v1/relevance", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert words in err["message"] and err["message"].startswith(param)


def test_malformed_json_and_unknown_path_are_json_errors(client):
    r = client.post("/v1/relevance", content=b'{"pairs": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert "invalid JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "path: Not Found"
    r = client.get("/v1/relevance")
    assert r.status_code == 405 and "error" in r.json()


def test_too_long_prompt_is_an_item_error_not_a_crash(client):
    backend = client.app.state.backend
    long = _rec(0, title="drill " * 900)  # far over the tiny model's 1024 positions
    out = backend.run(("fast",), [long, _rec(1)])
    assert isinstance(out[0], ItemError) and "context of 1024" in out[0].message
    assert not isinstance(out[1], ItemError) and out[1].label in LABELS


def test_health_and_models(client, tiny_model_dir):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True
    assert h["model"] == str(tiny_model_dir) and h["taxonomy"] == "hd3" and h["labels"] == LABELS
    assert h["fast_mode"] == "approximate" and h["prompt_style"] == "full" and h["target"] is None
    assert client.get("/v1/models").json()["data"][0]["id"] == str(tiny_model_dir)


def test_chat_completion_shape(client):
    r = client.post("/v1/chat/completions", json={
        "model": "whatever", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 5, "temperature": 0.0})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    (choice,) = d["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    u = d["usage"]
    assert 0 < u["completion_tokens"] <= 5 and u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"), ({"stream": True}, "stream"), ({"max_tokens": 100000}, "max_tokens"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ({"temperature": 5}, "temperature"),
])
def test_chat_validation(client, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


# -- with an injected backend: batching through HTTP, metrics, crashes, RemoteJudge -------------------
class FakeBackend:
    """Scores without a model; records every batch it is given."""

    name = "fake"
    taxonomy = "hd3"
    labels = LABELS
    fast_exact = False

    def __init__(self, chat_answer="1: good\n2: bad", delay=0.0, fail=False, gate=None):
        self.batches, self.chat_answer, self.delay, self.fail = [], chat_answer, delay, fail
        self.gate = gate  # a threading.Event: each batch waits for it (a worker busy for as long as a test wants)

    def info(self):
        return {"model": self.name, "taxonomy": self.taxonomy, "labels": self.labels, "fast_mode": "approximate"}

    def run(self, key, items):
        from she.evaluation.fast import FastJudgement

        self.batches.append((key, list(items)))
        if self.fail:
            raise RuntimeError("secret internal detail")
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        if key[0] == "chat":
            return [ChatResult(self.chat_answer, 10, 4, "stop") for _ in items]
        return [FastJudgement(r.id, "", "Exact", {"Irrelevant": 0.2, "Partial": 0.3, "Exact": 0.5}, True,
                              label_mass=0.9) for r in items]


def test_concurrent_http_requests_share_batches():
    import httpx

    from she.serving.app import create_app

    fake = FakeBackend()
    app = create_app(backend=fake, batch_wait_ms=300, max_batch_pairs=64)

    async def fire():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = lambda i: {"pairs": [{"query": f"q{i}", "title": "t", "id": f"r{i}"}], "mode": "fast"}  # noqa: E731
            return await asyncio.gather(*(c.post("/v1/relevance", json=body(i)) for i in range(6)))

    try:
        responses = asyncio.run(fire())
    finally:
        app.state.batcher.close()
    assert [r.json()["results"][0]["id"] for r in responses] == [f"r{i}" for i in range(6)]
    sizes = [len(items) for _, items in fake.batches]
    assert sum(sizes) == 6 and max(sizes) > 1  # concurrent requests were scored together


def test_metrics_count_requests_pairs_errors_and_batches():
    from she.serving.app import create_app

    app = create_app(backend=FakeBackend(), batch_wait_ms=0)
    with TestClient(app) as c:
        pair = {"query": "q", "title": "t"}
        assert c.post("/v1/relevance", json={"pairs": [pair] * 3, "mode": "fast"}).status_code == 200
        assert c.post("/v1/relevance", json={"pairs": [pair] * 2, "mode": "full"}).status_code == 200
        assert c.post("/v1/relevance", json={"pairs": []}).status_code == 422
        m = c.get("/metrics").json()
    assert m["requests"]["relevance"] == 3
    assert m["pairs"] == {"total": 5, "fast": 3, "full": 2}
    assert m["errors"]["client"] == 1 and m["errors"]["server"] == 0
    lat = m["latency"]["relevance"]
    assert lat["n"] == 3 and 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert m["batches"]["items"] == 5 and m["batches"]["batches"] == 2 and m["batches"]["max_batch_size"] == 3


def test_scorer_crash_is_a_json_500_without_traceback():
    from she.serving.app import create_app

    app = create_app(backend=FakeBackend(fail=True), batch_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/relevance", json={"pairs": [{"query": "q", "title": "t"}]})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "Traceback" not in r.text and "secret internal detail" not in r.text


# -- API key, Retry-After, the client's deadline ------------------------------------------------------
KEY = "s3cret-key_1"
FAST_BODY = {"pairs": [{"query": "q", "title": "t"}], "mode": "fast"}


def _wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


def test_api_key_guards_every_path_but_health():
    from she.serving.app import create_app

    fake = FakeBackend()
    app = create_app(backend=fake, batch_wait_ms=0, api_key=KEY)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # open: a liveness probe carries no secret
        refused = [({}, "Bearer", "missing"),
                   ({"Authorization": "Bearer wrong-key"}, 'Bearer error="invalid_token"', "not this server's API key"),
                   ({"Authorization": f"Bearer {KEY}x"}, 'Bearer error="invalid_token"', "not this server's API key"),
                   ({"Authorization": KEY}, 'Bearer error="invalid_token"', "must be 'Bearer <API key>'"),
                   ({"Authorization": f"Basic {KEY}"}, 'Bearer error="invalid_token"', "must be 'Bearer <API key>'")]
        for headers, challenge, words in refused:
            r = c.post("/v1/relevance", json=FAST_BODY, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["WWW-Authenticate"] == challenge
            err = r.json()["error"]
            assert err["param"] == "Authorization" and err["type"] == "authentication_error" and words in err["message"]
            assert KEY not in r.text
        for path in ("/metrics", "/v1/models", "/v1/nothing"):
            assert c.get(path).status_code == 401, path
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/relevance", json=FAST_BODY, headers=ok).status_code == 200
        assert c.post("/v1/relevance", json=FAST_BODY, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        m = c.get("/metrics", headers=ok).json()
    assert len(fake.batches) == 2  # refused requests never reached the model
    assert m["errors"]["by_endpoint"]["relevance"]["client"] == len(refused)  # ... but are counted


def test_api_key_flag_wins_over_the_environment_and_an_empty_key_is_an_error():
    from she.errors import UserError
    from she.serving.app import create_app, resolve_api_key

    assert resolve_api_key(None, {}) == (None, None)
    assert resolve_api_key(None, {"SHE_API_KEY": "env-key"}) == ("env-key", "SHE_API_KEY")
    assert resolve_api_key("flag-key", {"SHE_API_KEY": "env-key"}) == ("flag-key", "--api-key")
    with pytest.raises(UserError, match="SHE_API_KEY is empty"):
        resolve_api_key(None, {"SHE_API_KEY": ""})  # set but empty: an error, not a silent open server
    with pytest.raises(UserError, match="--api-key: .*without spaces"):
        resolve_api_key("two words", {})
    with pytest.raises(UserError, match="api_key is empty"):
        create_app(backend=FakeBackend(), api_key="")


def test_remote_judge_sends_its_api_key_over_real_http():
    pytest.importorskip("uvicorn")
    from she.rewards.judge import RemoteJudge
    from she.serving.app import create_app
    from she.serving.runner import BackgroundServer

    fake = FakeBackend(chat_answer="1: good\n2: bad\n3: good\n4: bad\n5: good")
    with BackgroundServer(create_app(backend=fake, batch_wait_ms=0, api_key=KEY)) as srv:
        good = RemoteJudge(base_url=f"{srv.url}/v1", model="fake", timeout=10, max_retries=0, api_key=KEY)
        bad = RemoteJudge(base_url=f"{srv.url}/v1", model="fake", timeout=10, max_retries=1, api_key="wrong")
        assert good.score_steps(_parsed_trace(), _rec("r1")) == [1.0, 0.0, 1.0, 0.0, 1.0]
        bad.score_steps(_parsed_trace(), _rec("r2"))
    assert good.stats.failed_requests == 0
    assert bad.stats.failed_requests == 1 and bad.fault_counts["http_4xx"] == 1
    assert bad.fault_counts["retries"] == 0  # a 401 is not retried: the same key fails the same way
    assert len(fake.batches) == 1


def test_full_queue_answers_503_with_a_retry_after_estimate():
    from she.serving.app import create_app

    gate = threading.Event()
    fake = FakeBackend(gate=gate)
    app = create_app(backend=fake, batch_wait_ms=0, max_batch_pairs=1, max_request_pairs=2, max_queue_pairs=2)
    batcher = app.state.batcher
    with TestClient(app) as c:
        try:
            batcher.submit(("fast",), [_rec("busy")])
            _wait_for(lambda: len(fake.batches) == 1)  # the worker holds it, inside the gate
            batcher.submit(("fast",), [_rec(1), _rec(2)])  # the queue is full now
            r = c.post("/v1/relevance", json=FAST_BODY)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"  # nothing measured yet: the floor
            err = r.json()["error"]
            assert err["type"] == "server_busy" and "try again in about 1 s" in err["message"]
            batcher._recent.append((1, 7.0))  # as if the last batch scored 1 pair in 7 s
            r = c.post("/v1/relevance", json=FAST_BODY)
            assert r.status_code == 503 and r.headers["Retry-After"] == "14"  # 2 queued pairs at 1/7 pair/s
        finally:
            gate.set()


def test_client_deadline_passed_in_the_queue_is_a_504_and_its_pairs_are_never_scored():
    from she.serving.app import create_app

    gate = threading.Event()
    fake = FakeBackend(gate=gate)
    app = create_app(backend=fake, batch_wait_ms=0)
    with TestClient(app) as c:
        try:
            app.state.batcher.submit(("fast",), [_rec("busy")])
            _wait_for(lambda: len(fake.batches) == 1)  # the worker is busy for as long as the gate is shut
            late = {"pairs": [{"query": "q", "title": "t", "id": "late"}], "mode": "fast"}
            r = c.post("/v1/relevance", json=late, headers={"X-Deadline-S": "0.2"})
            assert r.status_code == 504, r.text
            err = r.json()["error"]
            assert err["param"] == "X-Deadline-S" and err["type"] == "timeout"
            assert "deadline of 0.2 s" in err["message"] and "dropped" in err["message"]
            gate.set()
            after = {"pairs": [{"query": "q", "title": "t", "id": "after"}], "mode": "fast"}
            assert c.post("/v1/relevance", json=after, headers={"X-Deadline-S": "30"}).status_code == 200
            m = c.get("/metrics").json()
        finally:
            gate.set()
    assert [r.id for _, items in fake.batches for r in items] == ["busy", "after"]  # "late" never reached the model
    assert m["batches"]["cancelled_items"] + m["batches"]["expired_items"] == 1  # its drop is counted


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_bad_deadline_header_names_the_header(value):
    from she.serving.app import create_app

    app = create_app(backend=FakeBackend(), batch_wait_ms=0)
    with TestClient(app) as c:
        r = c.post("/v1/relevance", json=FAST_BODY, headers={"X-Deadline-S": value})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "X-Deadline-S" and "number of seconds > 0" in err["message"]


def _parsed_trace():
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import default_schema

    return parse_trace("Query: cordless drill\nProduct: drill; brand=DeWalt\nType: same\n"
                       "Attributes: none\nVerdict: Exact", default_schema("hd3"))


def test_remote_judge_reads_this_server_over_real_http():
    pytest.importorskip("uvicorn")
    from she.rewards.judge import REMOTE_INSTRUCTION, RemoteJudge
    from she.serving.app import create_app
    from she.serving.runner import BackgroundServer

    fake = FakeBackend(chat_answer="1: good\n2: bad\n3: good\n4: bad\n5: good")
    with BackgroundServer(create_app(backend=fake, batch_wait_ms=0)) as srv:
        judge = RemoteJudge(base_url=f"{srv.url}/v1", model="fake", timeout=10, max_retries=0)
        scores = judge.score_steps(_parsed_trace(), _rec("r1"))
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert judge.stats.failed_requests == 0 and judge.stats.unparseable_answers == 0
    assert all(v == 0 for v in judge.fault_counts.values())
    (key, items), = fake.batches
    assert key == ("chat", 64, 0.0, 1.0)  # RemoteJudge's max_tokens and temperature arrive
    assert items[0].messages[0] == ("system", REMOTE_INSTRUCTION)


def test_remote_judge_against_the_tiny_model_gets_answers(client):
    """The tiny model writes nonsense, but every request must be a well-formed chat completion."""
    pytest.importorskip("uvicorn")
    from she.rewards.judge import RemoteJudge
    from she.serving.app import create_app
    from she.serving.runner import BackgroundServer

    app = create_app(backend=client.app.state.backend, batch_wait_ms=0)  # same loaded model, own batcher
    with BackgroundServer(app) as srv:
        judge = RemoteJudge(base_url=f"{srv.url}/v1", model="tiny", timeout=30, max_retries=0, max_tokens=8)
        scores = judge.score_steps(_parsed_trace(), _rec("r1"))
    assert len(scores) == 5
    assert judge.stats.failed_requests == 0  # transport and response format were fine
    assert {k: judge.fault_counts[k] for k in ("timeout", "connection", "http_5xx", "http_4xx", "http_429")} == \
        dict.fromkeys(("timeout", "connection", "http_5xx", "http_4xx", "http_429"), 0)


# -- she.json, predict --fast, CLI --------------------------------------------------------------------
def test_label_target_model_fast_mode_is_exact_and_uses_its_prompt_style(tmp_path, tiny_model_dir, tiny):
    from she.serving.app import create_app
    from she.serving.backend import JudgeBackend
    from she.models.metadata import save_she_meta

    d = tmp_path / "label-model"
    shutil.copytree(tiny_model_dir, d)
    save_she_meta(d, {"prompt_style": "compact", "target": "label", "taxonomy": "hd3"})
    app = create_app(d, batch_wait_ms=0, bf16=False)
    with TestClient(app) as c:
        h = c.get("/health").json()
        body = c.post("/v1/relevance", json={"pairs": PAIRS[:1], "mode": "fast"}).json()
    assert h["fast_mode"] == "exact" and h["prompt_style"] == "compact" and h["target"] == "label"
    assert body["approximate"] is False
    model, tok = tiny
    rec = Record(id="a", query=PAIRS[0]["query"], product=Product(title=PAIRS[0]["title"]))
    compact = _hand_fast_probs(model, tok, rec, style="compact")
    full = _hand_fast_probs(model, tok, rec, style="full")
    assert body["results"][0]["probs"] == pytest.approx(compact, abs=1e-5)
    assert any(abs(compact[k] - full[k]) > 1e-6 for k in LABELS)  # the style really mattered
    with pytest.raises(ValueError, match="trained with taxonomy 'hd3'"):
        JudgeBackend.load(d, taxonomy="esci4")


def test_service_fast_mode_answers_exactly_as_she_predict_fast(tmp_path, tiny_model_dir, tiny):
    """One path (FastScorer) with one set of defaults: bf16 autocast, length-sorted batches of 16. Before, the
    service ran fast mode in fp32 in one unsorted batch (half she predict --fast's speed on the CPU)."""
    from she.data.synthetic import generate
    from she.evaluation.evaluate import predict
    from she.evaluation.fast import FastScorer
    from she.serving.app import create_app

    pairs = [{"query": r.query, "title": r.product.title, "brand": r.product.brand, "color": r.product.color,
              "description": r.product.description, "id": str(i)}
             for i, r in enumerate(generate(n_queries=5, products_per_query=4, seed=3))]  # 20 pairs, mixed lengths
    recs = [Record(id=p["id"], query=p["query"], product=Product(title=p["title"], brand=p["brand"], color=p["color"],
                                                                 description=p["description"])) for p in pairs]
    out = tmp_path / "fast.jsonl"
    predict(str(tiny_model_dir), recs, out, fast=True, progress=False)  # she predict --fast's defaults
    want = [json.loads(x) for x in out.read_text().splitlines()]
    app = create_app(tiny_model_dir, batch_wait_ms=0, max_request_pairs=32)  # she serve's defaults
    with TestClient(app) as c:
        h = c.get("/health").json()
        r = c.post("/v1/relevance", json={"pairs": pairs, "mode": "fast"})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert h["fast_bf16"] is True and h["fast_batch_size"] == 16
    assert [g["id"] for g in got] == [w["id"] for w in want]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["probs"] for g in got] == [w["probs"] for w in want]  # bit for bit: the same computation
    # the comparison can tell precisions apart: fp32 (the service's old fast mode on CPU) reads other numbers
    model, tok = tiny
    fp32 = FastScorer(model, tok, bf16=False).score(recs)
    assert max(abs(j.probs[lab] - w["probs"][lab]) for j, w in zip(fp32, want) for lab in LABELS) > 1e-4


def test_predict_fast_writes_probabilities(tmp_path, tiny_model_dir, tiny):
    from she.evaluation.evaluate import predict

    recs = [_rec(0), _rec(1, query="white paint", title="Behr paint")]
    out = tmp_path / "p.jsonl"
    assert predict(str(tiny_model_dir), recs, out, fast=True, bf16=False, progress=False) == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    model, tok = tiny
    for r, d in zip(recs, lines):
        assert d["id"] == r.id and d["reasoning"] == "" and d["format_ok"] is True
        assert d["probs"] == pytest.approx(_hand_fast_probs(model, tok, r), abs=1e-5)


def test_cli_flags_and_missing_serve_extra(monkeypatch, capsys):
    from she.cli import build_parser, main

    a = build_parser().parse_args(["predict", "--model", "m", "--out", "o", "--data", "d", "--fast"])
    assert a.fast is True
    a = build_parser().parse_args(["serve", "--model", "m", "--port", "9001", "--max-batch", "8"])
    assert (a.host, a.port, a.max_batch, a.batch_wait_ms) == ("127.0.0.1", 9001, 8, 5)
    assert (a.api_key, a.fast_batch_size, a.max_queue_pairs, a.request_timeout_s) == (None, None, 4096, 300)
    a = build_parser().parse_args(["serve", "--model", "m", "--api-key", "k", "--fast-batch-size", "64",
                                   "--max-queue-pairs", "512", "--request-timeout-s", "30"])
    assert (a.api_key, a.fast_batch_size, a.max_queue_pairs, a.request_timeout_s) == ("k", 64, 512, 30)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` raise ImportError
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "m"])
    assert e.value.code == 2
    assert "pip install 'she[serve]'" in capsys.readouterr().err


def test_backend_serves_in_the_models_schema(tiny, monkeypatch):
    """The backend passes the model's own schema to generation, whichever thread runs the batch."""
    import threading

    import she.evaluation.generate as gen
    from she.serving.backend import JudgeBackend

    model, tok = tiny
    with pytest.raises(ValueError, match="unknown schema"):
        JudgeBackend(model, tok, name="t", schema="nope")
    backend = JudgeBackend(model, tok, name="t", schema="coverage")
    plain = JudgeBackend(model, tok, name="t")
    assert backend.info()["schema"] == "coverage" and plain.info()["schema"] == "default"
    seen = []
    monkeypatch.setattr(gen, "generate_judgements",
                        lambda *a, schema=None, **k: seen.append([s.key for s in schema.steps]) or [None] * len(a[2]))
    recs = [Record(id="1", query="drill", product=Product(title="Cordless Drill"))]
    for b in (backend, plain, backend):  # two schemas side by side in the worker thread
        t = threading.Thread(target=b.run, args=(("full",), recs))
        t.start()
        t.join()
    assert ["Missing" in s for s in seen] == [True, False, True]


@pytest.mark.parametrize("mode, schema, needs", [("computed", "evidence", "depend on the label"),
                                                ("marginal", "decision", "choice step right before")])
def test_computed_and_marginal_modes_answer_as_she_predict_evidence(mode, schema, needs, tmp_path, tiny_model_dir):
    """Mode `computed` (the label-free steps computed from the pair and forced) and mode `marginal` (generated steps,
    the verdict averaged over the step before it), each with the model's offsets of that mode: the same answers as
    `she predict --evidence <mode>`. A schema the mode cannot read (the default one) is a 422."""
    import shutil

    from she.evaluation.evaluate import predict
    from she.models.metadata import load_she_meta, save_she_meta
    from she.serving.app import create_app

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    meta = load_she_meta(model)
    meta.update({"schema": schema, f"label_offsets_{mode}": {"Irrelevant": 0.0, "Partial": 0.3, "Exact": 0.0}})
    save_she_meta(model, meta)
    pairs = [{"query": "cordless 20v dewalt drills", "title": "DEWALT 18-Volt Drill/Driver Kit", "id": "a"},
             {"query": "white paint", "title": "Behr white flat paint", "brand": "Behr", "id": "b"}]
    recs = [Record(id=p["id"], query=p["query"], product=Product(title=p["title"], brand=p.get("brand")))
            for p in pairs]
    out = tmp_path / "p.jsonl"
    predict(str(model), recs, out, evidence=mode, progress=False, max_new_tokens=24)
    want = [json.loads(x) for x in out.read_text().splitlines()]
    app = create_app(model, batch_wait_ms=0, max_new_tokens=24)
    with TestClient(app) as c:
        r = c.post("/v1/relevance", json={"pairs": pairs, "mode": mode, "return_reasoning": True})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["probs"] for g in got] == [w["probs"] for w in want]
    assert [g["reasoning"] for g in got] == [w["reasoning"] for w in want]
    if mode == "computed":
        assert "\nMissing: cordless, 20\n" in got[0]["reasoning"] and "\nVerdict: " in got[0]["reasoning"]
    with TestClient(create_app(tiny_model_dir, batch_wait_ms=0, max_new_tokens=24)) as c:
        r = c.post("/v1/relevance", json={"pairs": pairs[:1], "mode": mode})
    assert r.status_code == 422 and needs in r.text


def test_serve_precision_flag_reaches_the_backend(monkeypatch):
    import she.serving.app as app

    from she.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--model", "m"]).precision == "auto"
    seen = []
    monkeypatch.setattr(app, "serve", lambda model, **kw: seen.append(kw["bf16"]))
    for flag, want in (("auto", None), ("bf16", True), ("fp32", False)):
        main(["serve", "--model", "m", "--precision", flag])
        assert seen[-1] is want
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--precision", "fp16"])


def test_bf16_backend_packs_its_weights_once_and_answers_as_unpacked(tiny_model_dir, monkeypatch):
    """A bf16 backend on a CPU keeps its linear layers packed (she.models.generation.packed_linears) from load on;
    full mode's judgements are those of the same model unpacked: the packed products are autocast's bit for bit."""
    import torch

    from she.models.decode_step import packed_linear_ops
    from she.serving.backend import JudgeBackend

    if packed_linear_ops() is None:
        pytest.skip("this torch build has no oneDNN linear ops (torch.ops.mkldnn)")
    recs = [_rec(0), _rec(1, query="white paint", title="Behr paint")]
    packed = JudgeBackend.load(tiny_model_dir, bf16=True, max_new_tokens=12)
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(getattr(vars(m).get("forward"), "_she_packed", False) for m in linears)
    got = packed.run("full", recs)
    assert all(getattr(vars(m).get("forward"), "_she_packed", False) for m in linears)  # still packed after a call
    plain = JudgeBackend.load(tiny_model_dir, bf16=True, max_new_tokens=12)
    plain._packed.close()
    assert not any("forward" in vars(m) for m in plain.model.modules())
    monkeypatch.setenv("SHE_DECODING", "plain")  # and no packing inside the call either
    want = plain.run("full", recs)
    assert [(j.text, j.label, j.probs) for j in got] == [(j.text, j.label, j.probs) for j in want]
    fp32 = JudgeBackend.load(tiny_model_dir, bf16=False, max_new_tokens=12)
    assert not any("forward" in vars(m) for m in fp32.model.modules())


def test_auto_precision_is_bf16_on_a_cpu_that_runs_it_well(tiny_model_dir, monkeypatch):
    """``--precision auto`` (bf16=None): full mode and chat in bf16 -- what `she eval` judges in -- where oneDNN runs
    bf16 well (she.runtime.cpu_bf16_native), fp32 on other CPUs; fast mode in bf16 on both."""
    import she.runtime
    from she.serving.backend import JudgeBackend

    for native in (True, False):
        monkeypatch.setattr(she.runtime, "cpu_bf16_native", lambda native=native: native)
        backend = JudgeBackend.load(tiny_model_dir, device="cpu", max_new_tokens=4)
        assert backend.bf16 is native
        assert backend.fast is None or backend.fast.bf16 is True
