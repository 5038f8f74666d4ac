"""Row-level validation policy shared by every loader.

Why this exists: public relevance data sets are large, hand-made CSV dumps, and a judge trained on a
silently corrupted row learns the corruption. So a loader never drops a row without saying so:

* ``on_error="fail"`` (the default) stops at the first bad row with a :class:`DataError` naming the
  file, the 1-based physical line (the header is line 1), the field and the reason;
* ``on_error="skip"`` keeps loading, records every bad row as a :class:`RowError`, writes all of them
  (the raw text of the row plus the reason) to a *rejects* JSONL file and counts them in the
  :class:`LoadReport`, so the caller can both continue and audit what was left out.

For parquet input there are no physical lines; ``line`` is then the 1-based row number of the table
and messages say "row" instead of a colon-separated line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from she.errors import UserError

OnError = Literal["fail", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("fail", "skip")


def _location(path: str | None, line: int | None) -> str:
    if not path:
        return ""
    if line is None:
        return str(path)
    if str(path).endswith(".parquet"):
        return f"{path} row {line}"
    return f"{path}:{line}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class RowError:
    """One rejected input row.

    ``raw`` is the row exactly as read (the physical text for CSV/JSONL, possibly spanning several
    lines for quoted CSV fields; a dict of column values for parquet) so the rejects file can be
    fixed by hand and fed back.
    """

    path: str
    line: int | None
    field: str | None
    reason: str
    raw: Any = None

    def message(self) -> str:
        where = _location(self.path, self.line)
        what = f"field {self.field!r}: " if self.field else ""
        return _one_line(f"{where}: {what}{self.reason}" if where else f"{what}{self.reason}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, default=str)


class DataError(UserError):
    """Bad input data. ``str()`` is a single human-readable line such as
    ``train.csv:17: field 'relevance': not a number: 'abc'`` so a CLI can print it as is.

    A :class:`~she.errors.UserError` (so also a ``ValueError``): the CLI prints it and exits with status 2."""

    def __init__(self, reason: str, *, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        return RowError(self.path or "", self.line, self.field, self.reason).message()

    @classmethod
    def from_row(cls, err: RowError) -> "DataError":
        return cls(err.reason, path=err.path, line=err.line, field=err.field)

    def __str__(self) -> str:
        return self._message()


@dataclass
class LoadReport:
    """What a load did. Invariant: ``n_read == n_ok + n_rejected + n_filtered``.

    ``n_read`` counts the *primary* data rows (one candidate record each; blank lines are not rows and
    are counted in ``n_blank``). ``errors`` holds every rejected row; it may also hold rows of a side
    table (a WANDS ``product.csv`` row, say), recognisable by their ``path``. ``rejects_path`` is where
    the rejects were written, or ``None`` when nothing was written.
    """

    n_read: int = 0
    n_ok: int = 0
    n_rejected: int = 0
    n_blank: int = 0
    n_filtered: int = 0  # rows deliberately left out by a caller-chosen filter (e.g. ESCI locales)
    errors: list[RowError] = field(default_factory=list)
    rejects_path: Path | None = None

    def summary(self) -> str:
        parts = [f"read {self.n_read}", f"ok {self.n_ok}", f"rejected {self.n_rejected}"]
        if self.n_blank:
            parts.append(f"blank lines {self.n_blank}")
        if self.n_filtered:
            parts.append(f"filtered {self.n_filtered}")
        s = ", ".join(parts)
        if self.rejects_path is not None:
            s += f"; rejects in {self.rejects_path}"
        return s


class ErrorSink:
    """Applies the ``on_error`` policy while a loader runs. Loaders call :meth:`reject` for each bad
    row; in fail mode that raises, in skip mode it records the row."""

    def __init__(self, on_error: str, report: LoadReport) -> None:
        check_on_error(on_error)
        self.on_error = on_error
        self.report = report

    def reject(self, path: str | os.PathLike, line: int | None, field: str | None, reason: str,
               raw: Any = None, *, primary: bool = True) -> None:
        err = RowError(str(path), line, field, _one_line(reason), raw)
        if self.on_error == "fail":
            raise DataError.from_row(err)
        self.report.errors.append(err)
        if primary:
            self.report.n_rejected += 1


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise UserError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def default_rejects_path(input_path: str | os.PathLike) -> Path:
    """``<input>.rejects.jsonl`` next to the input (for a directory: next to the directory)."""
    p = Path(input_path)
    return p.with_name(p.name + ".rejects.jsonl")


def write_rejects(errors: list[RowError], path: str | os.PathLike) -> Path:
    """Write one JSON object per rejected row (path, line, field, reason, raw), atomically."""
    return atomic_write_lines(path, (e.to_json() + "\n" for e in errors))


def finish_rejects(report: LoadReport, input_path: str | os.PathLike, rejects_path: str | os.PathLike | None) -> None:
    """After a skip-mode load: write the rejects file when there is something to write, or when a
    file is already there (so an old rejects file never outlives the data it described)."""
    target = Path(rejects_path) if rejects_path is not None else default_rejects_path(input_path)
    if report.errors or target.exists():
        try:
            report.rejects_path = write_rejects(report.errors, target)
        except OSError as e:
            raise DataError(f"cannot write rejects file ({e.strerror or e}); give another rejects file (--rejects)",
                            path=target) from None


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write ``lines`` (each with its own newline) to ``path`` via a temporary file in the same
    directory and ``os.replace``, so a reader never sees a half-written file and a failure midway
    (a crash, or an exception raised by the ``lines`` iterator) leaves any old file intact. A ``path`` ending in
    ``.gz`` is written gzip-compressed."""
    import gzip

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if target.suffix == ".gz":
            os.close(fd)
            f = gzip.open(tmp, "wt", encoding="utf-8", newline="\n", compresslevel=9)
        else:
            f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        with f:
            f.writelines(lines)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_labelled_unique(records: Iterable[Any], purpose: str) -> None:
    """Raise ``ValueError`` at the first record without a gold label (``purpose`` says who needs it, e.g.
    "RL needs labelled records") or whose id came before. Jobs that score rollouts look records up by id
    and grade them against the gold label, so either problem would later give silently wrong rewards or
    pass rates instead of an error naming the record."""
    seen: set[str] = set()
    for r in records:
        if r.label is None:
            raise UserError(f"record {r.id}: no gold label; {purpose}")
        if r.id in seen:
            raise UserError(f"record id {r.id!r} occurs twice; record ids must be unique")
        seen.add(r.id)


def iter_jsonl(path: str | os.PathLike):
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file; bad JSON raises
    ``ValueError`` naming the file and line. For small side files (traces, PRM rows); records go
    through :mod:`she.data.loaders`, which can also skip and write rejects. A name ending in ``.gz`` is read
    gzip-compressed."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON: {e.msg}") from None
