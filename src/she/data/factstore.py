"""A fact store: human step facts in one SQLite file, looked up by record id.

Why: the offline verifier (:func:`she.rewards.verifier.verify_steps`) can only grade a reasoning step
when the record carries a human fact for it. Users annotate facts in their own files, apart from the
data set (a fact pass is done later, by other people, often for only part of the records). The store
joins those annotations onto the records a job loads, by id.

Why SQLite (stdlib ``sqlite3``, one file): a training run needs *random lookups by id* from several
processes (data-parallel ranks, data-loader workers) without each one loading every annotation into
memory. SQLite gives an indexed primary-key lookup on disk, concurrent read-only readers with no
server, and a single file that is copied or replaced as a unit.

Layout (format version 1)::

    facts(id TEXT PRIMARY KEY, facts TEXT NOT NULL, src TEXT NOT NULL) WITHOUT ROWID
    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)

``facts`` is the JSON object of the set facts (:meth:`StepFacts.known`, sorted keys); ``src`` is where
the winning line came from (``file:line``, or ``record:<source>`` for :meth:`FactStore.from_records`).

:meth:`FactStore.build` writes a temporary file in the target folder and ``os.replace``-s it, so a reader
never sees half a store and a failed build leaves the old store untouched. The annotation app
(:mod:`she.data.annotations`) is the one writer that changes a store in place (WAL, one transaction per
answer; it adds its own ``ann_*`` tables, the two above keep their layout). Readers open it read-only
(``mode=ro``). Every lookup sees the latest committed in-place write; :meth:`FactStore.refresh` also
notices a store replaced by a new build (a new file at the path) and reopens it, so a long-running job
calls ``refresh()`` once per step and sees new facts without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from she.data.schema import Record, StepFacts
from she.data.validation import DataError, ErrorSink, LoadReport, check_on_error, finish_rejects
from she.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
FACT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepFacts))
_SHORT_KEYS = frozenset({"id", "facts"})
_CHUNK = 500  # ids per ``IN (...)`` query: well under SQLite's bound-variable limit on every build

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Duplicate:
    """A later line for an id already seen; the later line wins."""

    id: str
    src: str  # the winning (later) line, ``file:line``
    previous: str  # the line it overrode
    same: bool  # True when both lines carry the same facts

    def message(self) -> str:
        how = "same facts" if self.same else "different facts"
        return f"{self.src}: id {self.id!r} overrides {self.previous} ({how})"


@dataclass
class BuildReport(LoadReport):
    """A :class:`LoadReport` for a store build, plus duplicates and the result.

    ``n_read == n_ok + n_rejected + n_filtered`` still holds; a duplicate line is counted in ``n_ok``
    (it was valid) and again in ``n_duplicates``, so the store holds ``n_ok - n_duplicates`` ids
    (``n_ids``). ``n_filtered`` counts records without any fact (only :meth:`FactStore.from_records`
    leaves those out; a fact *file* line without facts is an error).
    """

    n_duplicates: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)
    n_ids: int = 0
    out_path: Path | None = None
    inputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = super().summary()
        return f"{s}; duplicates {self.n_duplicates} (later line wins); {self.n_ids} ids in {self.out_path}"


@dataclass(frozen=True)
class AttachStats:
    """What :func:`attach_facts` did. ``both`` counts records that already had facts *and* got store
    facts (the store wins there); ``conflicting_fields`` counts fields set on both sides with
    different values (the store's value was kept)."""

    records: int = 0
    found: int = 0  # records whose id is in the store
    filled: int = 0  # found, and the record had no facts of its own
    both: int = 0  # found, and the record already had facts
    conflicting_fields: int = 0

    def summary(self) -> str:
        return (f"{self.found}/{self.records} records found in the fact store; {self.filled} filled, "
                f"{self.both} had facts already (store wins, {self.conflicting_fields} conflicting fields)")


# -- validation (pure) --------------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


def _parse_facts(value: Any, where: str = "facts") -> StepFacts:
    """Validate a ``facts`` object field by field against the StepFacts vocabulary.

    Stricter than :meth:`StepFacts.from_dict`, which turns any value into a string: here a value must be
    a string or null (``true`` for ``negation`` is an error, not the fact ``"True"``), so a typo names
    its exact field. Raises ``_Bad(field, reason)``.
    """
    if not isinstance(value, dict):
        raise _Bad(where, f"must be an object of facts, got {type(value).__name__}")
    out: dict[str, str | None] = {}
    for key, v in value.items():
        name = f"{where}.{key}"
        if key not in FACT_FIELDS:
            raise _Bad(name, f"unknown fact; allowed: {', '.join(FACT_FIELDS)}")
        if v is not None and not isinstance(v, str):
            raise _Bad(name, f"must be a string or null, got {json.dumps(v)}")
        try:
            StepFacts(**{key: v})
        except ValueError as e:
            msg = str(e)  # "facts.brand must be one of (...), got 'x'": the field is named separately
            raise _Bad(name, msg.removeprefix(f"facts.{key} ")) from None
        out[key] = v
    facts = StepFacts(**out)
    if facts.is_empty():
        raise _Bad(where, "no fact set (every value is null or the object is empty); a fact store line "
                          "needs at least one fact")
    return facts


def _parse_fact_line(obj: Any) -> tuple[str, StepFacts]:
    """``(id, facts)`` from one decoded JSONL line: either ``{"id", "facts"}`` or a full generic record
    (:meth:`Record.from_dict`) that has a ``facts`` field. Raises ``_Bad(field, reason)``."""
    if not isinstance(obj, dict):
        raise _Bad(None, f"expected a JSON object, got {type(obj).__name__}")
    if "facts" not in obj:
        raise _Bad("facts", "missing field (a fact store line is {\"id\": ..., \"facts\": {...}} "
                            "or a full record with facts)")
    facts = _parse_facts(obj["facts"])
    if set(obj) <= _SHORT_KEYS:
        if "id" not in obj:
            raise _Bad("id", "missing field")
        rid = obj["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
            raise _Bad("id", f"must be a non-empty string or integer, got {json.dumps(rid)}")
        return str(rid), facts
    from she.data.loaders import _field_of  # names the field of a Record.from_dict message

    try:
        rec = Record.from_dict(obj)
    except (ValueError, TypeError) as e:
        raise _Bad(_field_of(str(e)), str(e)) from None
    return rec.id, facts


def _facts_json(facts: StepFacts) -> str:
    return json.dumps(facts.known(), sort_keys=True, ensure_ascii=False)


# -- writing ------------------------------------------------------------------------------------------
class _Writer:
    """Fills a fresh SQLite file; later rows for an id replace earlier ones and are counted."""

    def __init__(self, path: Path, report: BuildReport) -> None:
        self.report = report
        self.con = sqlite3.connect(str(path), isolation_level=None)
        self.con.execute("PRAGMA journal_mode=OFF")  # a temp file: on failure it is deleted anyway
        self.con.execute("PRAGMA synchronous=OFF")  # durability comes from fsync + os.replace at the end
        self.con.execute("CREATE TABLE facts(id TEXT PRIMARY KEY, facts TEXT NOT NULL, src TEXT NOT NULL) "
                         "WITHOUT ROWID")
        self.con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.con.execute("BEGIN")

    def put(self, rid: str, facts: StepFacts, src: str) -> None:
        payload = _facts_json(facts)
        old = self.con.execute("SELECT facts, src FROM facts WHERE id = ?", (rid,)).fetchone()
        if old is not None:
            self.report.n_duplicates += 1
            self.report.duplicates.append(Duplicate(rid, src, old[1], old[0] == payload))
        self.con.execute("INSERT OR REPLACE INTO facts(id, facts, src) VALUES (?, ?, ?)", (rid, payload, src))

    def finish(self, inputs: Sequence[str]) -> int:
        n = self.con.execute("SELECT COUNT(*) FROM facts").fetchone()[0]
        meta = {"format": "she-facts", "version": FORMAT_VERSION, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "inputs": json.dumps(list(inputs)), "n_ids": str(n)}
        self.con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
        self.con.execute("COMMIT")
        self.con.close()
        return n

    def close(self) -> None:
        try:
            self.con.close()
        except sqlite3.Error:
            pass


def _atomic_store(out_path: PathLike, fill, inputs: Sequence[str], report: BuildReport) -> Path:
    """Run ``fill(writer)`` on a temporary database next to ``out_path``, then ``os.replace`` it into
    place. Any exception removes the temporary file and leaves an existing store untouched."""
    target = Path(out_path)
    if target.is_dir():
        raise DataError("is a directory; pass a file path for the store", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    writer = None
    try:
        writer = _Writer(Path(tmp), report)
        fill(writer)
        report.n_ids = writer.finish(inputs)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; other users' jobs may read the store
        os.replace(tmp, target)
    except BaseException:
        if writer is not None:
            writer.close()
        for p in (tmp, tmp + "-journal"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise
    report.out_path = target
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fill_from_files(paths: Sequence[Path], sink: ErrorSink, report: BuildReport):
    # per-line decoding: an encoding error names its line
    from she.data.loaders import _SURROGATE_ESCAPE, _loads_line, _text_lines

    def fill(writer: _Writer) -> None:
        for p in paths:
            for line, text in enumerate(_text_lines(p, "utf-8"), start=1):
                raw = text.rstrip("\r\n")
                if not raw.strip():
                    report.n_blank += 1
                    continue
                report.n_read += 1
                try:
                    rid, facts = _parse_fact_line(_loads_line(raw, _Bad))
                    if _SURROGATE_ESCAPE.search(raw):  # a lone \ud800 cannot be stored as UTF-8 text
                        for name, value in (("id", rid), ("facts", facts.known())):
                            try:
                                json.dumps(value, ensure_ascii=False).encode("utf-8")
                            except UnicodeEncodeError:
                                raise _Bad(name, "lone UTF-16 surrogate escape (e.g. \\ud800): not "
                                                 "representable as UTF-8 text") from None
                except _Bad as b:
                    sink.reject(p, line, b.field, b.reason, raw)
                    continue
                report.n_ok += 1
                writer.put(rid, facts, f"{p}:{line}")

    return fill


# -- the store ----------------------------------------------------------------------------------------
class FactStore:
    """Read-only access to a fact store file (see the module docstring).

    The SQLite connection is opened lazily and per process (a forked data-loader worker or a pickled
    copy opens its own), because a SQLite connection must not be shared across ``fork``.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._con: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._seen: tuple[tuple[int, int], int] | None = None  # (file identity, data_version) at the last refresh()
        self.generation = 0  # how many times refresh() has seen the store change

    # building -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, jsonl_paths: PathLike | Sequence[PathLike], out_path: PathLike, *, on_error: str = "fail",
              rejects_path: PathLike | None = None) -> BuildReport:
        """Validate annotation JSONL files and write them into a new store at ``out_path``.

        Each non-blank line is ``{"id": ..., "facts": {...}}`` or a full generic record
        (:meth:`Record.from_dict`) with a ``facts`` field; every fact is checked against the StepFacts
        vocabulary and a line needs at least one fact. Files are read in the given order; when an id
        comes again, the later line wins and the override is counted in ``report.duplicates``.

        ``on_error="fail"`` raises :class:`DataError` (``file:line: field 'facts.brand': ...``) at the
        first bad line and writes nothing. ``"skip"`` stores the good lines and writes every bad one
        to ``rejects_path`` (default ``<out_path>.rejects.jsonl``: the output folder is writable, the
        inputs may not be).
        """
        check_on_error(on_error)
        paths = [Path(p) for p in ([jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else jsonl_paths)]
        if not paths:
            raise UserError("no input file given")
        for p in paths:
            if not p.is_file():
                raise DataError("no such file" if not p.exists() else "not a file", path=p)
        report = BuildReport(inputs=[str(p) for p in paths])
        sink = ErrorSink(on_error, report)
        _atomic_store(out_path, _fill_from_files(paths, sink, report), report.inputs, report)
        if on_error == "skip":
            finish_rejects(report, out_path, rejects_path)
        return report

    @classmethod
    def from_records(cls, records: Iterable[Record], out_path: PathLike) -> BuildReport:
        """Write the facts the loaders already derived (ESCI label facts, synthetic facts, JSONL facts)
        into a store. Records without facts are counted in ``n_filtered`` and left out; a repeated
        id is handled as in :meth:`build` (later wins, counted)."""
        report = BuildReport(inputs=["<records>"])

        def fill(writer: _Writer) -> None:
            for r in records:
                report.n_read += 1
                if r.facts.is_empty():
                    report.n_filtered += 1
                    continue
                report.n_ok += 1
                writer.put(r.id, r.facts, f"record:{r.source}")

        _atomic_store(out_path, fill, report.inputs, report)
        return report

    # reading ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: PathLike) -> "FactStore":
        """Open an existing store read-only; a missing file or a file that is not a fact store is a
        :class:`DataError` here, not at the first lookup."""
        store = cls(path)
        p = store.path
        if not p.is_file():
            raise DataError("no such fact store (build one with `she data facts build`)", path=p)
        try:
            meta = dict(store._conn().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            store.close()
            raise DataError(f"not a fact store ({e})", path=p) from None
        if meta.get("format") != "she-facts":
            store.close()
            raise DataError("not a fact store (no she-facts metadata)", path=p)
        if meta.get("version") != FORMAT_VERSION:
            store.close()
            raise DataError(f"fact store format version {meta.get('version')!r}; this she reads "
                            f"{FORMAT_VERSION!r}: rebuild it", path=p)
        return store

    def _conn(self) -> sqlite3.Connection:
        if self._con is None or self._pid != os.getpid():
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._pid = os.getpid()
        return self._con

    def _identity(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def refresh(self) -> bool:
        """True when the store changed since the last call (the first call only records the state).

        Two kinds of change: a write in place (the annotation app), seen through SQLite's
        ``PRAGMA data_version``, which moves when another connection commits; and a new file at the path
        (a rebuild ``os.replace``-d it), seen through the file's inode, which closes and reopens the
        connection. A store file that vanished keeps the old connection (the job goes on with the facts
        it has) and counts as no change.
        """
        try:
            ident = self._identity()
        except FileNotFoundError:
            return False
        before = self._seen
        if before is not None and before[0] != ident:
            self.close()
        version = int(self._conn().execute("PRAGMA data_version").fetchone()[0])
        state = (ident, version)
        changed = before is not None and state != before
        if changed:
            self.generation += 1
        self._seen = state
        return changed

    def meta(self) -> dict[str, str]:
        return dict(self._conn().execute("SELECT key, value FROM meta").fetchall())

    def get(self, record_id: str | int) -> StepFacts | None:
        """The facts for ``record_id``, or None when the store has none."""
        row = self._conn().execute("SELECT facts FROM facts WHERE id = ?", (str(record_id),)).fetchone()
        return None if row is None else StepFacts.from_dict(json.loads(row[0]))

    def source_of(self, record_id: str | int) -> str | None:
        """Where the stored facts for ``record_id`` came from (``file:line``), or None."""
        row = self._conn().execute("SELECT src FROM facts WHERE id = ?", (str(record_id),)).fetchone()
        return None if row is None else row[0]

    def get_many(self, record_ids: Iterable[str | int]) -> dict[str, StepFacts]:
        """``{id: facts}`` for the ids the store has; ids it lacks are simply absent from the result."""
        ids = list(dict.fromkeys(str(i) for i in record_ids))
        out: dict[str, StepFacts] = {}
        con = self._conn()
        for s in range(0, len(ids), _CHUNK):
            chunk = ids[s : s + _CHUNK]
            q = f"SELECT id, facts FROM facts WHERE id IN ({','.join('?' * len(chunk))})"
            for rid, payload in con.execute(q, chunk):
                out[rid] = StepFacts.from_dict(json.loads(payload))
        return out

    def ids(self) -> Iterator[str]:
        """Every id, in id order (streams; never loads the table)."""
        for (rid,) in self._conn().execute("SELECT id FROM facts ORDER BY id"):
            yield rid

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM facts").fetchone()[0])

    def __contains__(self, record_id: object) -> bool:
        if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
            return False
        return self._conn().execute("SELECT 1 FROM facts WHERE id = ?", (str(record_id),)).fetchone() is not None

    def attach(self, records: Sequence[Record], *, replace_facts: bool = False) -> list[Record]:
        """``records`` with their facts taken from the store (see :func:`attach_facts`); logs counts."""
        out, stats = attach_facts(records, self, replace_facts=replace_facts)
        log.info("%s (%s)", stats.summary(), self.path)
        return out

    def close(self) -> None:
        if self._con is not None and self._pid == os.getpid():
            self._con.close()
        self._con, self._pid, self._seen = None, None, None

    def __enter__(self) -> "FactStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._con, self._pid, self._seen, self.generation = state["path"], None, None, None, 0

    def __repr__(self) -> str:
        return f"FactStore({str(self.path)!r})"


def merge_facts(own: StepFacts, stored: StepFacts, *, replace_facts: bool = False) -> tuple[StepFacts, int]:
    """Combine a record's facts with the store's: ``(facts, conflicting fields)``.

    Default (merge): every fact the store sets wins; a fact the store leaves null keeps the record's
    value, because null in an annotation means *not annotated*, not *unknown* -- it must not erase a
    fact the loader derived (an ESCI label's ``type_relation``, say). ``replace_facts=True`` takes the
    store's facts as they are. A conflict is a field both set to different values.
    """
    a, b = own.known(), stored.known()
    conflicts = sum(1 for k, v in b.items() if k in a and a[k] != v)
    if replace_facts:
        return replace(stored), conflicts
    return StepFacts(**{**a, **b}), conflicts


def attach_facts(records: Sequence[Record], store: FactStore, *,
                 replace_facts: bool = False) -> tuple[list[Record], AttachStats]:
    """A new list: records found in the store are copies with merged facts (:func:`merge_facts`; the
    store wins on every field it sets), the others are the same objects. When a record already had
    facts the store still wins; those records are counted in ``stats.both`` and the differing fields
    in ``stats.conflicting_fields``, so a job can log how much the annotation changed."""
    found = store.get_many(r.id for r in records)
    out: list[Record] = []
    filled = both = conflicts = n_found = 0
    for r in records:
        stored = found.get(r.id)
        if stored is None:
            out.append(r)
            continue
        n_found += 1
        if r.facts.is_empty():
            filled += 1
        else:
            both += 1
        facts, c = merge_facts(r.facts, stored, replace_facts=replace_facts)
        conflicts += c
        out.append(replace(r, facts=facts))
    return out, AttachStats(len(records), n_found, filled, both, conflicts)


def facts_on_share(records: Sequence[Record], share: float | None) -> list[Record]:
    """``records`` whose step facts are kept on ``share`` of them and cleared on the rest, as on data whose fact
    pass covered only part of the pairs (sizing an annotation budget: ``rl.facts_share``, docs/srpo.md). A record
    keeps its facts when a hash of its id, read as a number in [0, 1), is below ``share``: the same subset in every
    run, seed and process, and the subset at a smaller share lies inside the one at a larger share. ``None``: all
    records unchanged."""
    if share is None:
        return list(records)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise UserError(f"facts_share must be a number in [0, 1] (the share of records keeping their step facts), "
                        f"got {share!r}")
    return [r if _unit_hash(r.id) < share else replace(r, facts=StepFacts()) for r in records]


def _unit_hash(rid: str) -> float:
    """A record id as a number in [0, 1): the first 8 bytes of its SHA-256 over 2^64 (not Python's per-process
    string hash)."""
    return int.from_bytes(hashlib.sha256(str(rid).encode()).digest()[:8], "big") / 2.0**64


def attach_from_path(records: Sequence[Record], store_path: PathLike | None) -> list[Record]:
    """The jobs' hook (``facts_store:`` in RL/PRM configs): records unchanged when no store is set,
    else with the store's facts attached (the store is opened, used and closed)."""
    if store_path is None:
        return list(records)
    with FactStore.open(store_path) as store:
        out, stats = attach_facts(records, store)
    # no id found at all is almost always an id mismatch (store built from other data): say it loudly
    level = logging.WARNING if records and stats.found == 0 else logging.INFO
    log.log(level, "fact store %s: %s", store_path, stats.summary())
    return out


__all__ = [
    "AttachStats",
    "BuildReport",
    "Duplicate",
    "FactStore",
    "attach_facts",
    "attach_from_path",
    "facts_on_share",
    "merge_facts",
]
