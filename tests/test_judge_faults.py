"""RemoteJudge under faults: a scripted local HTTP server times out, fails with 5xx/4xx, answers garbage.

Every test checks three things: how many requests reached the server (retries happen or not), the scores
(neutral exactly where nothing usable came back) and ``fault_counts``. Backoff sleeps go to a recorder,
so the exponential schedule is checked without waiting; the one real timeout costs 0.1 s per attempt.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from she.rewards.hybrid import HybridExaminer, fault_counts
from she.rewards.judge import FAULT_KINDS, NEUTRAL, RemoteJudge, classify_request_error

TIMEOUT = 0.1  # client timeout in the tests; the server's "timeout" action sleeps 3x longer


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.hits += 1
            action = srv.script.pop(0) if srv.script else srv.default
        if action == "timeout":
            time.sleep(3 * TIMEOUT)
            return  # closing without an answer; the client gave up long ago
        if action.startswith("status:"):
            code = int(action.split(":")[1])
            self.send_response(code)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"boom")
            return
        body = b"<html>not a chat completion</html>" if action == "not-json" else _completion(action)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    """A server that plays ``srv.script`` (one action per request, then ``srv.default``)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.hits = 0
    srv.script = []
    srv.default = "1: good\n2: bad"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def _trace(n_steps: int = 2, rid: str = "r1"):
    """A parsed-trace stand-in with ``n_steps`` steps and a real record (the judge only reads step text)."""
    from dataclasses import replace

    from she.data.synthetic import generate

    record = replace(generate(n_queries=1, products_per_query=1, seed=0)[0], id=rid)
    return SimpleNamespace(steps=[SimpleNamespace(text=f"Step {k}: something") for k in range(1, n_steps + 1)]), record


def _judge(url: str, **kw) -> tuple[RemoteJudge, list[float]]:
    sleeps: list[float] = []
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("backoff", 0.01)
    return RemoteJudge(url, "m", sleep=sleeps.append, **kw), sleeps


def _faults(judge: RemoteJudge, **nonzero: int) -> None:
    expected = dict.fromkeys(FAULT_KINDS, 0) | nonzero
    assert judge.fault_counts == expected


def test_5xx_then_200_is_retried_once(server):
    server.script = ["status:500", "status:503", "1: bad\n2: good"]
    judge, sleeps = _judge(server.url, max_retries=2, backoff=0.25)
    assert judge.score_steps(*_trace()) == [0.0, 1.0]
    assert server.hits == 3
    assert sleeps == [0.25, 0.5]  # backoff * 2**k
    _faults(judge, http_5xx=2, retries=2)
    assert (judge.stats.requests, judge.stats.failed_requests, judge.stats.neutral_steps) == (1, 0, 0)


def test_timeouts_until_retries_run_out_give_neutral_scores(server):
    server.script = ["timeout"] * 3
    judge, sleeps = _judge(server.url, max_retries=2, backoff=0.25, max_backoff=0.3)
    t0 = time.perf_counter()
    assert judge.score_steps(*_trace(3)) == [NEUTRAL] * 3
    assert time.perf_counter() - t0 < 3 * TIMEOUT + 1.0  # the per-request timeout bounds each attempt
    assert server.hits == 3
    assert sleeps == [0.25, 0.3]  # 0.5 capped by max_backoff
    _faults(judge, timeout=3, retries=2, neutral_scores=3)
    assert judge.stats.failed_requests == 1 and "3 attempt(s)" in judge.stats.errors[-1]


def test_a_timeout_then_an_answer(server):
    server.script = ["timeout", "1: good\n2: good"]
    judge, _ = _judge(server.url, max_retries=1)
    assert judge.score_steps(*_trace()) == [1.0, 1.0]
    _faults(judge, timeout=1, retries=1)


def test_4xx_is_not_retried_but_429_is(server):
    server.script = ["status:404"]
    judge, sleeps = _judge(server.url, max_retries=3)
    assert judge.score_steps(*_trace()) == [NEUTRAL, NEUTRAL]
    assert server.hits == 1 and sleeps == []
    _faults(judge, http_4xx=1, neutral_scores=2)

    server.hits = 0
    server.script = ["status:429", "1: good\n2: bad"]
    judge, _ = _judge(server.url, max_retries=3)
    assert judge.score_steps(*_trace()) == [1.0, 0.0]
    assert server.hits == 2
    _faults(judge, http_429=1, retries=1)


def test_garbage_is_neutral_and_not_retried(server):
    server.script = ["not-json", "I think these steps look fine overall.", "1: good\n1: bad\n2: good"]
    judge, sleeps = _judge(server.url, max_retries=2)
    assert judge.score_steps(*_trace()) == [NEUTRAL, NEUTRAL]  # HTTP 200, not a chat completion
    assert judge.score_steps(*_trace()) == [NEUTRAL, NEUTRAL]  # a completion without verdicts
    assert judge.score_steps(*_trace()) == [NEUTRAL, 1.0]  # step 1 contradicts itself
    assert server.hits == 3 and sleeps == []
    _faults(judge, garbage=3, neutral_scores=5)
    assert (judge.stats.failed_requests, judge.stats.unparseable_answers) == (1, 2)


def test_connection_refused_is_retried_then_neutral():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    judge, sleeps = _judge(f"http://127.0.0.1:{port}/v1", max_retries=1)
    assert judge.score_steps_batch([_trace(), _trace(1, "r2")]) == [[NEUTRAL, NEUTRAL], [NEUTRAL]]
    _faults(judge, connection=4, retries=2, neutral_scores=3)
    assert len(sleeps) == 2


def test_warnings_are_logged_and_rate_limited(server, caplog):
    server.default = "status:500"
    judge, _ = _judge(server.url, max_retries=0)
    with caplog.at_level(logging.WARNING, logger="she.rewards.judge"):
        for _ in range(5):
            judge.score_steps(*_trace())
    msgs = [r.getMessage() for r in caplog.records if "http_5xx" in r.getMessage()]
    assert len(msgs) == 3  # the first three; the next would be the 100th
    assert "record r1" in msgs[0] and "HTTP 500" in msgs[0] and "only every 100th" in msgs[2]
    _faults(judge, http_5xx=5, neutral_scores=10)


def test_classify_request_error():
    import urllib.error

    def http(code):
        return urllib.error.HTTPError("u", code, "x", {}, None)

    assert [classify_request_error(http(c)) for c in (500, 502, 429, 400, 401)] == \
        ["http_5xx", "http_5xx", "http_429", "http_4xx", "http_4xx"]
    assert classify_request_error(urllib.error.URLError(TimeoutError("timed out"))) == "timeout"
    assert classify_request_error(TimeoutError()) == "timeout"
    assert classify_request_error(urllib.error.URLError(ConnectionRefusedError())) == "connection"
    assert classify_request_error(ConnectionResetError()) == "connection"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="http"):
        RemoteJudge("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="max_retries"):
        RemoteJudge("http://x/v1", "m", max_retries=-1)


def test_fault_counts_reach_the_trainer_metrics(server):
    """fault_counts() finds the judge inside a HybridExaminer; the trainer logs per-batch increments."""
    from she.training.srpo import SRPOTrainer

    server.script = ["status:500"]
    judge, _ = _judge(server.url, max_retries=1)
    examiner = HybridExaminer(judge=judge)
    assert fault_counts(examiner) == dict.fromkeys(FAULT_KINDS, 0)
    assert fault_counts(object()) == {}

    import torch
    from collections import defaultdict

    fake = SimpleNamespace(
        examiner=examiner, _faults_seen={}, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t),
    )
    judge.score_steps(*_trace())  # 500, then the default answer
    SRPOTrainer._log_examiner_faults(fake, "train")
    server.default = "status:500"
    judge.score_steps(*_trace())  # 500, 500 -> neutral
    SRPOTrainer._log_examiner_faults(fake, "train")
    m = fake._metrics["train"]
    assert m["judge/faults/http_5xx"] == [1.0, 2.0]
    assert m["judge/faults/retries"] == [1.0, 1.0]
    assert m["judge/faults/neutral_scores"] == [0.0, 2.0]
    assert m["judge/faults/timeout"] == [0.0, 0.0]
