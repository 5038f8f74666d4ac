"""Throughput and latency of the relevance service, fast and full mode, from one process.

The server runs in-process on loopback (uvicorn in a background thread, a free port); N client
threads fire a fixed number of ``POST /v1/relevance`` requests over real HTTP (``urllib``), each
with ``--pairs-per-request`` pairs from the synthetic generator (or ``--data``). Per mode it prints
pairs/s (all pairs / wall time), requests/s, latency p50/p99 (nearest rank, per request, client side)
and the mean batch size the server's batcher formed (from ``/metrics``, before/after difference). One
warm-up request per mode is excluded.

Client and server share the machine (and, in CPython, one process), so on a small CPU box the numbers
are a lower bound of what a separate server would do; compare runs on the same machine only.

Usage:
  python scripts/bench_service.py --model runs/demo/sft/final --requests 64 --concurrency 8 --pairs-per-request 4
  python scripts/bench_service.py --model tiny --requests 16 --concurrency 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _pairs(args) -> list[dict]:
    from she.serving.schemas import pair_payload

    if args.data:
        from she.data.loaders import load_records

        records, _ = load_records(args.data, args.format)
    else:
        from she.data.synthetic import generate

        records = generate(n_queries=max(8, args.requests * args.pairs_per_request // 4 + 1), seed=0)
    return [pair_payload(r, args.max_text_chars) for r in records]


def run_mode(base: str, mode: str, pairs: list[dict], args) -> dict:
    from she.serving.metrics import percentile

    k = args.pairs_per_request
    bodies = [{"pairs": [pairs[(i * k + j) % len(pairs)] for j in range(k)], "mode": mode}
              for i in range(args.requests)]
    _post(f"{base}/v1/relevance", bodies[0], args.timeout)  # warm-up, not measured
    before = _get(f"{base}/metrics")["batches"]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    nxt = iter(range(len(bodies)))

    def client() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                res = _post(f"{base}/v1/relevance", bodies[i], args.timeout)
                assert len(res["results"]) == k, res
            except Exception as e:  # noqa: BLE001 -- counted and reported, the benchmark goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = _get(f"{base}/metrics")["batches"]
    n_batches = after["batches"] - before["batches"]
    n_items = after["items"] - before["items"]
    ok = len(latencies)
    return {"mode": mode, "requests": args.requests, "ok": ok, "errors": len(errors), "first_error": errors[:1],
            "pairs": ok * k, "wall_s": wall, "pairs_per_s": ok * k / wall, "requests_per_s": ok / wall,
            "p50_ms": 1000 * (percentile(latencies, 50) or 0), "p99_ms": 1000 * (percentile(latencies, 99) or 0),
            "batches": n_batches, "mean_batch_size": n_items / n_batches if n_batches else 0.0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registered name (tiny, smollm2-135m) or save_pretrained folder")
    p.add_argument("--requests", type=int, default=32, help="measured requests per mode")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--pairs-per-request", type=int, default=4)
    p.add_argument("--modes", default="fast,full")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-text-chars", type=int, default=2000)
    p.add_argument("--data", default=None, help="pairs from this file (default: the synthetic generator)")
    p.add_argument("--format", default="auto")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fast", "full")]
    if bad or args.requests < 1 or args.concurrency < 1 or args.pairs_per_request < 1:
        p.error(f"--modes takes fast,full (got {bad}); --requests/--concurrency/--pairs-per-request must be >= 1")

    from she.serving.app import create_app
    from she.serving.runner import BackgroundServer

    t0 = time.perf_counter()
    app = create_app(args.model, max_batch_pairs=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     max_new_tokens=args.max_new_tokens, max_request_pairs=max(256, args.pairs_per_request),
                     max_text_chars=args.max_text_chars,
                     max_queue_pairs=max(4096, args.concurrency * args.pairs_per_request))
    load_s = time.perf_counter() - t0
    pairs = _pairs(args)
    results = []
    with BackgroundServer(app) as srv:
        info = _get(f"{srv.url}/health")
        print(f"model {info['model']} ({info['device']}, target={info['target']}, fast mode {info['fast_mode']}); "
              f"loaded in {load_s:.1f} s; {args.requests} requests x {args.pairs_per_request} pairs, "
              f"{args.concurrency} client threads, max batch {args.max_batch}, wait {args.batch_wait_ms} ms",
              flush=True)
        for mode in modes:
            r = run_mode(srv.url, mode, pairs, args)
            results.append(r)
            print(f"{mode:5s} {r['pairs_per_s']:9.1f} pairs/s {r['requests_per_s']:8.2f} req/s  "
                  f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  mean batch {r['mean_batch_size']:5.1f}  "
                  f"errors {r['errors']}" + (f"  first: {r['first_error'][0]}" if r["errors"] else ""), flush=True)
    if args.json:
        meta = {"model": args.model, "health": info, "args": vars(args), "platform": platform.platform(),
                "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
