"""Loaders: public relevance data sets -> canonical :class:`~she.data.schema.Record` lists.

One function per format plus :func:`load_records`, which auto-detects the format. Every loader
returns ``(records, LoadReport)`` and follows the ``on_error`` policy of :mod:`she.data.validation`:
a bad row either stops the load with a :class:`DataError` naming file, line and field ("fail", the
default) or is written to a rejects file and counted ("skip"). Line numbers are 1-based physical
file lines, the header being line 1, so ``sed -n 17p file`` shows the row an error names (a CSV row
with a quoted multi-line field is reported at the line it starts on).

The format-specific mappings and the reasons behind them are documented in ``docs/data.md``.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from she.data.labels import MAPPINGS, get_taxonomy, map_label, rating_to_label
from she.data.schema import Product, Record, StepFacts, normalize_query
from she.data.validation import (
    DataError,
    ErrorSink,
    LoadReport,
    atomic_write_lines,
    check_on_error,
    finish_rejects,
)
from she.errors import UserError

FORMATS: tuple[str, ...] = ("home-depot", "esci", "wands", "jsonl")

PathLike = str | os.PathLike

# ESCI file names as published in amazon-science/esci-data.
ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"
ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
ESCI_SOURCES = "shopping_queries_dataset_sources.csv"

# Human step facts implied by each ESCI label (see docs/data.md for the reasoning). ``specs_met`` is
# "no" for C and I too: by the ESCI definitions a complement "does not fulfil the query" and an
# irrelevant product "fails a central aspect", so not every specification is met.
ESCI_LABEL_FACTS: dict[str, StepFacts] = {
    "Exact": StepFacts(type_relation="same", specs_met="yes"),
    "Substitute": StepFacts(type_relation="related", specs_met="no"),
    "Complement": StepFacts(type_relation="accessory", specs_met="no"),
    "Irrelevant": StepFacts(type_relation="different", specs_met="no"),
}


class _Bad(Exception):
    """A row-level problem: which field, and why. Turned into a RowError by the caller."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# public entry points


def load_records(
    path: PathLike,
    format: str = "auto",
    *,
    on_error: str = "fail",
    rejects_path: PathLike | None = None,
    taxonomy: str | None = None,
    cuts: tuple[float, float] = (1.75, 2.5),
    limit: int | None = None,
    encoding: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """Load ``path`` in ``format`` (``"auto"`` detects it from the name, the directory content or
    the header; see :func:`detect_format`). ``encoding`` is the text encoding of CSV/JSONL input
    (``"auto"``: see :func:`resolve_encoding`).

    ``taxonomy`` relabels every record into that taxonomy with :func:`~she.data.labels.map_label`
    (default: keep each format's own scale). ``cuts`` only applies to Home Depot ratings. ``limit``
    stops after that many *accepted* records (handy for smoke runs).
    """
    fmt = detect_format(path, encoding) if format == "auto" else format
    common = dict(on_error=on_error, rejects_path=rejects_path, taxonomy=taxonomy, limit=limit, encoding=encoding)
    if fmt == "home-depot":
        return load_home_depot(path, cuts=cuts, **common)
    if fmt == "esci":
        return load_esci(path, **common)
    if fmt == "wands":
        return load_wands(path, **common)
    if fmt == "jsonl":
        return load_jsonl(path, **common)
    raise UserError(f"unknown format {format!r}; expected 'auto' or one of {list(FORMATS)}")


def resolve_encoding(path: PathLike, encoding: str = "auto", *, fallback: str = "utf-8") -> str:
    """The text encoding to read ``path`` with.

    An explicit ``encoding`` is used as it is (an unknown codec name is an error). ``"auto"``: a byte-order
    mark decides (UTF-8 BOM -> utf-8, UTF-16 BOM -> utf-16); without one, ``fallback`` -- for Home Depot
    ``"utf-8|latin-1"``: UTF-8 when the whole file decodes as UTF-8, else latin-1 (the Kaggle file's
    encoding; every byte is valid there). UTF-16 without a BOM is not guessed: its header then holds NUL
    bytes, and the loader says to pass the encoding."""
    if encoding != "auto":
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise UserError(f"unknown encoding {encoding!r} (--encoding): give a Python codec name such as utf-8, "
                            "latin-1, cp1252 or utf-16") from None
        return encoding
    p = Path(path)
    if not p.is_file():
        return fallback.split("|")[0]  # the loader reports the path itself
    with open(p, "rb") as f:
        head = f.read(4)
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8"
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        if fallback != "utf-8|latin-1":
            return fallback
        f.seek(0)
        dec = codecs.getincrementaldecoder("utf-8")()
        try:
            while chunk := f.read(1 << 20):
                dec.decode(chunk)
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8"


def detect_format(path: PathLike, encoding: str = "auto") -> str:
    """Guess the format of ``path``.

    * a directory holding WANDS' ``query.csv``, ``product.csv`` and ``label.csv`` -> ``wands``; one
      holding ESCI's examples parquet -> ``esci``;
    * ``.jsonl`` / ``.ndjson`` / ``.json`` -> ``jsonl``; ``.parquet`` -> ``esci``;
    * otherwise the header decides: ``search_term`` + ``relevance`` -> ``home-depot``; ``esci_label``
      -> ``esci``; ``id, query_id, product_id, label`` -> ``wands`` (its ``label.csv``); a first
      character ``{`` -> ``jsonl``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("no such file or directory", path=p)
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if {"query.csv", "product.csv", "label.csv"} <= names:
            return "wands"
        if ESCI_EXAMPLES in names:
            return "esci"
        if "query.csv" in names:
            raise DataError("looks like a WANDS directory but product.csv and label.csv are missing "
                            "(only the query table is there; records need all three files)", path=p)
        raise DataError("cannot detect the format of this directory: expected WANDS query.csv/product.csv/"
                        f"label.csv or ESCI {ESCI_EXAMPLES}; give the format (--format)", path=p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "esci"
    with open(p, "rb") as f:
        raw = f.read(65536)
    if encoding != "auto":
        enc = resolve_encoding(p, encoding)
        head = (raw[: len(raw) // 4 * 4] if "16" in enc or "32" in enc else raw).decode(enc, "replace")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        head = raw[: len(raw) // 2 * 2].decode("utf-16", "replace")
    else:
        head = raw.decode("latin-1")
    # the first physical line: split on "\n" like the loaders (splitlines() would also cut at \x85, \x0c, ...)
    first = head.lstrip("\ufeff").lstrip("ï»¿").split("\n", 1)[0].rstrip("\r") if head.strip() else ""
    if first.lstrip().startswith("{"):
        return "jsonl"
    delim = "\t" if "\t" in first else ","
    try:
        cols = {_clean_header(c) for c in next(csv.reader([first], delimiter=delim), [])}
    except csv.Error as e:  # e.g. a bare carriage return inside the header line
        raise DataError(f"cannot detect the format: the header is not valid CSV ({e}); give the format (--format)",
                        path=p, line=1) from None
    if {"search_term", "relevance", "product_title"} <= cols:
        return "home-depot"
    if "esci_label" in cols:
        return "esci"
    if {"id", "query_id", "product_id", "label"} <= cols:
        return "wands"
    if {"query_id", "query", "query_class"} <= cols:
        raise DataError("this is a WANDS query table; give the WANDS folder (with product.csv and "
                        "label.csv) to load records", path=p, line=1)
    if any("\x00" in c for c in cols) or "\x00" in first:
        raise DataError("the header holds NUL bytes: the file looks like UTF-16 without a byte-order mark; "
                        "give the encoding (--encoding utf-16-le or utf-16-be)", path=p, line=1)
    raise DataError(f"cannot detect the format from the name or the header (columns: {sorted(cols)}); "
                    f"give the format (--format, one of {list(FORMATS)})", path=p, line=1)


def save_jsonl(records: Iterable[Record], path: PathLike) -> Path:
    """Write records in the generic JSONL schema, atomically (temporary file + ``os.replace``)."""
    return atomic_write_lines(path, (r.to_json() + "\n" for r in records))


# ----------------------------------------------------------------------------------------------
# Home Depot


def load_home_depot(
    path: PathLike,
    *,
    on_error: str = "fail",
    rejects_path: PathLike | None = None,
    taxonomy: str | None = None,
    cuts: tuple[float, float] = (1.75, 2.5),
    limit: int | None = None,
    encoding: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """Kaggle Home Depot ``train.csv`` (id, product_uid, product_title, search_term, relevance).

    The Kaggle copy is not UTF-8; it decodes as latin-1 (every byte is valid there, and the few non-ASCII
    bytes are symbols like the degree sign). Re-saved copies are often UTF-8 (with or without a BOM) or
    UTF-16, so ``encoding="auto"`` detects which (:func:`resolve_encoding`). ``relevance`` is the
    mean of >= 3 ratings on 1..3; it is kept in ``score`` and binned into an hd3 label with ``cuts``.
    ``query_id`` is the normalised search term: the same query typed twice is one group for splits.
    """
    cuts = _check_cuts(cuts)
    to_target = _label_mapper("hd3", taxonomy)
    sink, report = _start(on_error, limit)
    records: list[Record] = []
    seen: dict[str, int] = {}
    rows = _csv_rows(path, encoding=resolve_encoding(path, encoding, fallback="utf-8|latin-1"))
    cols = _header(path, rows, required=("id", "product_title", "search_term", "relevance"))
    i_id, i_title, i_q, i_rel = (cols[c] for c in ("id", "product_title", "search_term", "relevance"))
    i_uid = cols.get("product_uid")
    for line, row, raw in _data_rows(path, rows, len(cols), sink, report):
        try:
            rid = _need(row[i_id], "id")
            _check_unique(seen, rid, line)
            title = _need(row[i_title], "product_title")
            query = _need(row[i_q], "search_term")
            rating = _number(row[i_rel], "relevance")
            if not 1.0 <= rating <= 3.0:
                raise _Bad("relevance", f"rating {rating:g} outside the 1..3 scale")
            label, tax = to_target(rating_to_label(rating, cuts))
        except _Bad as b:
            sink.reject(path, line, b.field, b.reason, raw)
            continue
        uid = row[i_uid].strip() if i_uid is not None else ""
        records.append(Record(
            id=rid, query=query, product=Product(title=title, attributes={"product_uid": uid} if uid else {}),
            label=label, taxonomy=tax, score=rating, query_id=normalize_query(query), source="home-depot",
        ))
        if _accept(report, limit):
            break
    return _finish(records, sink, path, rejects_path)


# ----------------------------------------------------------------------------------------------
# Amazon ESCI


def load_esci(
    path: PathLike,
    *,
    on_error: str = "fail",
    rejects_path: PathLike | None = None,
    taxonomy: str | None = None,
    limit: int | None = None,
    sources: PathLike | None | str = "auto",
    products: PathLike | None | str = "auto",
    locales: Sequence[str] | None = None,
    encoding: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """Amazon Shopping Queries (ESCI) with the official column names.

    ``path`` is a CSV with examples and product columns in one table (like the 200-row sample), the
    official examples parquet, or a directory holding it. For parquet examples without product
    columns the products parquet (``products``; ``"auto"``: ``shopping_queries_dataset_products.parquet``
    beside the examples) is joined on (product_id, product_locale).

    ``sources`` is the query-type table ``shopping_queries_dataset_sources.csv`` (``"auto"``: beside the
    input if there, ``None``: don't use one). It sets ``query_meta["query_type"]`` and, for the
    ``negations`` source, ``facts.negation = "yes"``. ``locales`` keeps only those product locales
    (e.g. ``["us"]``); rows left out that way are counted in ``report.n_filtered``.
    """
    to_target = _label_mapper("esci4", taxonomy)
    esci4 = get_taxonomy("esci4")
    sink, report = _start(on_error, limit)
    p = Path(path)
    if not p.exists():
        raise DataError("no such file or directory", path=p)
    base_dir = p if p.is_dir() else p.parent
    if p.is_dir():
        p = p / ESCI_EXAMPLES
        if not p.exists():
            raise DataError(f"directory has no {ESCI_EXAMPLES}", path=base_dir)
    source_of = _esci_sources(base_dir, sources, sink)
    keep_locales = None if locales is None else {str(x).lower() for x in locales}

    if p.suffix.lower() == ".parquet":
        rows, width = _parquet_rows(p, base_dir, products), None
    else:
        csv_rows = _csv_rows(p, encoding=resolve_encoding(p, encoding))
        cols = _header(p, csv_rows, required=("example_id", "query", "esci_label", "product_title"))
        rows = ((line, dict(zip(cols, row)), raw)
                for line, row, raw in _data_rows(p, csv_rows, len(cols), sink, report))
        width = len(cols)

    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, row, raw in rows:
        if width is None:  # parquet rows are not counted by _data_rows
            report.n_read += 1
        locale = _cell(row.get("product_locale"))
        if keep_locales is not None and (locale or "").lower() not in keep_locales:
            report.n_filtered += 1
            continue
        try:
            rid = _need(row.get("example_id"), "example_id")
            _check_unique(seen, rid, line)
            query = _need(row.get("query"), "query")
            qid = _cell(row.get("query_id"))
            if "query_id" in row and qid is None:
                raise _Bad("query_id", "empty")
            esci_label = _need(row.get("esci_label"), "esci_label")
            try:
                native = esci4.normalize(esci_label)
            except ValueError:
                raise _Bad("esci_label", f"unknown label {esci_label!r}; expected E, S, C, I "
                                         "(or Exact, Substitute, Complement, Irrelevant)") from None
            title = _need(row.get("product_title"), "product_title")
            label, tax = to_target(native)
        except _Bad as b:
            sink.reject(p, line, b.field, b.reason, raw)
            continue
        attributes = {k: v for k, v in (("product_id", _cell(row.get("product_id"))), ("product_locale", locale),
                                        ("bullet_points", _cell(row.get("product_bullet_point")))) if v}
        meta = {k: v for k, v in (("locale", locale), ("esci_split", _cell(row.get("split"))),
                                  ("small_version", _cell(row.get("small_version")))) if v}
        facts = replace(ESCI_LABEL_FACTS[native])
        if qid is not None and qid in source_of:
            meta["query_type"] = source_of[qid]
            if source_of[qid] == "negations":
                facts = replace(facts, negation="yes")
        records.append(Record(
            id=rid, query=query,
            product=Product(title=title, brand=_cell(row.get("product_brand")), color=_cell(row.get("product_color")),
                            description=_cell(row.get("product_description")), attributes=attributes),
            label=label, taxonomy=tax, query_id=qid, query_meta=meta, facts=facts, source="esci",
        ))
        if _accept(report, limit):
            break
    return _finish(records, sink, path, rejects_path)


def _esci_sources(base_dir: Path, sources: PathLike | None | str, sink: ErrorSink) -> dict[str, str]:
    """query_id -> source (other / negations / parse_pattern / behavioral / nlqec)."""
    if sources is None:
        return {}
    if isinstance(sources, str) and sources == "auto":
        sp = base_dir / ESCI_SOURCES
        if not sp.exists():
            return {}
    else:
        sp = Path(sources)
        if not sp.exists():
            raise DataError("query sources file not found", path=sp)
    rows = _csv_rows(sp, encoding="utf-8")
    cols = _header(sp, rows, required=("query_id", "source"))
    side = LoadReport()  # side-table rows are not records; their errors still go to the main sink
    out: dict[str, str] = {}
    for line, row, raw in _data_rows(sp, rows, len(cols), sink, side, primary=False):
        qid, src = row[cols["query_id"]].strip(), row[cols["source"]].strip()
        if not qid or not src:
            sink.reject(sp, line, "query_id" if not qid else "source", "empty", raw, primary=False)
            continue
        out[qid] = src
    return out


def _parquet_rows(examples: Path, base_dir: Path, products: PathLike | None | str) -> Iterator[tuple[int, dict, dict]]:
    """Yield (row number, row dict, raw) from the official parquet files, joined with the products
    table when the examples carry no product columns. Rows keep the examples file's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        ex = pq.read_table(examples)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read parquet: {e}", path=examples) from None
    for col in ("example_id", "query", "esci_label", "product_id"):
        if col not in ex.column_names and not (col == "product_id" and "product_title" in ex.column_names):
            raise DataError(f"missing column; columns are {ex.column_names}", path=examples, field=col)
    if "product_title" not in ex.column_names:
        pp = base_dir / ESCI_PRODUCTS if isinstance(products, str) and products == "auto" else products
        if pp is None or not Path(pp).exists():
            raise DataError(f"examples have no product columns and the products table {ESCI_PRODUCTS} was "
                            "not found beside them; put it in the same folder", path=examples)
        prod = pq.read_table(pp)
        keys = [k for k in ("product_id", "product_locale") if k in ex.column_names and k in prod.column_names]
        if "product_id" not in keys:
            raise DataError("products table has no product_id column", path=pp, field="product_id")
        prod = prod.select([c for c in prod.column_names if c in keys or c not in ex.column_names])
        prod = _no_null_columns(prod)  # Arrow's join rejects all-null (type null) columns
        ex = _no_null_columns(ex)
        n = ex.num_rows
        ex = ex.append_column("__row", pa.array(range(n), type=pa.int64()))
        ex = ex.join(prod, keys=keys, join_type="left outer").sort_by("__row")
        if ex.num_rows != n:
            raise DataError(f"products table has duplicate {'+'.join(keys)} keys ({ex.num_rows} joined rows "
                            f"for {n} examples)", path=pp)
        ex = ex.drop_columns(["__row"])
    row_no = 0
    for batch in ex.to_batches(max_chunksize=65536):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row, row


def _no_null_columns(table: Any) -> Any:
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, pa.field(f.name, pa.string()), table.column(i).cast(pa.string()))
    return table


# ----------------------------------------------------------------------------------------------
# WANDS


def load_wands_queries(path: PathLike) -> list[dict[str, str | None]]:
    """WANDS ``query.csv`` (tab-separated: query_id, query, query_class) as a list of dicts, in file
    order; an empty ``query_class`` becomes ``None``. ``path`` is the file or its directory. Any bad
    row raises :class:`DataError` (this table is small and hand-checked: nothing to skip)."""
    p = Path(path)
    if p.is_dir():
        p = p / "query.csv"
    sink = ErrorSink("fail", LoadReport())
    return [{"query_id": qid, "query": q, "query_class": qc} for qid, (q, qc, _line) in _wands_queries(p, sink).items()]


def _wands_queries(p: Path, sink: ErrorSink, encoding: str = "auto") -> dict[str, tuple[str, str | None, int]]:
    rows = _csv_rows(p, encoding=resolve_encoding(p, encoding), delimiter="\t")
    cols = _header(p, rows, required=("query_id", "query", "query_class"))
    out: dict[str, tuple[str, str | None, int]] = {}
    for line, row, raw in _data_rows(p, rows, len(cols), sink, LoadReport(), primary=False):
        try:
            qid = _need(row[cols["query_id"]], "query_id")
            if qid in out:
                raise _Bad("query_id", f"duplicate query_id {qid!r} (first at line {out[qid][2]})")
            out[qid] = (_need(row[cols["query"]], "query"), _cell(row[cols["query_class"]]), line)
        except _Bad as b:
            sink.reject(p, line, b.field, b.reason, raw, primary=False)
    return out


def load_wands(
    path: PathLike,
    *,
    on_error: str = "fail",
    rejects_path: PathLike | None = None,
    taxonomy: str | None = None,
    limit: int | None = None,
    encoding: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """WANDS (Wayfair): a directory with tab-separated ``query.csv``, ``product.csv`` and ``label.csv``
    (or the path of ``label.csv`` with the other two beside it). One record per ``label.csv`` row;
    labels Exact/Partial/Irrelevant are hd3. ``query_class`` / ``product_class`` become facts.

    Rows of ``query.csv`` / ``product.csv`` are checked too (they follow the same on_error policy and
    appear in ``report.errors`` under their own path); a label row whose query or product has no
    valid row is rejected, naming the missing id.
    """
    to_target = _label_mapper("hd3", taxonomy)
    hd3 = get_taxonomy("hd3")
    sink, report = _start(on_error, limit)
    p = Path(path)
    d = p if p.is_dir() else p.parent
    label_path = d / "label.csv"
    for f in (d / "query.csv", d / "product.csv", label_path):
        if not f.exists():
            raise DataError("WANDS file missing (expected query.csv, product.csv and label.csv together)", path=f)
    queries = _wands_queries(d / "query.csv", sink, encoding)
    products = _wands_products(d / "product.csv", sink, encoding)

    rows = _csv_rows(label_path, encoding=resolve_encoding(label_path, encoding), delimiter="\t")
    cols = _header(label_path, rows, required=("id", "query_id", "product_id", "label"))
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, row, raw in _data_rows(label_path, rows, len(cols), sink, report):
        try:
            rid = _need(row[cols["id"]], "id")
            _check_unique(seen, rid, line)
            qid = _need(row[cols["query_id"]], "query_id")
            pid = _need(row[cols["product_id"]], "product_id")
            raw_label = _need(row[cols["label"]], "label")
            if raw_label.lower() not in ("exact", "partial", "irrelevant"):
                raise _Bad("label", f"unknown label {raw_label!r}; expected Exact, Partial or Irrelevant")
            if qid not in queries:
                raise _Bad("query_id", f"query_id {qid!r} has no valid row in query.csv")
            if pid not in products:
                raise _Bad("product_id", f"product_id {pid!r} has no valid row in product.csv")
            label, tax = to_target(hd3.normalize(raw_label))
        except _Bad as b:
            sink.reject(label_path, line, b.field, b.reason, raw)
            continue
        query, qclass, _ = queries[qid]
        prod, pclass = products[pid]
        records.append(Record(
            id=rid, query=query, product=replace(prod, attributes=dict(prod.attributes)),
            label=label, taxonomy=tax, query_id=qid,
            query_meta={"query_class": qclass} if qclass else {},
            facts=StepFacts(query_class=qclass, product_class=pclass), source="wands",
        ))
        if _accept(report, limit):
            break
    return _finish(records, sink, path, rejects_path)


def _wands_products(p: Path, sink: ErrorSink, encoding: str = "auto") -> dict[str, tuple[Product, str | None]]:
    rows = _csv_rows(p, encoding=resolve_encoding(p, encoding), delimiter="\t")
    cols = _header(p, rows, required=("product_id", "product_name"))
    out: dict[str, tuple[Product, str | None]] = {}
    first: dict[str, int] = {}

    def opt(row: list[str], name: str) -> str | None:
        return _cell(row[cols[name]]) if name in cols else None

    for line, row, raw in _data_rows(p, rows, len(cols), sink, LoadReport(), primary=False):
        try:
            pid = _need(row[cols["product_id"]], "product_id")
            if pid in first:
                raise _Bad("product_id", f"duplicate product_id {pid!r} (first at line {first[pid]})")
            name = _need(row[cols["product_name"]], "product_name")
        except _Bad as b:
            sink.reject(p, line, b.field, b.reason, raw, primary=False)
            continue
        first[pid] = line
        pclass = opt(row, "product_class")
        attrs = {"product_id": pid}
        for key, col in (("product_class", "product_class"), ("category_hierarchy", "category hierarchy"),
                         ("features", "product_features")):
            v = opt(row, col)
            if v:
                attrs[key] = v
        out[pid] = (Product(title=name, description=opt(row, "product_description"), attributes=attrs), pclass)
    return out


# ----------------------------------------------------------------------------------------------
# generic JSONL


def load_jsonl(
    path: PathLike,
    *,
    on_error: str = "fail",
    rejects_path: PathLike | None = None,
    taxonomy: str | None = None,
    limit: int | None = None,
    encoding: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """One JSON object per line in the generic schema of :meth:`Record.from_dict` (docs/data.md).
    Blank lines are skipped and counted in ``report.n_blank``. If ``taxonomy`` is given, each labelled
    record is mapped from its own taxonomy into it."""
    if taxonomy is not None:
        get_taxonomy(taxonomy)
    sink, report = _start(on_error, limit)
    records: list[Record] = []
    seen: dict[str, int] = {}
    p = Path(path)
    bad: dict[int, str] = {}
    for line, text in enumerate(_text_lines(p, resolve_encoding(p, encoding), bad), start=1):
        raw = text.rstrip("\r\n")
        if not raw.strip() and line not in bad:
            report.n_blank += 1
            continue
        report.n_read += 1
        try:
            if line in bad:
                raise _Bad(None, bad.pop(line))
            rec = _record_from_json(raw)
            _check_unique(seen, rec.id, line)
            if taxonomy is not None and rec.label is not None and rec.taxonomy != taxonomy:
                try:
                    rec.label = map_label(rec.label, rec.taxonomy, taxonomy)
                except ValueError as e:
                    raise _Bad("taxonomy", str(e)) from None
            if taxonomy is not None:
                rec.taxonomy = taxonomy
        except _Bad as b:
            sink.reject(p, line, b.field, b.reason, raw)
            continue
        records.append(rec)
        if _accept(report, limit):
            break
    return _finish(records, sink, path, rejects_path)


def _loads_line(raw: str, bad: Callable[[str | None, str], Exception] = _Bad) -> Any:
    """``json.loads`` of one input line with every failure raised as ``bad(None, reason)``, which the caller
    turns into a rejected row naming file and line. The fact store reads its JSONL the same way and passes
    its own row-error class as ``bad``."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # hostile input such as 100k nested brackets
        raise bad(None, "invalid JSON: nested too deeply") from None
    except ValueError:  # an integer literal beyond Python's digit limit (sys.get_int_max_str_digits)
        raise bad(None, "invalid JSON: number too long") from None


def _record_from_json(raw: str) -> Record:
    d = _loads_line(raw)
    if not isinstance(d, dict):
        raise _Bad(None, f"expected a JSON object, got {type(d).__name__}")
    try:
        rec = Record.from_dict(d)
    except (ValueError, TypeError) as e:
        raise _Bad(_field_of(str(e)), str(e)) from None
    if _SURROGATE_ESCAPE.search(raw):
        bad = _unencodable_field(rec)
        if bad is not None:
            raise _Bad(bad, "lone UTF-16 surrogate escape (e.g. \\ud800): not representable as UTF-8 text")
    return rec


# a \uD800-\uDFFF escape; paired ones (emoji) are fine, a lone one yields text no UTF-8 writer accepts
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unencodable_field(rec: Record) -> str | None:
    """The (dotted) field of ``rec`` holding text that cannot be encoded as UTF-8, or None. Such a
    record would load fine and crash much later (``save_jsonl``, a tokenizer), far from its line."""
    for k, v in rec.to_dict().items():
        for sub, x in (v.items() if isinstance(v, dict) else [(None, v)]):
            try:
                json.dumps(x, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                return k if sub is None else f"{k}.{sub}"
    return None


_FIELD_PATTERNS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"^(?:missing )?field '([\w.]+)'"), None),
    (re.compile(r"^((?:product|facts)\.\w+) must"), None),
    (re.compile(r"^unknown field\(s\): \['([^']+)'"), None),
    (re.compile(r"^(?:product must|unknown product field)"), "product"),
    (re.compile(r"^(?:facts must|unknown fact)"), "facts"),
    (re.compile(r"^unknown label"), "label"),
    (re.compile(r"^unknown taxonomy"), "taxonomy"),
)


def _field_of(message: str) -> str | None:
    """Name the field a :meth:`Record.from_dict` error message is about (its messages name it)."""
    for pat, fixed in _FIELD_PATTERNS:
        m = pat.search(message)
        if m:
            return fixed if fixed is not None else m.group(1)
    return None


# ----------------------------------------------------------------------------------------------
# shared helpers


def _start(on_error: str, limit: int | None) -> tuple[ErrorSink, LoadReport]:
    check_on_error(on_error)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")
    report = LoadReport()
    return ErrorSink(on_error, report), report


def _accept(report: LoadReport, limit: int | None) -> bool:
    """Count an accepted record; True when ``limit`` is reached."""
    report.n_ok += 1
    return limit is not None and report.n_ok >= limit


def _finish(records: list[Record], sink: ErrorSink, path: PathLike,
            rejects_path: PathLike | None) -> tuple[list[Record], LoadReport]:
    """In skip mode write the rejects (or clear a stale rejects file); in fail mode reaching here
    means there was nothing to reject."""
    if sink.on_error == "skip":
        finish_rejects(sink.report, path, rejects_path)
    return records, sink.report


def _label_mapper(native: str, target: str | None) -> Callable[[str], tuple[str, str]]:
    """Return label -> (label in target, target name). Checked once, up front, so a bad taxonomy
    argument fails before any row is read."""
    if target is None or target == native:
        return lambda label: (label, native)
    get_taxonomy(target)
    if (native, target) not in MAPPINGS:
        raise UserError(f"no label mapping from {native!r} to {target!r}")
    return lambda label: (map_label(label, native, target), target)


def _check_cuts(cuts: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(c) for c in cuts)
    except (TypeError, ValueError):
        raise UserError(f"cuts must be two numbers, got {cuts!r}") from None
    if not 1.0 <= lo <= hi <= 3.0:
        raise UserError(f"cuts must satisfy 1 <= low <= high <= 3, got {cuts!r}")
    return lo, hi


def _check_unique(seen: dict[str, int], rid: str, line: int) -> None:
    if rid in seen:
        raise _Bad("id", f"duplicate id {rid!r} (first at line {seen[rid]})")
    seen[rid] = line


def _cell(v: Any) -> str | None:
    """A table cell as a stripped string, or None when empty/missing (CSV "" or parquet null/NaN)."""
    if v is None:
        return None
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            v = int(v)
    s = str(v).strip()
    return s or None


def _need(v: Any, field: str) -> str:
    s = _cell(v)
    if s is None:
        raise _Bad(field, "empty")
    return s


def _number(v: Any, field: str) -> float:
    s = _cell(v)
    if s is None:
        raise _Bad(field, "empty")
    try:
        x = float(s)
    except ValueError:
        raise _Bad(field, f"not a number: {s!r}") from None
    if not math.isfinite(x):
        raise _Bad(field, f"not a finite number: {s!r}")
    return x


def _clean_header(name: str) -> str:
    return name.lstrip("\ufeff").replace("ï»¿", "").strip()


class _LineTap:
    """Feeds lines to ``csv.reader`` and remembers the physical lines of the current row, so errors
    can report the row's first line and the rejects file can keep its raw text."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._it = iter(lines)
        self.n = 0  # physical lines consumed so far
        self.buf: list[str] = []

    def __iter__(self) -> "_LineTap":
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.n += 1
        self.buf.append(line)
        return line

    def take(self) -> tuple[int, str]:
        """(first line number, raw text) of the lines consumed since the last call."""
        start = self.n - len(self.buf) + 1
        raw = "".join(self.buf).rstrip("\r\n")
        self.buf.clear()
        return start, raw


_Row = tuple[int, list[str] | None, str, str | None]  # (first line, fields or None, raw text, csv error)


def _text_lines(p: Path, encoding: str, bad: dict[int, str] | None = None) -> Iterator[str]:
    """Physical lines of ``p`` (split on ``\\n``, line ends kept), each decoded on its own so a
    decoding error names its true line (a text-mode file decodes ahead in 8 KiB chunks). A UTF-8 BOM
    at the very start is dropped.

    Without ``bad`` a line that does not decode raises :class:`DataError`. With it, the reason is
    stored under the line number and the line is yielded with the bad bytes as ``\\xNN`` escapes, so
    the caller can reject that one row (``on_error="skip"`` goes on) and the rejects file shows it."""
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise DataError("no such file", path=p) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a file", path=p) from None
    except OSError as e:  # permission denied, a device, ...
        raise DataError(f"cannot read ({e.strerror or e})", path=p) from None
    if encoding.lower().replace("_", "-").startswith("utf-16"):
        yield from _utf16_lines(f, p, encoding)
        return
    with f:
        for n, b in enumerate(f, start=1):
            if n == 1 and b.startswith(b"\xef\xbb\xbf") and encoding.lower().replace("_", "-").startswith("utf-8"):
                b = b[3:]
            try:
                yield b.decode(encoding)
            except UnicodeDecodeError as e:
                reason = (f"not valid {encoding} text ({e.reason} at byte {e.start} of the line); if the file has "
                          "another encoding, give it (--encoding, e.g. latin-1)")
                if bad is None:
                    raise DataError(reason, path=p, line=n) from None
                bad[n] = reason
                yield b.decode(encoding, "backslashreplace")


def _utf16_lines(f: Any, p: Path, encoding: str) -> Iterator[str]:
    """The lines of a UTF-16 file (a 2-byte code unit per ASCII character: it cannot be cut at b"\\n")."""
    with f:
        data = f.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"not valid {encoding} text ({e.reason} at byte {e.start}); give the file's encoding "
                        "(--encoding)", path=p) from None
    parts = text.lstrip("\ufeff").split("\n")
    for i, part in enumerate(parts):
        if i < len(parts) - 1:
            yield part + "\n"
        elif part:
            yield part


def _csv_rows(path: PathLike, *, encoding: str, delimiter: str = ",") -> Iterator[_Row]:
    """(first physical line, fields, raw text, None) per CSV/TSV row; a csv syntax error comes out as
    ``(line, None, raw, message)`` so the on_error policy decides, and reading goes on after it."""
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", path=p)
    bad: dict[int, str] = {}  # undecodable lines: a row holding one is a row error, not a file error
    tap = _LineTap(_text_lines(p, encoding, bad))
    reader = csv.reader(tap, delimiter=delimiter, strict=True)
    while True:
        err = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row, err = None, f"CSV syntax error: {e}"
        start, raw = tap.take()
        if bad:
            for n in range(start, tap.n + 1):
                if n in bad:
                    row, err = None, (bad.pop(n) if n == start else f"line {n}: {bad.pop(n)}")
                    break
        yield start, row, raw, err


def _header(path: PathLike, rows: Iterator[_Row],
            required: Sequence[str]) -> dict[str, int]:
    """Read the header row; a missing required column is a file-level error (never skippable)."""
    for line, row, _raw, err in rows:
        if err is not None:
            raise DataError(err, path=path, line=line)
        if row == []:
            continue
        cols = {_clean_header(c): i for i, c in enumerate(row)}
        if len(cols) != len(row):
            raise DataError(f"duplicate column names in the header {row}", path=path, line=line)
        for c in required:
            if c not in cols:
                raise DataError(f"missing column; the header has {list(cols)}", path=path, line=line, field=c)
        return cols
    raise DataError("empty file (no header)", path=path)


def _data_rows(path: PathLike, rows: Iterator[_Row], width: int,
               sink: ErrorSink, report: LoadReport, *, primary: bool = True) -> Iterator[tuple[int, list[str], str]]:
    """Data rows after the header: counts reads and blank lines, rejects rows that are not valid CSV
    or have the wrong number of columns, yields the rest."""
    for line, row, raw, err in rows:
        if row == []:
            report.n_blank += 1
            continue
        report.n_read += 1
        if err is not None:
            sink.reject(path, line, None, err, raw, primary=primary)
            continue
        if len(row) != width:
            sink.reject(path, line, None, f"expected {width} columns, found {len(row)}", raw, primary=primary)
            continue
        yield line, row, raw
