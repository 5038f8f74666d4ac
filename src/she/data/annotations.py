"""The writable side of a fact store: annotators' answers, the work queue and its leases.

The annotation app (``she annotate serve``, :mod:`she.annotation`) writes every answer into the same SQLite
file the verifier reads (:class:`she.data.factstore.FactStore`), so that a running training job sees a new
fact at its next step. The store built by ``she data facts build`` is migrated forward in place: the
``facts`` and ``meta`` tables keep their layout (old readers still read the file) and these tables are
added (``meta.annotation_schema = "1"``)::

    ann_items(item_id TEXT PRIMARY KEY, rank INTEGER, reason TEXT, need INTEGER, record_id TEXT, payload TEXT)
    ann_leases(item_id TEXT PRIMARY KEY, annotator TEXT, expires REAL)
    ann_done(item_id TEXT, annotator TEXT, ts REAL, PRIMARY KEY (item_id, annotator))
    ann_answers(n INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT, record_id TEXT, annotator TEXT, ts REAL,
                target TEXT, value TEXT, previous TEXT, previous_src TEXT)

``target`` is ``step:<index>`` (value ``right``/``wrong``) or ``fact:<field>`` (a value of the StepFacts
vocabulary); a NULL value clears an earlier answer. The answer log is append-only: a correction is a new
row whose ``previous``/``previous_src`` say what it replaced, so an override stays visible.

Concurrency: the file is switched to WAL (readers never block the writer and vice versa); every write is
one ``BEGIN IMMEDIATE`` transaction (answer + fact update together, or nothing); a lease gives an item to
one annotator at a time until it expires, is released or the item is finished.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from she.data.factstore import FACT_FIELDS, FORMAT_VERSION, PathLike
from she.data.schema import StepFacts
from she.data.validation import DataError
from she.errors import UserError

ANNOTATION_SCHEMA = "1"
STEP_VALUES = ("right", "wrong")
_TABLES = (
    "CREATE TABLE IF NOT EXISTS ann_items(item_id TEXT PRIMARY KEY, rank INTEGER NOT NULL, reason TEXT NOT NULL, "
    "need INTEGER NOT NULL, record_id TEXT NOT NULL, payload TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ann_leases(item_id TEXT PRIMARY KEY, annotator TEXT NOT NULL, expires REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ann_done(item_id TEXT NOT NULL, annotator TEXT NOT NULL, ts REAL NOT NULL, "
    "PRIMARY KEY (item_id, annotator))",
    "CREATE TABLE IF NOT EXISTS ann_answers(n INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, "
    "record_id TEXT NOT NULL, annotator TEXT NOT NULL, ts REAL NOT NULL, target TEXT NOT NULL, value TEXT, "
    "previous TEXT, previous_src TEXT)",
    "CREATE INDEX IF NOT EXISTS ann_answers_item ON ann_answers(item_id, target)",
    "CREATE INDEX IF NOT EXISTS ann_items_rank ON ann_items(rank)",
)


class AnswerError(UserError):
    """An answer that does not fit the vocabulary or the item; ``field`` names the offending part (a
    :class:`~she.errors.UserError`, so also a ``ValueError``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_fact_value(name: str, value: Any) -> str | None:
    """``value`` if it is allowed for fact ``name`` (None clears it); else :class:`AnswerError`."""
    if name not in FACT_FIELDS:
        raise AnswerError(f"facts.{name}", f"unknown fact; allowed: {', '.join(FACT_FIELDS)}")
    if value is None:
        return None
    if not isinstance(value, str):
        raise AnswerError(f"facts.{name}", f"must be a string or null, got {json.dumps(value)}")
    try:
        StepFacts(**{name: value})
    except ValueError as e:
        raise AnswerError(f"facts.{name}", str(e).removeprefix(f"facts.{name} ")) from None
    return value


def check_step_value(index: Any, value: Any, n_steps: int) -> tuple[int, str | None]:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_steps:
        raise AnswerError("steps", f"step index {index!r} is not one of 0..{n_steps - 1}")
    if value is not None and value not in STEP_VALUES:
        raise AnswerError(f"steps.{index}", f"must be one of {STEP_VALUES} or null, got {json.dumps(value)}")
    return index, value


@dataclass(frozen=True)
class QueueItem:
    """One unit of work: a record and one policy trace; ``need`` = how many annotators should do it
    (2 for quality-control items, so that agreement can be measured)."""

    item_id: str
    record_id: str
    reason: str
    need: int
    payload: dict[str, Any]  # record JSON, trace text, parsed steps, judge scores: what the page shows


@dataclass(frozen=True)
class Answer:
    n: int
    item_id: str
    record_id: str
    annotator: str
    ts: float
    target: str
    value: str | None
    previous: str | None
    previous_src: str | None


def _create_empty_store(path: Path) -> None:
    con = sqlite3.connect(str(path), isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE IF NOT EXISTS facts(id TEXT PRIMARY KEY, facts TEXT NOT NULL, src TEXT NOT NULL) "
                    "WITHOUT ROWID")
        con.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        meta = {"format": "she-facts", "version": FORMAT_VERSION, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "inputs": "[]", "n_ids": "0"}
        con.executemany("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", meta.items())
        con.execute("COMMIT")
    finally:
        con.close()


class AnnotationStore:
    """Read-write access to a fact store for the annotation app; one SQLite connection per thread."""

    def __init__(self, path: PathLike, *, create: bool = False, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        if not self.path.exists():
            if not create:
                raise DataError("no such fact store (build one with `she data facts build`)", path=self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _create_empty_store(self.path)
        self._migrate()

    # -- connection and schema --------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(str(self.path), isolation_level=None, timeout=self.busy_timeout_s,
                                  check_same_thread=True)
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def _tx(self):
        return _Tx(self._conn())

    def _migrate(self) -> None:
        con = self._conn()
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise DataError(f"not a fact store ({e})", path=self.path) from None
        if meta.get("format") != "she-facts":
            raise DataError("not a fact store (no she-facts metadata)", path=self.path)
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(f"fact store format version {meta.get('version')!r}; this she reads "
                            f"{FORMAT_VERSION!r}: rebuild it", path=self.path)
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")  # persistent: every later connection uses WAL
        with self._tx() as c:
            for sql in _TABLES:
                c.execute(sql)
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('annotation_schema', ?)", (ANNOTATION_SCHEMA,))

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- the queue --------------------------------------------------------------------------------------
    def set_queue(self, items: Sequence[QueueItem]) -> None:
        """Replace the work queue (ranks in the given order). Answers, done marks and facts are kept: a
        restarted server with a new queue does not hand out again what an annotator already finished."""
        with self._tx() as c:
            c.execute("DELETE FROM ann_items")
            c.executemany("INSERT INTO ann_items(item_id, rank, reason, need, record_id, payload) VALUES (?,?,?,?,?,?)",
                          [(it.item_id, rank, it.reason, it.need, it.record_id,
                            json.dumps(it.payload, ensure_ascii=False)) for rank, it in enumerate(items)])

    def item(self, item_id: str) -> QueueItem | None:
        row = self._conn().execute("SELECT item_id, record_id, reason, need, payload FROM ann_items WHERE item_id = ?",
                                   (item_id,)).fetchone()
        return None if row is None else QueueItem(row[0], row[1], row[2], row[3], json.loads(row[4]))

    def lease_next(self, annotator: str, *, ttl_s: float = 600.0, now: float | None = None) -> str | None:
        """The item this annotator should do next, leased to them for ``ttl_s`` seconds (or None when the
        queue has nothing left for them). An item they already hold comes first; an item leased to someone
        else (unexpired), finished by them, or finished by as many annotators as it needs is skipped."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute("DELETE FROM ann_leases WHERE expires <= ?", (now,))
            row = c.execute("SELECT l.item_id FROM ann_leases l JOIN ann_items q USING (item_id) "
                            "WHERE l.annotator = ? ORDER BY q.rank LIMIT 1", (annotator,)).fetchone()
            if row is None:
                row = c.execute(
                    "SELECT q.item_id FROM ann_items q WHERE "
                    "(SELECT COUNT(*) FROM ann_done d WHERE d.item_id = q.item_id) < q.need "
                    "AND NOT EXISTS (SELECT 1 FROM ann_done d WHERE d.item_id = q.item_id AND d.annotator = ?) "
                    "AND NOT EXISTS (SELECT 1 FROM ann_leases l WHERE l.item_id = q.item_id) "
                    "ORDER BY q.rank LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            c.execute("INSERT OR REPLACE INTO ann_leases(item_id, annotator, expires) VALUES (?, ?, ?)",
                      (row[0], annotator, now + ttl_s))
            return row[0]

    def lease_holder(self, item_id: str, *, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        row = self._conn().execute("SELECT annotator FROM ann_leases WHERE item_id = ? AND expires > ?",
                                   (item_id, now)).fetchone()
        return None if row is None else row[0]

    def release(self, item_id: str, annotator: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM ann_leases WHERE item_id = ? AND annotator = ?", (item_id, annotator))

    def finish(self, item_id: str, annotator: str, *, now: float | None = None) -> None:
        """Mark the item done by ``annotator`` and drop their lease."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO ann_done(item_id, annotator, ts) VALUES (?, ?, ?)", (item_id, annotator, now))
            c.execute("DELETE FROM ann_leases WHERE item_id = ? AND annotator = ?", (item_id, annotator))

    # -- answers ----------------------------------------------------------------------------------------
    def answer(self, item_id: str, annotator: str, *, steps: Mapping[int, str | None] | None = None,
               facts: Mapping[str, str | None] | None = None, ttl_s: float = 600.0,
               now: float | None = None) -> list[Answer]:
        """Store one annotator's answers on one item in one transaction: step marks and fact values.

        Every value is validated before anything is written (:class:`AnswerError`: nothing stored). A fact
        value also updates the record's row in ``facts`` (what the verifier reads; the answer overrides the
        earlier value, which is kept in the answer's ``previous``/``previous_src``); None clears the fact.
        The annotator's lease on the item is renewed.
        """
        now = time.time() if now is None else now
        it = self.item(item_id)
        if it is None:
            raise AnswerError("item_id", f"no item {item_id!r} in the queue")
        n_steps = len(it.payload.get("steps", []))
        step_rows = [check_step_value(k, v, n_steps) for k, v in (steps or {}).items()]
        fact_rows = [(name, check_fact_value(name, v)) for name, v in (facts or {}).items()]
        if not step_rows and not fact_rows:
            raise AnswerError("answer", "nothing to store: give steps and/or facts")
        rid = it.record_id
        src = f"annotation:{annotator}@{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}Z"
        out: list[Answer] = []
        with self._tx() as c:
            for k, v in step_rows:
                target = f"step:{k}"
                prev = c.execute("SELECT value, annotator FROM ann_answers WHERE item_id = ? AND target = ? "
                                 "ORDER BY n DESC LIMIT 1", (item_id, target)).fetchone()
                out.append(self._insert(c, item_id, rid, annotator, now, target, v,
                                        prev[0] if prev else None, f"annotation:{prev[1]}" if prev else None))
            if fact_rows:
                row = c.execute("SELECT facts, src FROM facts WHERE id = ?", (rid,)).fetchone()
                cur = json.loads(row[0]) if row else {}
                old_src = row[1] if row else None
                for name, v in fact_rows:
                    out.append(self._insert(c, item_id, rid, annotator, now, f"fact:{name}", v, cur.get(name),
                                            old_src if name in cur else None))
                    if v is None:
                        cur.pop(name, None)
                    else:
                        cur[name] = v
                if cur:
                    c.execute("INSERT OR REPLACE INTO facts(id, facts, src) VALUES (?, ?, ?)",
                              (rid, json.dumps(cur, sort_keys=True, ensure_ascii=False), src))
                else:
                    c.execute("DELETE FROM facts WHERE id = ?", (rid,))
            c.execute("UPDATE ann_leases SET expires = ? WHERE item_id = ? AND annotator = ?",
                      (now + ttl_s, item_id, annotator))
        return out

    @staticmethod
    def _insert(c, item_id, rid, annotator, ts, target, value, previous, previous_src) -> Answer:
        cur = c.execute("INSERT INTO ann_answers(item_id, record_id, annotator, ts, target, value, previous, "
                        "previous_src) VALUES (?,?,?,?,?,?,?,?)",
                        (item_id, rid, annotator, ts, target, value, previous, previous_src))
        return Answer(cur.lastrowid, item_id, rid, annotator, ts, target, value, previous, previous_src)

    def answers(self, item_id: str | None = None) -> list[Answer]:
        """The answer log (all of it, or one item's), oldest first."""
        q = "SELECT n, item_id, record_id, annotator, ts, target, value, previous, previous_src FROM ann_answers"
        rows = self._conn().execute(q + (" WHERE item_id = ? ORDER BY n" if item_id else " ORDER BY n"),
                                    (item_id,) if item_id else ()).fetchall()
        return [Answer(*r) for r in rows]

    def facts_of(self, record_id: str) -> tuple[dict[str, str], str | None]:
        row = self._conn().execute("SELECT facts, src FROM facts WHERE id = ?", (record_id,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else ({}, None)

    # -- progress -------------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """Queue size, items complete (done by as many annotators as they need), and per annotator: items
        finished and answers given."""
        con = self._conn()
        n_items = con.execute("SELECT COUNT(*) FROM ann_items").fetchone()[0]
        complete = con.execute("SELECT COUNT(*) FROM ann_items q WHERE "
                               "(SELECT COUNT(*) FROM ann_done d WHERE d.item_id = q.item_id) >= q.need").fetchone()[0]
        done = dict(con.execute("SELECT annotator, COUNT(*) FROM ann_done GROUP BY annotator").fetchall())
        answers = dict(con.execute("SELECT annotator, COUNT(*) FROM ann_answers GROUP BY annotator").fetchall())
        people = sorted(set(done) | set(answers))
        return {"items": n_items, "complete": complete,
                "annotators": {a: {"done": done.get(a, 0), "answers": answers.get(a, 0)} for a in people}}

    # -- export ---------------------------------------------------------------------------------------
    def iter_facts(self) -> Iterator[tuple[str, dict[str, str], str]]:
        for rid, payload, src in self._conn().execute("SELECT id, facts, src FROM facts ORDER BY id"):
            yield rid, json.loads(payload), src


class _Tx:
    """``with _Tx(con) as c``: ``BEGIN IMMEDIATE`` (the write lock up front, so two writers queue instead of
    failing on lock upgrade) ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, exc_type, *_: object) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


def export_facts(store_path: PathLike, out: PathLike, *, answers_out: PathLike | None = None) -> tuple[int, int]:
    """Write the store's facts as JSONL lines ``{"id", "facts"}`` (the input format of ``she data facts
    build``, so an export rebuilds the same store) and, with ``answers_out``, the answer log (one line per
    answer: item, record, annotator, ISO time, target, value, what it replaced). Returns the line counts."""
    from she.data.factstore import FactStore
    from she.data.validation import atomic_write_lines

    with FactStore.open(store_path) as store:
        con = store._conn()
        rows = con.execute("SELECT id, facts FROM facts ORDER BY id").fetchall()
        has_log = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'ann_answers'").fetchone() is not None
        log_rows = con.execute("SELECT n, item_id, record_id, annotator, ts, target, value, previous, previous_src "
                               "FROM ann_answers ORDER BY n").fetchall() if has_log else []
    atomic_write_lines(out, (json.dumps({"id": rid, "facts": json.loads(f)}, ensure_ascii=False, sort_keys=True) + "\n"
                             for rid, f in rows))
    if answers_out is not None:
        atomic_write_lines(answers_out, (json.dumps(_answer_json(Answer(*r)), ensure_ascii=False) + "\n"
                                         for r in log_rows))
    return len(rows), len(log_rows)


def _answer_json(a: Answer) -> dict[str, Any]:
    return {"item_id": a.item_id, "id": a.record_id, "annotator": a.annotator,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.ts)), "target": a.target, "value": a.value,
            "previous": a.previous, "previous_src": a.previous_src}


def latest_by_annotator(answers: Iterable[Answer]) -> dict[tuple[str, str], dict[str, str]]:
    """``{(item_id, target): {annotator: value}}``: each annotator's last non-cleared answer per target."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for a in sorted(answers, key=lambda a: a.n):
        unit = out.setdefault((a.item_id, a.target), {})
        if a.value is None:
            unit.pop(a.annotator, None)
        else:
            unit[a.annotator] = a.value
    return {k: v for k, v in out.items() if v}


__all__ = [
    "ANNOTATION_SCHEMA",
    "STEP_VALUES",
    "Answer",
    "AnnotationStore",
    "AnswerError",
    "QueueItem",
    "check_fact_value",
    "check_step_value",
    "export_facts",
    "latest_by_annotator",
]
