"""Bounded load test of `she serve` on loopback: a burst of concurrent requests, one JSON report.

Starts `she serve` itself (a separate process on a free 127.0.0.1 port, ``--model``) or targets one that is
already running (``--url``, loopback only). Sends ``--requests`` N requests of ``--pairs`` K pairs each, in
fast, full, computed or marginal mode, ``--concurrency`` at a time (default: all N at once, a burst), after one
warm-up request that is not counted. Prints one JSON object:

* ``pairs_per_s``: pairs of the requests answered 200, divided by the burst's wall time;
* ``latency_ok_s`` / ``latency_all_s``: p50, p99 (nearest rank) and max of the 200 answers / of every answer;
* ``status_share``: the share of 200, 503 (queue full), 504 (deadline), other statuses and no answer at all
  (connection error or client timeout), with the ``Retry-After`` values the 503s carried;
* ``server``: when this script started the server (or ``--server-pid`` names it), its resident memory from
  ``/proc/<pid>/status`` (``VmRSS`` after the warm-up and after the burst, ``VmHWM`` = peak) -- else null;
* ``batches``: what the server's batcher did during the burst (``/metrics`` before/after).

Refusals, on purpose: any host but 127.0.0.0/8, ::1 or ``localhost`` (this is not a tool for loading other
people's servers); more than 2,000 requests, 256 pairs a request or 512 in flight. The whole run has a wall
limit (``--max-wall-s``). The server's key: ``$SHE_API_KEY`` is sent as a bearer token when set (a server this
script starts inherits it too).

Timings are only meaningful on an otherwise idle machine; client and server share its CPUs.

Usage:
  python scripts/bench_load.py --model runs/compare-hd-cpu/label_only_sft/final --mode fast --requests 200 --pairs 8
  python scripts/bench_load.py --url http://127.0.0.1:8000 --server-pid 12345 --mode full --requests 24 --pairs 4
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_REQUESTS = 2000
MAX_PAIRS = 256
MAX_CONCURRENCY = 512


# -- pure parts (tests/test_bench_load.py) --------------------------------------------------------------------
def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); no name is resolved."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def loopback_url(url: str) -> str:
    """``url`` without a trailing slash, if it is ``http://`` to a loopback host; else ``ValueError``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    if not is_loopback_host(parts.hostname):
        raise ValueError(f"--url: {parts.hostname!r} is not a loopback host (127.0.0.0/8, ::1, localhost); "
                         "this load test only runs against this machine")
    return url.rstrip("/")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank ``q``-th percentile (the service's own, :func:`she.serving.metrics.percentile`)."""
    from she.serving.metrics import percentile as nearest_rank

    return nearest_rank(values, q)


@dataclass(frozen=True)
class Outcome:
    """One request: its HTTP status (None: no answer), seconds until the answer, and any Retry-After."""

    status: int | None
    seconds: float
    retry_after: str | None = None


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values, default=None),
            "n": len(values)}


def summarize(outcomes: Sequence[Outcome], wall_s: float, pairs_per_request: int) -> dict:
    """The report's client-side figures (see the module docstring)."""
    n = len(outcomes)
    ok = [o for o in outcomes if o.status == 200]
    count = {"200": len(ok), "503": 0, "504": 0, "other": 0, "no_answer": 0}
    for o in outcomes:
        if o.status is None:
            count["no_answer"] += 1
        elif o.status in (503, 504):
            count[str(o.status)] += 1
        elif o.status != 200:
            count["other"] += 1
    retry = sorted(int(o.retry_after) for o in outcomes if o.status == 503 and (o.retry_after or "").isdigit())
    return {
        "requests": n,
        "wall_s": wall_s,
        "pairs_ok": len(ok) * pairs_per_request,
        "pairs_per_s": len(ok) * pairs_per_request / wall_s if wall_s > 0 else None,
        "latency_ok_s": latency_summary([o.seconds for o in ok]),
        "latency_all_s": latency_summary([o.seconds for o in outcomes if o.status is not None]),
        "status_counts": count,
        "status_share": {k: v / n if n else 0.0 for k, v in count.items()},
        "retry_after_s": {"min": retry[0], "max": retry[-1]} if retry else None,
        "other_statuses": sorted({o.status for o in outcomes if o.status not in (None, 200, 503, 504)}),
    }


def memory_kib(status_text: str) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (KiB) from the text of ``/proc/<pid>/status``; absent keys are left out."""
    out = {}
    for line in status_text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


# -- talking to the server ------------------------------------------------------------------------------------
def _headers(deadline_s: float | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    key = os.environ.get("SHE_API_KEY")
    if key:
        h["Authorization"] = f"Bearer {key}"
    if deadline_s is not None:
        h["X-Deadline-S"] = f"{deadline_s:g}"
    return h


def _get(url: str, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, headers=_headers(None))
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float, pairs: int) -> Outcome:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                    timeout=timeout) as resp:
            n = len(json.loads(resp.read())["results"])
            status = resp.status if n == pairs else -1  # -1: a 200 with the wrong number of results (a bug)
            return Outcome(status, time.perf_counter() - t0)
    except urllib.error.HTTPError as e:
        e.read()
        return Outcome(e.code, time.perf_counter() - t0, e.headers.get("Retry-After"))
    except (urllib.error.URLError, OSError):  # refused, reset, timed out: no answer
        return Outcome(None, time.perf_counter() - t0)


def _pairs(args) -> list[dict]:
    from she.serving.schemas import pair_payload

    if args.data:
        from she.data.loaders import load_records

        records, _ = load_records(args.data, args.format)
    else:
        from she.data.synthetic import generate

        records = generate(n_queries=max(8, args.requests * args.pairs // 8 + 1), seed=0)
    return [pair_payload(r, 2000) for r in records]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_memory(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return memory_kib(f.read())


def start_server(args, log_path: str) -> tuple[subprocess.Popen, str]:
    """`she serve` in a child process on a free loopback port; returns once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from she.cli import main; main(sys.argv[1:])", "serve",
           "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue-pairs", str(args.max_queue_pairs), "--max-new-tokens", str(args.max_new_tokens),
           "--request-timeout-s", str(args.request_timeout_s)]
    if args.fast_batch_size:
        cmd += ["--fast-batch-size", str(args.fast_batch_size)]
    if args.precision != "auto":
        cmd += ["--precision", args.precision]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"she serve exited with {proc.returncode} before answering; its log: {log_path}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"she serve did not answer /health within {args.start_timeout_s} s; log: {log_path}")
        try:
            _get(f"{url}/health", timeout=2)
            return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the child this script started (its own pid only)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_burst(url: str, args, pairs: list[dict]) -> tuple[list[Outcome], float]:
    k = args.pairs
    bodies = [json.dumps({"pairs": [pairs[(i * k + j) % len(pairs)] for j in range(k)], "mode": args.mode}).encode()
              for i in range(args.requests)]
    headers = _headers(args.deadline_s)
    endpoint = f"{url}/v1/relevance"
    stop_at = time.monotonic() + args.max_wall_s
    start = threading.Barrier(min(args.concurrency, args.requests))

    def one(i: int) -> Outcome:
        if i < start.parties:
            start.wait()  # the first wave leaves together: a burst, not a ramp
        left = stop_at - time.monotonic()
        if left <= 0:
            return Outcome(None, 0.0)
        return _post(endpoint, bodies[i], headers, min(args.timeout_s, left), k)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        outcomes = list(pool.map(one, range(args.requests)))
    return outcomes, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `she serve --model MODEL` on a free 127.0.0.1 port")
    where.add_argument("--url", help="a running server, loopback only (e.g. http://127.0.0.1:8000)")
    p.add_argument("--mode", choices=["fast", "full", "computed", "marginal"], default="fast",
                   help="the service's relevance mode (docs/serving.md): computed needs a schema whose steps can be "
                        "computed (evidence, semantic, decision), marginal one with a choice step before the verdict")
    p.add_argument("--requests", type=int, default=200, help=f"requests in the burst (<= {MAX_REQUESTS})")
    p.add_argument("--pairs", type=int, default=8, help=f"pairs per request (<= {MAX_PAIRS})")
    p.add_argument("--concurrency", type=int, default=None,
                   help=f"requests in flight at once (default: all of them, <= {MAX_CONCURRENCY})")
    p.add_argument("--deadline-s", type=float, default=None, help="send X-Deadline-S with every request")
    p.add_argument("--timeout-s", type=float, default=900, help="client timeout per request")
    p.add_argument("--max-wall-s", type=float, default=1800, help="requests not sent by then count as no answer")
    p.add_argument("--data", default=None, help="pairs from this file (default: the synthetic generator)")
    p.add_argument("--format", default="auto")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --url: the server's process id on this machine, to report its memory")
    srv = p.add_argument_group("the server this script starts (--model)")
    srv.add_argument("--max-batch", type=int, default=64)
    srv.add_argument("--batch-wait-ms", type=float, default=5)
    srv.add_argument("--max-queue-pairs", type=int, default=4096)
    srv.add_argument("--fast-batch-size", type=int, default=None)
    srv.add_argument("--max-new-tokens", type=int, default=96)
    srv.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="she serve --precision")
    srv.add_argument("--request-timeout-s", type=float, default=300)
    srv.add_argument("--start-timeout-s", type=float, default=600, help="longest wait for the model to load")
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or args.requests
    if not (1 <= args.requests <= MAX_REQUESTS and 1 <= args.pairs <= MAX_PAIRS
            and 1 <= args.concurrency <= MAX_CONCURRENCY):
        p.error(f"bounds: 1 <= --requests <= {MAX_REQUESTS}, 1 <= --pairs <= {MAX_PAIRS}, "
                f"1 <= --concurrency <= {MAX_CONCURRENCY}")
    if args.url:
        try:
            args.url = loopback_url(args.url)
        except ValueError as e:
            p.error(str(e))
    if args.server_pid is not None and (args.model or not os.path.exists(f"/proc/{args.server_pid}/status")):
        p.error("--server-pid goes with --url and must be a running process on this machine")

    pairs = _pairs(args)  # before the server starts: a bad data file fails at once
    proc = None
    log_path = None
    pid = args.server_pid
    try:
        if args.model:
            fd, log_path = tempfile.mkstemp(prefix="she-serve-", suffix=".log")
            os.close(fd)
            proc, url = start_server(args, log_path)
            pid = proc.pid
        else:
            url = args.url
        health = _get(f"{url}/health")
        warm = _post(f"{url}/v1/relevance", json.dumps({"pairs": pairs[: args.pairs], "mode": args.mode}).encode(),
                     _headers(None), args.timeout_s, args.pairs)
        if warm.status != 200:
            raise RuntimeError(f"the warm-up request got {warm.status}; is the API key ($SHE_API_KEY) right?")
        mem_before = _proc_memory(pid) if pid else None
        batches_before = _get(f"{url}/metrics")["batches"]
        outcomes, wall = run_burst(url, args, pairs)
        batches_after = _get(f"{url}/metrics")["batches"]
        mem_after = _proc_memory(pid) if pid else None
    except (RuntimeError, urllib.error.URLError) as e:
        sys.exit(f"bench_load: {e}")
    finally:
        if proc is not None:
            stop_server(proc)

    n_batches = batches_after["batches"] - batches_before["batches"]
    n_items = batches_after["items"] - batches_before["items"]
    report = {
        "mode": args.mode, "pairs_per_request": args.pairs, "concurrency": args.concurrency,
        **summarize(outcomes, wall, args.pairs),
        "server": None if pid is None else {
            "pid": pid, "started_by_script": proc is not None, "log": log_path,
            "rss_mib_before": mem_before.get("VmRSS", 0) / 1024, "rss_mib_after": mem_after.get("VmRSS", 0) / 1024,
            "peak_rss_mib": mem_after.get("VmHWM", 0) / 1024},
        "batches": {"batches": n_batches, "items": n_items,
                    "mean_batch_size": n_items / n_batches if n_batches else 0.0,
                    **{k: batches_after.get(k, 0) - batches_before.get(k, 0)
                       for k in ("expired_items", "cancelled_items")}},
        "health": health,
        "command": ["python", "scripts/bench_load.py", *(sys.argv[1:] if argv is None else argv)],
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
