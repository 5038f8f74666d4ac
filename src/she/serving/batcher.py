"""Dynamic batching: many concurrent requests, one worker thread, batches of up to ``max_batch`` items.

Why: a transformer forward on 32 pairs costs little more than on one (on a GPU almost nothing
more; on a CPU the weights are read from memory once per batch instead of once per pair), but
HTTP clients send requests one at a time. The batcher turns concurrency into batch size.

Design:

* Requests :meth:`DynamicBatcher.submit` a list of items under a **key** (e.g. ``"fast"``,
  ``"full"``, or a chat key with its generation settings). Only items with the same key share a
  batch, since they need the same computation. A request may be split over several batches and
  may share a batch with other requests; its future completes when all its items are done.
* One worker thread owns the scoring function (and so the model): no locks around the model, no
  two forwards competing for the same cores, and the event loop stays free to accept requests.
* The worker takes the key of the **oldest** waiting item and waits until the batch is full or
  ``max_wait_ms`` has passed *since that item arrived* (not since the worker looked). Under load
  items have already waited while the previous batch ran, so batches go out at once and full;
  when idle, a lone request pays at most ``max_wait_ms`` of extra latency.
* Items are served oldest-key first, so one busy mode cannot starve another.
* A bounded queue (``max_queue``) rejects new work with :class:`QueueFull` instead of letting
  latency grow without limit; the server turns that into HTTP 503. ``QueueFull.retry_after_s`` estimates
  when to try again: the queued items divided by the recent throughput (items per second of scoring over the
  last batches), rounded up, at least 1 second.
* A request may carry a **deadline** (``time.monotonic()`` clock). Items whose deadline has passed when
  the worker takes them are dropped, never scored, and their request fails with :class:`DeadlineExceeded`.
* If the scoring function raises or returns the wrong number of results, every request in that
  batch gets the exception; the worker keeps running.

Everything here is model-free and testable with a fake scoring function.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from she.errors import UserError


class QueueFull(RuntimeError):
    """The batcher holds ``max_queue`` items already; try again in about ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RuntimeError):
    """A request's deadline passed while its items were queued; they were dropped before scoring.

    Not a ``TimeoutError``: the server awaits results under ``asyncio.wait_for``, whose own timeout is one,
    and the two must stay apart."""


class BatcherClosed(RuntimeError):
    """The batcher was closed; no new work is accepted."""


@dataclass
class _Request:
    future: Future
    results: list[Any]
    remaining: int
    deadline: float | None = None  # time.monotonic(); None = no deadline


@dataclass
class _Slot:
    request: _Request
    index: int
    item: Any
    enqueued: float


@dataclass
class BatcherStats:
    """Counters since start. ``batch_sizes`` maps a batch size to how many batches had it."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    expired_items: int = 0  # dropped unscored: their request's deadline had passed
    cancelled_items: int = 0  # dropped unscored: their request's future was cancelled (the client stopped waiting)
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        mean = self.items / self.batches if self.batches else 0.0
        return {"batches": self.batches, "items": self.items, "failed_batches": self.failed_batches,
                "expired_items": self.expired_items, "cancelled_items": self.cancelled_items,
                "mean_batch_size": mean, "max_batch_size": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


ScoreFn = Callable[[Hashable, list[Any]], Sequence[Any]]


def retry_after_s(queued: int, recent: Sequence[tuple[int, float]]) -> int:
    """Seconds until ``queued`` items are scored at the recent rate: ``recent`` holds (items, seconds) of the
    last batches. Rounded up, at least 1; 1 when nothing has been measured yet."""
    items = sum(n for n, _ in recent)
    seconds = sum(t for _, t in recent)
    if items <= 0 or seconds <= 0:
        return 1
    return max(1, math.ceil(queued * seconds / items))


class DynamicBatcher:
    """Queue items from many threads/requests; run ``score_fn(key, items)`` on batches in one worker.

    ``score_fn`` must return one result per item, in order.
    """

    RECENT_BATCHES = 32  # how many batches the throughput behind ``QueueFull.retry_after_s`` averages over

    def __init__(self, score_fn: ScoreFn, *, max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 4096, name: str = "she-batcher") -> None:
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise UserError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise UserError(f"max_queue must be >= 1, got {max_queue}")
        self.score_fn = score_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._recent: deque[tuple[int, float]] = deque(maxlen=self.RECENT_BATCHES)  # (items, seconds) per batch
        self._queues: dict[Hashable, deque[_Slot]] = {}
        self._pending = 0
        self._closed = False
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- client side -----------------------------------------------------------------------------
    def submit(self, key: Hashable, items: Sequence[Any], deadline: float | None = None) -> Future:
        """Queue ``items``; the future resolves to their results (a list, same order).

        ``deadline`` (``time.monotonic()`` clock): items still queued when it has passed are dropped and the
        future fails with :class:`DeadlineExceeded`."""
        fut: Future = Future()
        if not items:
            fut.set_result([])
            return fut
        req = _Request(fut, [None] * len(items), len(items), deadline)
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self._pending + len(items) > self.max_queue:
                with self._stats_lock:
                    wait = retry_after_s(self._pending, self._recent)
                raise QueueFull(f"{self._pending} items are queued (limit {self.max_queue}); try again in about "
                                f"{wait} s", wait)
            q = self._queues.setdefault(key, deque())
            q.extend(_Slot(req, i, it, now) for i, it in enumerate(items))
            self._pending += len(items)
            self._cond.notify_all()
        return fut

    @property
    def pending(self) -> int:
        return self._pending

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting work, finish what is queued, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker side -----------------------------------------------------------------------------
    def _oldest_key(self) -> Hashable | None:
        best, best_t = None, None
        for k, q in self._queues.items():
            if q and (best_t is None or q[0].enqueued < best_t):
                best, best_t = k, q[0].enqueued
        return best

    def _next_batch(self) -> tuple[Hashable, list[_Slot], list[_Slot]] | None:
        """(key, the batch, the slots dropped because their deadline passed); None once closed and empty."""
        with self._cond:
            while self._pending == 0:
                if self._closed:
                    return None
                self._cond.wait()
            key = self._oldest_key()
            q = self._queues[key]
            deadline = q[0].enqueued + self.max_wait
            while len(q) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Slot] = []
            expired: list[_Slot] = []
            cancelled = 0
            now = time.monotonic()
            while q and len(batch) < self.max_batch:
                slot = q.popleft()
                self._pending -= 1
                if slot.request.future.cancelled():  # the client went away: skip its work
                    cancelled += 1
                elif slot.request.deadline is not None and now >= slot.request.deadline:
                    expired.append(slot)
                else:
                    batch.append(slot)
            if not q:
                del self._queues[key]
        if cancelled:
            with self._stats_lock:
                self.stats.cancelled_items += cancelled
        return key, batch, expired

    def _run(self) -> None:
        while True:
            nxt = self._next_batch()
            if nxt is None:
                return
            key, batch, expired = nxt
            if expired:
                self._expire(expired)
            if not batch:
                continue
            error: BaseException | None = None
            results: Sequence[Any] = ()
            t0 = time.monotonic()
            try:
                results = self.score_fn(key, [s.item for s in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"scoring function returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 -- handed to every waiting request, worker survives
                error = e
            with self._stats_lock:
                self._recent.append((len(batch), time.monotonic() - t0))
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
                if error is not None:
                    self.stats.failed_batches += 1
            self._deliver(batch, results, error)

    def _expire(self, slots: list[_Slot]) -> None:
        """Fail the requests of items whose deadline passed in the queue (each request once)."""
        now = time.monotonic()
        with self._stats_lock:
            self.stats.expired_items += len(slots)
        for slot in slots:
            fut = slot.request.future
            if fut.done():
                continue
            try:
                fut.set_exception(DeadlineExceeded(
                    f"the deadline passed after {now - slot.enqueued:.3f} s in the queue; the request's pairs not "
                    "yet scored were dropped"))
            except InvalidStateError:  # cancelled between the check and now
                pass

    @staticmethod
    def _deliver(batch: list[_Slot], results: Sequence[Any], error: BaseException | None) -> None:
        for n, slot in enumerate(batch):
            req = slot.request
            if req.future.done():  # failed in an earlier batch, or cancelled by its client
                continue
            try:
                if error is not None:
                    req.future.set_exception(error)
                    continue
                req.results[slot.index] = results[n]
                req.remaining -= 1
                if req.remaining == 0:
                    req.future.set_result(req.results)
            except InvalidStateError:  # cancelled between the check and now
                pass

    def stats_dict(self) -> dict[str, Any]:
        with self._stats_lock:
            d = self.stats.to_dict()
        d["queued"] = self._pending
        return d


__all__ = ["BatcherClosed", "BatcherStats", "DeadlineExceeded", "DynamicBatcher", "QueueFull", "retry_after_s"]
