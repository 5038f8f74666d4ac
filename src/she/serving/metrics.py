"""Service counters and latency percentiles, as plain JSON (``GET /metrics``).

Latencies are kept per endpoint in a bounded window (the last ``window`` requests, by default
10 000) so memory stays flat on a long-running server; until that many requests have been served the
percentiles cover everything since start. Percentiles are nearest-rank (a value that was actually
observed), which is what one wants to quote for tail latency.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None when empty."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


class ServiceMetrics:
    """Thread-safe counters: requests and errors per endpoint, pairs per mode, latency windows."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.time()
        self.window = window
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.client_errors: Counter[str] = Counter()
        self.server_errors: Counter[str] = Counter()
        self.pairs: Counter[str] = Counter()
        self._latency: dict[str, deque[float]] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            if 400 <= status < 500:
                self.client_errors[endpoint] += 1
            elif status >= 500:
                self.server_errors[endpoint] += 1
            self._latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def add_pairs(self, mode: str, n: int) -> None:
        with self._lock:
            self.pairs[mode] += n

    def snapshot(self, batcher: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            latency = {}
            for ep, d in self._latency.items():
                vals = list(d)
                p50, p99 = percentile(vals, 50), percentile(vals, 99)
                latency[ep] = {"n": len(vals), "p50_ms": None if p50 is None else 1000 * p50,
                               "p99_ms": None if p99 is None else 1000 * p99,
                               "mean_ms": 1000 * sum(vals) / len(vals) if vals else None}
            out = {
                "uptime_s": time.time() - self.started,
                "requests": {"total": sum(self.requests.values()), **dict(self.requests)},
                "pairs": {"total": sum(self.pairs.values()), **dict(self.pairs)},
                "errors": {"client": sum(self.client_errors.values()), "server": sum(self.server_errors.values()),
                           "by_endpoint": {ep: {"client": self.client_errors[ep], "server": self.server_errors[ep]}
                                           for ep in sorted(set(self.client_errors) | set(self.server_errors))}},
                "latency": latency,
                "latency_window": self.window,
            }
        if batcher is not None:
            out["batches"] = batcher
        return out


__all__ = ["ServiceMetrics", "percentile"]
