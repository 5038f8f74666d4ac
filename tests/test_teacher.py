"""Teacher traces from an OpenAI-compatible endpoint, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from she.data.schema import Product, Record
from she.reasoning.teacher import TeacherClient, TeacherError, generate_traces, judge_answer
from she.reasoning.schema import default_schema

GOOD_ANSWER = (
    "**Query:** cordless drill\n"
    "**Product:** drill/driver kit; brand=DeWalt\n"
    "**Type:** same\n"
    "**Attributes:** function=match\n"
    "**Verdict:** Exact"
)
CANONICAL = (
    "Query: cordless drill\n"
    "Product: drill/driver kit; brand=DeWalt\n"
    "Type: same\n"
    "Attributes: function=match\n"
    "Verdict: Exact"
)
ANSWERS = {
    "good": GOOD_ANSWER,
    "wrong": GOOD_ANSWER.replace("same", "related").replace("Exact", "Partial"),
    "inconsistent": GOOD_ANSWER.replace("same", "different"),
    "garbage": "I am sorry, I cannot judge this product.",
    "think": "<think>Verdict: Partial? no...</think>\n" + GOOD_ANSWER,
}


class _Handler(BaseHTTPRequestHandler):
    requests: list[dict] = []  # shared log of (path, headers, body) for assertions
    attempts: dict[str, int] = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        query = body["messages"][-1]["content"].split("\n")[0].removeprefix("Query: ").split()[0]
        n = type(self).attempts[query] = type(self).attempts.get(query, 0) + 1
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        if query == "error500" or (query == "flaky" and n == 1):
            return self._send(500, b'{"error": "boom"}')
        if query == "slow":
            time.sleep(1.0)
        if query == "badjson":
            return self._send(200, b"<html>not json</html>")
        content = ANSWERS.get(query, GOOD_ANSWER)
        payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        return self._send(200, json.dumps(payload).encode())

    def _send(self, code: int, data: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture()
def server():
    _Handler.requests = []
    _Handler.attempts = {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _rec(query: str, label: str = "Exact") -> Record:
    return Record(id=query, query=f"{query} cordless drill", product=Product(title="DeWalt 20V Drill/Driver Kit"),
                  label=label)


def _client(base: str, **kw) -> TeacherClient:
    return TeacherClient(base + "/v1", "teacher-model", **{"backoff": 0.0, **kw})


def test_generate_traces_accepts_and_rejects_by_reason(server):
    records = [_rec("good"), _rec("wrong"), _rec("inconsistent"), _rec("garbage"), _rec("think"), _rec("badjson"),
               Record(id="unlabelled", query="good drill", product=Product(title="Drill"))]
    accepted, stats = generate_traces(records, _client(server, api_key="sk-test"), default_schema(), n=1)
    assert [(r.id, t) for r, t in accepted] == [("good", CANONICAL), ("think", CANONICAL)]
    assert stats.accepted == 2 and stats.requested == 6 and stats.records == 7
    assert dict(stats.rejected) == {"wrong_label": 1, "inconsistent": 1, "parse_failed": 1, "bad_response": 1,
                                    "no_label": 1}
    assert stats.to_dict()["acceptance_rate"] == round(2 / 6, 4)
    # what was sent: model, key, system + user messages, and never the gold label
    req = _Handler.requests[0]
    assert req["auth"] == "Bearer sk-test" and req["body"]["model"] == "teacher-model"
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]
    assert req["body"]["messages"][1]["content"] == "Query: good cordless drill\nProduct: DeWalt 20V Drill/Driver Kit"
    assert "Verdict: Irrelevant|Partial|Exact" in req["body"]["messages"][0]["content"]
    assert all("Exact" not in r["body"]["messages"][1]["content"] for r in _Handler.requests)


def test_server_errors_are_retried_then_counted(server):
    accepted, stats = generate_traces([_rec("error500"), _rec("flaky")], _client(server, max_retries=2), n=1)
    assert _Handler.attempts["error500"] == 3  # 1 + 2 retries, then given up
    assert _Handler.attempts["flaky"] == 2  # 500 once, then a good answer
    assert [r.id for r, _ in accepted] == ["flaky"]
    assert dict(stats.rejected) == {"request_failed": 1}
    assert "HTTP 500" in stats.examples["request_failed"][0]


def test_n_samples_per_record(server):
    accepted, stats = generate_traces([_rec("good")], _client(server), n=3)
    assert len(accepted) == 3 and stats.requested == 3 and _Handler.attempts["good"] == 3


def test_timeout_is_a_counted_failure(server):
    t0 = time.monotonic()
    accepted, stats = generate_traces([_rec("slow")], _client(server, timeout=0.2, max_retries=1), n=1)
    assert accepted == [] and dict(stats.rejected) == {"request_failed": 1}
    assert time.monotonic() - t0 < 1.0  # gave up after 2 x 0.2 s, not after the server's 1 s


def test_client_errors_are_not_retried(server):
    client = TeacherClient(server + "/wrong", "m", backoff=0.0, max_retries=2)
    with pytest.raises(TeacherError, match="HTTP 404"):
        client.chat([{"role": "user", "content": "Query: good\nProduct: x"}])
    assert _Handler.attempts["good"] == 1


def test_dead_server_never_crashes():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    accepted, stats = generate_traces([_rec("good")], TeacherClient(f"http://127.0.0.1:{port}/v1", "m", backoff=0.0,
                                                                    max_retries=1, timeout=1), n=2)
    assert accepted == [] and dict(stats.rejected) == {"request_failed": 2}


def test_judge_answer_without_server():
    sch = default_schema()
    assert judge_answer(GOOD_ANSWER, _rec("x"), sch) == (CANONICAL, "accepted")
    assert judge_answer(ANSWERS["inconsistent"], _rec("x"), sch, require_consistent=False)[1] == "accepted"
    assert judge_answer("", _rec("x"), sch) == (None, "parse_failed")


def test_client_validates_its_configuration():
    with pytest.raises(ValueError, match="http://"):
        TeacherClient("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_retries"):
        TeacherClient("http://x", "m", max_retries=-1)
