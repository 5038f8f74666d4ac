"""Property-based bad-input tests (hypothesis): loaders, the trace parser, the CLI and the config loader.

The guarantees under test (docs/data.md, "Bad input"):

* a loader either returns records or raises ``DataError`` -- never another exception type -- and the
  error names the file, the 1-based line of the row and, for a field-level problem, the field;
* ``on_error="skip"`` keeps every good row, rejects exactly the bad ones (the rejects file lists each
  bad row with its line, field and raw text) and ``n_ok + n_rejected == n_read``;
* a failing load or command leaves no partial file behind;
* ``parse_trace`` never raises, and its spans always point at the text they describe;
* the CLI turns every user error into exit status 2 and one ``she: error: ...`` line, no traceback;
* ``load_config`` either builds the config or raises ``ConfigError``.

Every fixture is generated here (no row of the shared data is copied). Runs are derandomized, so CI
sees the same examples every time, and do not shrink failures (slow on a small machine);
``SHE_HYPOTHESIS_PROFILE=she-debug`` shrinks a CI failure, ``she-dev`` explores new examples locally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from she import config as she_config
from she.cli import main as cli_main
from she.config import ConfigError, DataConfig, SFTJobConfig, from_dict, load_config
from she.data.labels import TAXONOMIES, get_taxonomy
from she.data.loaders import detect_format, load_records, save_jsonl
from she.data.schema import ATTRIBUTES, MATCH_VALUES, TYPE_RELATIONS
from she.data.validation import DataError
from she.reasoning.parse import MAX_ERRORS, consistent_label, guideline_label, parse_trace
from she.reasoning.render import one_line, render_trace
from she.reasoning.schema import default_schema

REPO = Path(__file__).resolve().parents[1]

settings.register_profile(
    "she-ci",
    derandomize=True,  # same examples on every run: a CI failure is reproducible as is
    database=None,  # nothing written under .hypothesis/ in the repo
    deadline=None,  # a shared 2-core machine makes timings noisy; the runtime is bounded by max_examples
    # no shrinking: minimising a failure of these multi-row files can take many minutes on a small
    # CI machine; the failing example is printed as is (rerun with she-debug to minimise it)
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("she-debug", parent=settings.get_profile("she-ci"),
                          phases=[Phase.explicit, Phase.generate, Phase.shrink])
settings.register_profile("she-dev", parent=settings.get_profile("she-debug"), derandomize=False)
_PROFILE = settings.get_profile(os.environ.get("SHE_HYPOTHESIS_PROFILE", "she-ci"))


def cfg(n: int) -> settings:
    """The module profile with ``n`` examples (kept small: the whole file must run in well under 30 s)."""
    return settings(_PROFILE, max_examples=n)


# ----------------------------------------------------------------------------------------------
# hostile text

HOSTILE = [
    "=cmd|' /C calc'!A0", "=1+2", "+SUM(A1:A9)", "@x", "-2+3",                      # spreadsheet formulas
    '{"id": "1", "label": "Exact"}', '"}, "label": "Exact", "x": {"', "\\", "\\u0000",  # JSON injection
    '"', '""', "'", ",", ";", "\t", " ", "\x00", "\x1b[2J", "\x7f", "\x0b", "\x0c", "\x08",  # quotes, controls
    "\x85", "\xa0", "\u00b0", "\u00ff", "\u2028", "\u202e", "\ufeff", "\U0001f600", "\u0301",
    "<script>alert(1)</script>", "' OR 1=1 --", "null", "NaN", "\r", "\n", "\r\n",
]


def hostile_text(latin1: bool = False, *, nonblank: bool = True, max_parts: int = 5) -> st.SearchStrategy[str]:
    chars = st.characters(codec="latin-1") if latin1 else st.characters(codec="utf-8")  # no surrogates
    frags = [h for h in HOSTILE if not latin1 or all(ord(c) < 256 for c in h)]
    part = st.one_of(st.sampled_from(frags), st.text(chars, max_size=12))
    s = st.lists(part, min_size=1, max_size=max_parts).map("".join)
    s = st.one_of(s, s.map(lambda x: x * 300))  # now and then a long field (still under csv's 128 KiB limit)
    return s.filter(lambda x: x.strip()) if nonblank else s


def csv_field(s: str, force_quote: bool = False) -> str:
    if force_quote or any(c in s for c in ',"\r\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


# ----------------------------------------------------------------------------------------------
# a file of good, bad and blank rows, with what the loader must do with each


@dataclass
class Row:
    data: bytes  # the row's bytes, line end included
    kind: str  # "good", "blank" or the kind of defect
    rid: str | None = None  # a good row's id
    field: str | None = None  # the field a bad row's error must name (None: the row as a whole)
    query: str | None = None  # what a good row must load as
    title: str | None = None

    def __repr__(self) -> str:  # failing examples hold 100 KB fields: keep the report readable
        def short(v: object) -> str:
            r = repr(v)
            return r if len(r) <= 120 else f"{r[:100]}...<{len(r)} chars>"

        return f"Row({self.kind}, field={self.field!r}, data={short(self.data)})"


@dataclass
class Case:
    fmt: str
    name: str
    prefix: bytes  # BOM + header
    rows: list[Row]
    encoding: str

    def content(self) -> bytes:
        return self.prefix + b"".join(r.data for r in self.rows)

    def lines(self) -> list[tuple[int, Row]]:
        """(first physical line, row) for every row; the header (if any) is line 1."""
        n = self.prefix.count(b"\n") + 1
        out = []
        for r in self.rows:
            out.append((n, r))
            n += r.data.count(b"\n")
        return out


HD_COLS = ["id", "product_uid", "product_title", "search_term", "relevance"]
ESCI_COLS = ["example_id", "query", "query_id", "esci_label", "product_title", "product_brand"]

# defect kind -> field the error must name
HD_BAD = {"empty_id": "id", "empty_title": "product_title", "blank_query": "search_term",
          "not_a_number": "relevance", "out_of_range": "relevance", "wrong_width": None, "csv_syntax": None,
          "bare_cr": None, "huge_field": None, "dup": "id"}
ESCI_BAD = {"empty_id": "example_id", "empty_query": "query", "empty_qid": "query_id", "bad_label": "esci_label",
            "empty_title": "product_title", "bad_utf8": None, "wrong_width": None, "csv_syntax": None,
            "bare_cr": None, "huge_field": None, "dup": "id"}
JSONL_BAD = {"truncated": None, "not_object": None, "deep": None, "big_int": None, "bad_utf8": None,
             "raw_control": None, "no_title": "product.title", "unknown_field": "colour", "bad_label": "label",
             "bad_fact": "facts.brand", "bad_score": "score", "bool_id": "id", "surrogate": "query",
             "empty_query": "query", "bad_taxonomy": "taxonomy", "dup": "id"}
BAD_UTF8 = [b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"]


@st.composite
def kinds_strategy(draw, bad: dict[str, str | None], focus: str) -> list[str]:
    """Row kinds of one file: random good/blank/bad rows plus at least one ``focus`` defect (hypothesis'
    draws alone leave some defects out of a small derandomized run)."""
    kind = st.one_of(st.just("good"), st.just("good"), st.just("blank"), st.sampled_from(sorted(bad)))
    kinds = draw(st.lists(kind, max_size=8))
    at = draw(st.integers(0, len(kinds)))
    return kinds[:at] + (["good", "dup"] if focus == "dup" else [focus]) + kinds[at:]


@st.composite
def csv_case(draw, fmt: str, focus: str) -> Case:
    latin1 = fmt == "home-depot"
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    # Home Depot: latin-1 as on Kaggle, or UTF-8 when the file has a UTF-8 BOM (issue 14: a BOM decides)
    enc = "latin-1" if latin1 and not bom else "utf-8"
    bad_kinds = HD_BAD if latin1 else ESCI_BAD
    cols = HD_COLS if latin1 else ESCI_COLS
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = hostile_text(latin1)
    rows: list[Row] = []
    good_ids: list[str] = []
    for i, kind in enumerate(draw(kinds_strategy(bad_kinds, focus))):
        if kind == "dup" and not good_ids:
            kind = "wrong_width"
        if kind == "blank":
            rows.append(Row(eol.encode(), "blank"))
            continue
        rid = f"g{i}" if kind == "good" else (draw(st.sampled_from(good_ids)) if kind == "dup" else f"b{i}")
        q, t = draw(text), draw(text)
        if latin1:
            rel = draw(st.one_of(st.floats(1, 3).map(repr), st.sampled_from(["1", "2", "3", " 2.5 ", "1.67", "3.0"])))
            vals = {"id": rid, "product_uid": "100001", "product_title": t, "search_term": q, "relevance": rel}
        else:
            lab = draw(st.sampled_from(["E", "S", "C", "I", "Exact", "substitute", " Complement ", "irrelevant"]))
            vals = {"example_id": rid, "query": q, "query_id": f"q{i % 3}", "esci_label": lab, "product_title": t,
                    "product_brand": draw(st.one_of(st.just(""), text))}
        id_col, title_col = ("id", "product_title") if latin1 else ("example_id", "product_title")
        blanks = st.sampled_from(["", " ", "\t", "  \t "])
        if kind == "empty_id":
            vals[id_col] = draw(blanks)
        elif kind == "empty_title":
            vals[title_col] = draw(blanks)
        elif kind in ("blank_query", "empty_query"):
            vals["search_term" if latin1 else "query"] = draw(blanks)
        elif kind == "empty_qid":
            vals["query_id"] = draw(blanks)
        elif kind == "not_a_number":
            vals["relevance"] = draw(st.sampled_from(["high", "=1+2", "3,0", "", " ", "1..2", "two", "0x2", "nan",
                                                      "inf"]))
        elif kind == "out_of_range":
            vals["relevance"] = repr(draw(st.one_of(st.floats(max_value=0.999), st.floats(min_value=3.001))))
        elif kind == "bad_label":
            vals["esci_label"] = draw(st.sampled_from(["X", "Exactly", "=E", "4", "Partial", "", "E S"]))
        quote = draw(st.booleans())
        fields = [csv_field(vals[c], quote) for c in cols]
        if kind == "wrong_width":
            fields = fields[:-1] if draw(st.booleans()) else fields + ["extra"]
        # a syntax error drops the rest of its physical line and the reader resyncs at the next one, so
        # a quoted multi-line field *after* the error would read as another (rejected) row: these
        # defects go in the last column
        elif kind == "csv_syntax":
            fields[-1] = '"T"x'
        elif kind == "bare_cr":
            fields[-1] = "a\rb"
        elif kind == "huge_field":
            fields[-1] = "x" * 140_000  # over csv's 131072-character field limit
        line = ",".join(fields) + eol
        if kind == "bad_utf8":
            fields[cols.index(title_col)] = "MARK"
            data = (",".join(fields) + eol).encode(enc).replace(b"MARK", draw(st.sampled_from(BAD_UTF8)), 1)
        else:
            data = line.encode(enc)
        if kind == "good":
            good_ids.append(rid)
            rows.append(Row(data, "good", rid=rid, query=q.strip(), title=t.strip()))
        else:
            rows.append(Row(data, kind, field=bad_kinds[kind]))
    header = (",".join(cols) + eol).encode(enc)
    if enc == "latin-1":  # without a BOM, a file that decodes as UTF-8 is read as UTF-8 (resolve_encoding)
        body = header + b"".join(r.data for r in rows)
        try:
            body.decode("utf-8")
            assume(body.isascii())
        except UnicodeDecodeError:
            pass
    return Case(fmt, "data.csv", bom + header, rows, enc)


@st.composite
def jsonl_case(draw, focus: str) -> Case:
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = hostile_text()
    rows: list[Row] = []
    good_ids: list[str] = []
    for i, kind in enumerate(draw(kinds_strategy(JSONL_BAD, focus))):
        if kind == "dup" and not good_ids:
            kind = "not_object"
        if kind == "blank":
            rows.append(Row(draw(st.sampled_from(["", " ", "\t "])).encode() + eol.encode(), "blank"))
            continue
        if kind == "good":
            rid = draw(text) + f"#{i}"  # hostile, but unique: the index after the last '#'
        else:
            rid = draw(st.sampled_from(good_ids)) if kind == "dup" else f"b{i}"
        q, t = draw(text), draw(text)
        d: dict = {"id": rid, "query": q, "product": {"title": t}}
        if draw(st.booleans()):
            d["label"] = draw(st.sampled_from(["Exact", "E", "3", " partial ", "IRRELEVANT"]))
        if draw(st.booleans()):
            d["product"]["brand"] = draw(text)
        if kind == "no_title":
            d["product"] = draw(st.sampled_from([{}, {"title": ""}, {"title": "  "}, {"title": 5}, {"brand": "x"}]))
        elif kind == "unknown_field":
            d["colour"] = "red"
        elif kind == "bad_label":
            d["label"] = draw(st.sampled_from(["Exactish", "4", "", "Substitute", {"a": 1}, [1]]))
        elif kind == "bad_fact":
            d["facts"] = {"brand": draw(st.sampled_from(["yes", "same", "", "MATCH"]))}
        elif kind == "bad_score":
            d["score"] = draw(st.sampled_from([math.nan, math.inf, -math.inf, "3", True, [1]]))
        elif kind == "bool_id":
            d["id"] = draw(st.booleans())
        elif kind == "empty_query":
            d["query"] = draw(st.sampled_from(["", " ", "\t\n"]))
        elif kind == "bad_taxonomy":
            d["taxonomy"] = draw(st.sampled_from(["nope", 5, ["hd3"], {"x": 1}, None]))
        ascii_only = draw(st.booleans())
        raw = json.dumps(d, ensure_ascii=ascii_only)
        if kind == "truncated":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
            if not raw.strip():
                raw = "{"
        elif kind == "not_object":
            raw = draw(st.sampled_from(["[1, 2]", '"a string"', "null", "42", "true", "[]"]))
        elif kind == "deep":
            raw = "[" * 5000 + "]" * draw(st.sampled_from([0, 5000]))
        elif kind == "big_int":
            raw = '{"id": 1' + "0" * 5000 + ', "query": "q", "product": {"title": "t"}}'
        elif kind == "surrogate":
            raw = json.dumps({**d, "query": "QQ"}).replace('"QQ"', '"a\\udc80b"')
        elif kind == "raw_control":
            raw = raw[:-1] + ', "x": "a' + draw(st.sampled_from(["\x00", "\x01", "\x1f", "\t"])) + 'b"}'
        data = raw.encode("utf-8") + eol.encode()
        if kind == "bad_utf8":
            data = json.dumps({**d, "query": "MARK"}).encode().replace(b"MARK", draw(st.sampled_from(BAD_UTF8))) + b"\n"
        if kind == "good":
            good_ids.append(rid)
            rows.append(Row(data, "good", rid=rid, query=q, title=t))
        else:
            rows.append(Row(data, kind, field=JSONL_BAD[kind]))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return Case("jsonl", "data.jsonl", bom, rows, "utf-8")


def read_rejects(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines() would also cut at \x85, \u2028, \x1c... inside the raw text
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x]


def check_mixed(case: Case) -> None:
    """Fail mode stops at the first bad row, naming it; skip mode keeps all good rows and rejects the
    bad ones, each once, with its line, field and raw text; no stray files either way."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / case.name
        p.write_bytes(case.content())
        located = case.lines()
        good = [r for _, r in located if r.kind == "good"]
        bad = [(n, r) for n, r in located if r.kind not in ("good", "blank")]
        n_blank = sum(r.kind == "blank" for r in case.rows)
        if case.fmt == "jsonl" and case.prefix and not case.rows:
            n_blank = 1  # a file holding only a BOM has one (empty) line
        fmt = case.fmt if len(case.rows) % 2 else "auto"  # exercise detection too

        if bad:
            with pytest.raises(DataError) as ei:
                load_records(p, fmt)
            e, (line0, row0) = ei.value, bad[0]
            assert (e.path, e.line, e.field) == (str(p), line0, row0.field), row0.kind
            msg = str(e)
            assert msg.startswith(f"{p}:{line0}: ") and "\n" not in msg
            if row0.field:
                assert f"field {row0.field!r}" in msg
            assert os.listdir(d) == [p.name]  # no rejects file, no temporary file
        else:
            recs, rep = load_records(p, fmt)
            assert [r.id for r in recs] == [r.rid for r in good] and rep.n_rejected == 0

        recs, rep = load_records(p, fmt, on_error="skip")
        assert [r.id for r in recs] == [r.rid for r in good]
        assert [(r.query, r.product.title) for r in recs] == [(g.query, g.title) for g in good]
        assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_blank) == (
            len(good) + len(bad), len(good), len(bad), n_blank)
        assert rep.n_read == rep.n_ok + rep.n_rejected
        rejects = p.with_name(p.name + ".rejects.jsonl")
        if bad:
            assert rep.rejects_path == rejects
            rej = read_rejects(rejects)
            assert [(x["line"], x["field"]) for x in rej] == [(n, r.field) for n, r in bad]
            assert [x["raw"] for x in rej] == [
                r.data.decode(case.encoding, "backslashreplace").rstrip("\r\n") for _, r in bad]
            assert {x["path"] for x in rej} == {str(p)}
            assert sorted(os.listdir(d)) == sorted([p.name, rejects.name])
        else:
            assert rep.rejects_path is None and os.listdir(d) == [p.name]


@pytest.mark.parametrize("focus", sorted(HD_BAD))
def test_home_depot_mixed_good_and_bad_rows(focus):
    cfg(8)(given(csv_case("home-depot", focus))(check_mixed))()


@pytest.mark.parametrize("focus", sorted(ESCI_BAD))
def test_esci_csv_mixed_good_and_bad_rows(focus):
    cfg(8)(given(csv_case("esci", focus))(check_mixed))()


@pytest.mark.parametrize("focus", sorted(JSONL_BAD))
def test_jsonl_mixed_good_and_bad_rows(focus):
    cfg(6)(given(jsonl_case(focus))(check_mixed))()


def test_huge_jsonl_fields_load_and_round_trip(tmp_path):
    big = "\u00e9=cmd," * 200_000  # 1.4 M characters, one line
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"id": "1", "query": big, "product": {"title": big, "attributes": {"k": big}}}) + "\n",
                 encoding="utf-8")
    recs, _ = load_records(p)
    assert recs[0].query == big and recs[0].product.attributes == {"k": big}
    out = save_jsonl(recs, tmp_path / "copy.jsonl")
    assert load_records(out)[0][0].to_dict() == recs[0].to_dict()


# ----------------------------------------------------------------------------------------------
# arbitrary bytes: loads or DataError, and both modes agree

TOKENS = [b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\x00", b"\xff", b"\xc3", b"\xe2\x80\xa8", b"{", b"}",
          b"[", b"]", b":", b'"id"', b"=cmd|' /C calc'!A0", b"E", b"Exact", b"2.5", b"nan", b"\t", b" ",
          b"\\u0000", b"\\ud800", b"1e999", b"x", b"7"]
soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6)), max_size=40).map(b"".join)
HEADERS = {"home-depot": ",".join(HD_COLS).encode() + b"\n", "esci": ",".join(ESCI_COLS).encode() + b"\n",
           "jsonl": b'{"id": "0", "query": "q", "product": {"title": "t"}}\n'}


def load_or_data_error(p: Path, fmt: str, on_error: str):
    """The load result, or the DataError; any other exception fails the test."""
    try:
        return load_records(p, fmt, on_error=on_error)
    except DataError as e:
        return e


@cfg(120)
@given(fmt=st.sampled_from(["home-depot", "esci", "jsonl", "auto"]), with_header=st.booleans(), body=soup,
       suffix=st.sampled_from([".csv", ".jsonl", ".txt", ""]))
@example(fmt="auto", with_header=False, body=b"", suffix=".csv")
@example(fmt="home-depot", with_header=False, body=b"\xef\xbb\xbf", suffix=".csv")
@example(fmt="esci", with_header=True, body=b'1,"unterminated', suffix=".csv")
@example(fmt="jsonl", with_header=False, body=b"[" * 20000, suffix=".jsonl")
def test_any_bytes_load_or_raise_data_error(fmt, with_header, body, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("input" + suffix)
        head = HEADERS.get(fmt, HEADERS["home-depot"]) if with_header else b""
        p.write_bytes(head + body)
        n_lines = (head + body).count(b"\n") + 1
        strict = load_or_data_error(p, fmt, "fail")
        lenient = load_or_data_error(p, fmt, "skip")
        for res in (strict, lenient):
            if isinstance(res, DataError):
                assert res.path == str(p) and str(res).startswith(str(p)) and "\n" not in str(res)
                assert res.line is None or 1 <= res.line <= n_lines
        if isinstance(lenient, DataError):  # a file-level problem: fail mode must report the same one
            assert isinstance(strict, DataError) and str(strict) == str(lenient)
            assert os.listdir(d) == [p.name]
            return
        recs, rep = lenient
        assert rep.n_read == rep.n_ok + rep.n_rejected and len(recs) == rep.n_ok == len({r.id for r in recs})
        assert len(rep.errors) == rep.n_rejected and all(1 <= e.line <= n_lines for e in rep.errors)
        if isinstance(strict, DataError):  # fail mode stopped at the first row that skip mode rejected
            assert rep.errors and (strict.line, strict.field) == (rep.errors[0].line, rep.errors[0].field)
        else:
            assert rep.n_rejected == 0 and [r.to_dict() for r in strict[0]] == [r.to_dict() for r in recs]
        for r in recs:  # whatever loaded can be written back out (no lone surrogates, no crash)
            r.to_json().encode("utf-8")


@cfg(60)
@given(body=soup, suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt", ""]))
def test_detect_format_returns_a_format_or_data_error(body, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("x" + suffix)
        p.write_bytes(body)
        try:
            assert detect_format(p) in ("home-depot", "esci", "wands", "jsonl")
        except DataError as e:
            assert e.path == str(p)


# wrong column sets: missing or duplicated columns are file-level errors on line 1

REQUIRED = {"home-depot": ["id", "product_title", "search_term", "relevance"],
            "esci": ["example_id", "query", "esci_label", "product_title"]}
OPTIONAL = {"home-depot": ["product_uid"], "esci": ["query_id", "product_brand", "product_color", "product_locale"]}
JUNK = ["foo", "", "ID", " relevance", "query ", "label", "esci label"]
CELL = {"id": "1", "example_id": "1", "relevance": "2", "esci_label": "E", "query_id": "q1"}


@cfg(60)
@given(data=st.data(), fmt=st.sampled_from(["home-depot", "esci"]))
def test_wrong_column_sets(data, fmt):
    names = data.draw(st.lists(st.sampled_from(REQUIRED[fmt] + OPTIONAL[fmt] + JUNK), max_size=9))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.csv"
        row = [CELL.get(n.strip(), "x") for n in names]
        header = ",".join(csv_field(n, force_quote=n == "") for n in names)  # '""': an empty name, not a blank line
        p.write_text(header + "\n" + ",".join(row) + "\n", encoding="utf-8")
        cleaned = [n.strip() for n in names]
        missing = [c for c in REQUIRED[fmt] if c not in cleaned]
        if not names:
            with pytest.raises(DataError, match="empty file"):
                load_records(p, fmt, on_error="skip")
        elif len(set(cleaned)) != len(cleaned) or missing:
            with pytest.raises(DataError) as ei:
                load_records(p, fmt, on_error="skip")  # never skippable
            e = ei.value
            assert (e.path, e.line) == (str(p), 1)
            if len(set(cleaned)) != len(cleaned):
                assert "duplicate column" in str(e)
            else:
                assert e.field == missing[0] and f"field {missing[0]!r}: missing column" in str(e)
        else:
            recs, rep = load_records(p, fmt)
            assert len(recs) == 1 and recs[0].id == "1" and rep.n_ok == 1
        assert os.listdir(d) == ["t.csv"]


def test_paths_that_are_not_files(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    for fmt in ("auto", "jsonl", "home-depot", "esci"):
        for path in (tmp_path / "missing.csv", tmp_path / "dir.jsonl"):
            with pytest.raises(DataError) as ei:
                load_records(path, fmt)
            assert ei.value.path == str(path)


# ----------------------------------------------------------------------------------------------
# the trace parser

SCHEMAS = {t: default_schema(t) for t in ("hd3", "esci4")}
TRACE_FRAGMENTS = [
    "Query", "Product", "Type", "type relation", "Attributes", "Verdict", "Label", "Relevance", "Final verdict",
    "Step 3", "1.", "(2)", "- ", "* ", "# ", "**", "__", "`", ":", "：", " ", "\t", "same", "related",
    "accessory", "different", "brand=match", "size=mismatch", "colour: unknown", ";", ",", "none", "Exact", "E",
    "3", "Partial", "Irrelevant", "Substitute", "Complement", "I think", "exactly", "\n", "\r\n", "\r", "\x85",
    "\u2028", "\x00", "\x1c", "\ufeff",
]
trace_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(TRACE_FRAGMENTS), st.text(max_size=6)), max_size=60).map("".join),
)


def check_trace_invariants(text: str, taxonomy: str) -> None:
    schema = SCHEMAS[taxonomy]
    labels = get_taxonomy(taxonomy).labels
    out = parse_trace(text, schema)
    spans = sorted([s.span for s in out.steps] + out.extra_lines)
    for a, b in spans:
        assert 0 <= a < b <= len(text)
    for (_, b), (c, _) in zip(spans, spans[1:]):
        assert b <= c  # one line, one span: no overlaps
    for s in out.steps:
        assert text[s.span[0]:s.span[1]] == s.text == s.text.strip()
        assert not re.search(r"[\r\n]", s.text) and s.value == s.value.strip() and s.value in s.text
        assert s.valid == (s.conclusion is not None)
    for a, b in out.extra_lines:
        assert text[a:b].strip() == text[a:b]
    assert out.format_ok == (not out.errors)
    assert len(out.errors) <= MAX_ERRORS + 1
    verdicts = [s for s in out.steps if s.kind == "label" and s.valid]
    if verdicts:  # the label is the first readable verdict, and its span is inside that line
        assert out.label == verdicts[0].conclusion in labels
        a, b = out.label_span
        assert verdicts[0].span[0] <= a < b <= verdicts[0].span[1]
        words = re.findall(r"[^\W_]+(?:['’][^\W_]+)*", text[a:b])  # the label words, whatever separates them
        assert text[a:b] == text[a:b].strip() and get_taxonomy(taxonomy).normalize(" ".join(words)) == out.label
    else:
        assert out.label is None and out.label_span is None and not out.format_ok
    if out.format_ok:
        assert [s.name for s in out.steps] == [s.name for s in schema.steps]
    cl = consistent_label(out, taxonomy)
    assert cl is None or cl in labels


@cfg(250)
@given(text=trace_text, taxonomy=st.sampled_from(sorted(SCHEMAS)))
@example(text="Verdict: Exact\nVerdict: Irrelevant", taxonomy="hd3")
@example(text="**Verdict:** E", taxonomy="esci4")
@example(text="Type: same\r\nAttributes: brand=match\rVerdict: I think", taxonomy="hd3")
def test_parse_trace_never_raises_and_spans_match(text, taxonomy):
    check_trace_invariants(text, taxonomy)


@pytest.mark.parametrize("bad", [None, b"Verdict: Exact", 3, ["Verdict: Exact"], {"Verdict": "Exact"}])
def test_parse_trace_non_string_is_a_result(bad):
    out = parse_trace(bad, SCHEMAS["hd3"])
    assert not out.format_ok and out.label is None and out.steps == [] and "not a string" in out.errors[0]


chatter = st.text(st.characters(codec="utf-8", exclude_characters=":：\r\n"), max_size=30)


@cfg(150)
@given(data=st.data(), taxonomy=st.sampled_from(sorted(SCHEMAS)), eol=st.sampled_from(["\n", "\r\n", "\r"]))
def test_rendered_trace_with_chatter_parses_back(data, taxonomy, eol):
    """Render random conclusions, put chatter lines (no colon) around the steps: the parser must give
    back every conclusion, the label, and the guideline label of the trace's own type + attributes."""
    schema = SCHEMAS[taxonomy]
    free = hostile_text().map(lambda s: s + " item")  # a free-text step needs a word to be valid
    conc = {
        "query": data.draw(free), "product": data.draw(free),
        "type": data.draw(st.sampled_from(TYPE_RELATIONS)),
        "attributes": data.draw(st.dictionaries(st.sampled_from(ATTRIBUTES), st.sampled_from(MATCH_VALUES),
                                                max_size=5)),
        "verdict": data.draw(st.sampled_from(TAXONOMIES[taxonomy].labels)),
    }
    step_lines = render_trace(conc, schema).split("\n")
    lines: list[str] = []
    n_extra = 0
    for sl in step_lines + [None]:
        for c in data.draw(st.lists(chatter, max_size=2)):
            lines.append(c)
            n_extra += bool(c.strip())
        if sl is not None:
            lines.append(sl)
    text = eol.join(lines)
    out = parse_trace(text, schema)
    assert out.format_ok, out.errors
    assert len(out.extra_lines) == n_extra
    got = out.conclusions()
    for k in ("query", "product"):  # the parser drops up to 3 emphasis marks after the colon (documented)
        assert got[k] == re.sub(r"^[*_`]{0,3}", "", one_line(conc[k])).strip()
    assert (got["type"], got["attributes"], got["verdict"]) == (conc["type"], conc["attributes"], conc["verdict"])
    assert out.label == conc["verdict"]
    assert consistent_label(out, taxonomy) == guideline_label(conc["type"], conc["attributes"], taxonomy)
    check_trace_invariants(text, taxonomy)


# ----------------------------------------------------------------------------------------------
# CLI


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("she: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


GOOD_JSONL = "".join(
    json.dumps({"id": str(i), "query": f"q{i % 4}", "product": {"title": "t"}, "label": "Exact"}) + "\n"
    for i in range(8))


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD_JSONL, encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_JSONL + '{"id": "x", "query": "q", "product": {"title": ""}}\n', encoding="utf-8")
    return good, bad


def test_cli_data_commands_on_bad_paths_and_files(tmp_path, files):
    good, bad = files
    (tmp_path / "plain_dir").mkdir()
    out = tmp_path / "out"
    assert_user_error(*run_cli(["data", "validate", tmp_path / "missing.csv"])[::2], "missing.csv", "no such file")
    assert_user_error(*run_cli(["data", "validate", tmp_path / "plain_dir"])[::2], "plain_dir")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert_user_error(*run_cli(["data", "stats", empty])[::2], "empty.csv")
    code, _, err = run_cli(["data", "split", bad, "--out", out])
    assert_user_error(code, err, f"{bad}:9: field 'product.title'")
    assert not out.exists()  # nothing written: the load failed before any split file
    code, _, err = run_cli(["data", "split", good, "--out", good])  # --out is a file
    assert_user_error(code, err, str(good))
    assert good.read_text(encoding="utf-8") == GOOD_JSONL
    assert_user_error(*run_cli(["data", "split", good, "--out", out, "--fractions", "a,b,c"])[::2])
    assert_user_error(*run_cli(["data", "split", good, "--out", out, "--fractions", "0.5,0.5,0.5"])[::2], "sum to 1")
    assert not out.exists()
    code, stdout, err = run_cli(["data", "split", good, "--out", out])
    assert code == 0 and err == "" and sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl", "validation.jsonl"]


BAD_CONFIGS = {
    "unknown_key.yaml": ("epocs: 2\n", "unknown key(s) ['epocs']"),
    "wrong_type.yaml": ("epochs: two\n", "epochs: expected a number"),
    "wrong_nested.yaml": ("data:\n  cuts: [1, x]\n", "data.cuts[1]: expected a number"),
    "null_section.yaml": ("data: null\n", "data: expected a mapping"),
    "section_scalar.yaml": ("data: 5\n", "data: expected a mapping"),
    "not_a_mapping.yaml": ("- a\n- b\n", "top level must be a mapping"),
    "invalid.yaml": ("a: [1, 2\nb: {\n", "invalid YAML at line"),
    "tabs.yaml": ("data:\n\tpath: x\n", "invalid YAML"),
    "nan.yaml": ("learning_rate: .nan\n", "expected a finite number"),
    "huge.yaml": ("learning_rate: " + "9" * 400 + "\n", "expected a finite number"),
    "int_keys.yaml": ("1: a\nfoo: b\n", "unknown key(s) [1, 'foo']"),
    "bool_as_int.yaml": ("max_steps: true\n", "max_steps: expected an integer"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_cli_bad_yaml_configs(tmp_path, name):
    body, needle = BAD_CONFIGS[name]
    c = tmp_path / name
    c.write_text(body, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "sft", "--config", c, "--data", tmp_path / "missing.jsonl", "--output-dir", out])
    assert_user_error(code, err, str(c), needle)
    assert not out.exists()


def test_cli_unreadable_configs(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    a_dir = tmp_path / "cfg_dir.yaml"
    a_dir.mkdir()
    for c in (latin, a_dir, tmp_path / "missing.yaml"):
        code, _, err = run_cli(["train", "sft", "--config", c, "--data", tmp_path / "missing.jsonl"])
        assert_user_error(code, err, str(c))


yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
yaml_key = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(SFTJobConfig)]
                                     + [f.name for f in dataclasses.fields(DataConfig)] + ["epocs", "sft"]),
                     st.integers(-3, 3), st.booleans(), st.text(max_size=4))
yaml_value = st.recursive(yaml_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(yaml_key, c, max_size=3),
                          max_leaves=6)
config_docs = st.one_of(
    st.dictionaries(yaml_key, yaml_value, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True,
                                                                                   sort_keys=False)),
    st.lists(st.sampled_from(list("ab: -[]{},\n\t'\"&*!%@`|>#") + ["data:", "  path:", "null", ".nan"]),
             max_size=40).map("".join),
)


@cfg(40)
@given(doc=config_docs)
@example(doc="data:\n")
def test_cli_any_config_with_missing_data_is_a_user_error(doc):
    """Whatever the config says, `train sft --data <missing>` must stop with exit 2 and one line before
    any training starts: a bad config names the config file, a good one fails on the missing data."""
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "c.yaml"
        c.write_text(doc, encoding="utf-8")
        code, _, err = run_cli(["train", "sft", "--config", c, "--data", Path(d) / "missing.jsonl",
                                "--output-dir", Path(d) / "run"])
        assert_user_error(code, err)
        assert str(c) in err or "missing.jsonl" in err
        assert sorted(os.listdir(d)) == ["c.yaml"]


@cfg(40)
@given(body=soup, fmt=st.sampled_from(["auto", "jsonl", "home-depot", "esci"]))
def test_cli_split_on_malformed_data_leaves_no_output(body, fmt):
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "in.csv"
        data.write_bytes(HEADERS.get(fmt, HEADERS["home-depot"]) + body)
        out = Path(d) / "splits"
        code, _, err = run_cli(["data", "split", data, "--out", out, "--format", fmt])
        if code == 0:
            assert sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
        else:
            assert_user_error(code, err, str(data))
            assert not out.exists() and sorted(os.listdir(d)) == ["in.csv"]


FACT_LINES = [b'{"id": "1", "facts": {"brand": "match"}}', b'{"id": 2, "facts": {}}', b'{"facts": {}}',
              b'{"id": "x", "facts": {"brand": "yes"}}', b'{"id": "\\ud800", "facts": {}}', b"[" * 3000,
              b'{"id": 1' + b"0" * 5000 + b', "facts": {}}']


@cfg(40)
@given(lines=st.lists(st.one_of(st.sampled_from(FACT_LINES), soup), max_size=6),
       on_error=st.sampled_from(["fail", "skip"]))
def test_cli_facts_build_on_malformed_data(lines, on_error):
    """`she data facts build`: exit 0; exit 1 when skip mode rejected rows (the store holds the good ones, the
    rejects file the others: issue 14's exit codes); or exit 2 with one line naming the input, and then no store."""
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "facts.jsonl", Path(d) / "facts.sqlite"
        src.write_bytes(b"\n".join(lines) + b"\n")
        code, _, err = run_cli(["data", "facts", "build", src, "--out", out, "--on-error", on_error,
                                "--rejects", Path(d) / "rej.jsonl"])
        if code == 0:
            assert out.exists() and not (Path(d) / "rej.jsonl").exists()
        elif code == 1:
            assert on_error == "skip" and out.exists() and (Path(d) / "rej.jsonl").read_text().strip()
        else:
            assert_user_error(code, err, str(src))
            assert not out.exists() and not any(n.endswith(".tmp") for n in os.listdir(d))


def test_cli_predict_bad_input_leaves_no_output(tmp_path, files):
    good, bad = files
    preds = tmp_path / "preds" / "p.jsonl"
    code, _, err = run_cli(["predict", "--model", tmp_path / "no_model", "--data", bad, "--out", preds])
    assert_user_error(code, err, f"{bad}:9")  # the data is checked before any model is loaded
    code, _, err = run_cli(["predict", "--model", tmp_path / "no_model", "--data", good, "--out", preds])
    assert_user_error(code, err, "no_model")
    code, _, err = run_cli(["predict", "--model", tmp_path / "no_model", "--data", tmp_path / "nope.jsonl",
                            "--out", preds])
    assert_user_error(code, err, "nope.jsonl")
    assert not preds.parent.exists() or os.listdir(preds.parent) == []


def test_predict_failing_midway_removes_its_temporary_file(tmp_path, monkeypatch, files):
    """A generation error after some lines were written must leave neither the output nor its .tmp."""
    from she.data.loaders import load_records as load
    from she.evaluation import evaluate as ev
    from she.models import registry

    def boom(model, tok, records, **kw):
        yield from ()
        raise RuntimeError("generation failed")

    def one_then_boom(model, tok, records, **kw):
        from she.evaluation.generate import Judgement

        fields = {f.name: None for f in dataclasses.fields(Judgement)}
        yield Judgement(**{**fields, "record_id": records[0].id, "label": "Exact", "probs": {}, "format_ok": True,
                           "text": "Verdict: Exact"})
        raise RuntimeError("generation failed")

    monkeypatch.setattr(registry, "load_model_and_tokenizer", lambda *a, **k: (None, None))
    monkeypatch.setattr(ev, "prompt_style_of", lambda *a, **k: "full")
    monkeypatch.setattr(ev, "label_offsets_of", lambda *a, **k: None)  # no model folder to read she.json from
    recs, _ = load(files[0])
    out = tmp_path / "p.jsonl"
    for gen in (boom, one_then_boom):
        monkeypatch.setattr(ev, "generate_judgements", gen)
        with pytest.raises(RuntimeError, match="generation failed"):
            ev.predict("m", recs, out, progress=False)
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl"]


def test_cli_subprocess_one_line_error_no_traceback(tmp_path, files):
    _good, bad = files
    env = {k: v for k, v in os.environ.items() if k != "SHE_DEBUG"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "she.cli", "data", "validate", str(bad)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"she: error: {bad}:9: field 'product.title': product.title must be a non-empty string\n"
    assert r.stdout == ""


# ----------------------------------------------------------------------------------------------
# config loader

CONFIG_CLASSES = [c for c in vars(she_config).values()
                  if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == she_config.__name__]


@cfg(150)
@given(cls=st.sampled_from(CONFIG_CLASSES), d=st.dictionaries(yaml_key, yaml_value, max_size=6))
@example(cls=SFTJobConfig, d={1: 2, "x": 3})
@example(cls=SFTJobConfig, d={"learning_rate": 10**400})
@example(cls=DataConfig, d={"cuts": [1, [2]]})
def test_from_dict_builds_or_raises_config_error(cls, d):
    try:
        obj = from_dict(cls, d)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(obj, cls)
    for k in d:  # every key given is a field, and a scalar given for a scalar field is kept
        assert isinstance(k, str) and hasattr(obj, k)


@cfg(60)
@given(cls=st.sampled_from(CONFIG_CLASSES), doc=config_docs,
       overrides=st.dictionaries(st.sampled_from(["data.path", "data.format", "model", "data.cuts", "sft.epochs"]),
                                 yaml_scalar, max_size=2))
def test_load_config_from_any_yaml_builds_or_raises_config_error(cls, doc, overrides):
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "c.yaml"
        c.write_text(doc, encoding="utf-8")
        try:
            obj = load_config(cls, c, overrides)
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith(str(c))
        else:
            assert isinstance(obj, cls)


def _scalar_strategies(tp) -> tuple[st.SearchStrategy, st.SearchStrategy] | None:
    """(valid values, wrong-typed values) for a scalar field type, or None for other types."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _scalar_strategies(next(a for a in args if a is not type(None)))
        return None if inner is None else (st.one_of(st.none(), inner[0]), inner[1])
    table = {
        bool: (st.booleans(), st.one_of(st.integers(0, 1), st.sampled_from(["yes", "true"]))),
        int: (st.integers(-10**6, 10**6), st.one_of(st.booleans(), st.floats(0.5, 9.5), st.text(max_size=3))),
        float: (st.one_of(st.floats(-1e6, 1e6), st.integers(-100, 100)),
                st.one_of(st.booleans(), st.text(max_size=3), st.sampled_from([math.nan, math.inf]))),
        str: (st.text(max_size=8), st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2))),
    }
    return table.get(tp)


SFT_SCALARS = {k: s for k, tp in typing.get_type_hints(SFTJobConfig).items() if (s := _scalar_strategies(tp))}


@cfg(100)
@given(data=st.data())
def test_from_dict_keeps_valid_values_and_names_the_first_wrong_key(data):
    keys = data.draw(st.lists(st.sampled_from(sorted(SFT_SCALARS)), unique=True, max_size=6))
    d, first_wrong = {}, None
    for k in keys:
        wrong = data.draw(st.booleans())
        d[k] = data.draw(SFT_SCALARS[k][1] if wrong else SFT_SCALARS[k][0])
        if wrong and first_wrong is None:
            first_wrong = k
    if first_wrong is None:
        obj = from_dict(SFTJobConfig, d)
        hints = typing.get_type_hints(SFTJobConfig)
        for k, v in d.items():
            assert getattr(obj, k) == v
            assert type(getattr(obj, k)) is (float if hints[k] is float else type(v))  # ints become floats
    else:
        with pytest.raises(ConfigError) as ei:
            from_dict(SFTJobConfig, d)
        assert str(ei.value).startswith(f"config.{first_wrong}: expected ")
