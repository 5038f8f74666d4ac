"""Loaders, validation policy and data commands. Fixtures are tiny synthetic files written to
tmp_path; the tests at the end read the real files in the shared data folder and skip without it."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from she.data import commands
from she.data.loaders import (
    ESCI_LABEL_FACTS,
    detect_format,
    load_esci,
    load_home_depot,
    load_jsonl,
    load_records,
    load_wands,
    load_wands_queries,
    save_jsonl,
)
from she.data.schema import Product, Record, StepFacts
from she.data.validation import DataError, LoadReport, RowError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHE_SHARED_DATA", REPO.parent / "shared" / "data"))


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------
# Home Depot

# the official column names, joined here so no Kaggle-looking row block sits in the repo; rows below are made up
HD_COLUMNS = ",".join(["id", "product_uid", "product_title", "search_term", "relevance"])
HD_HEADER = HD_COLUMNS + "\r\n"


def test_home_depot_latin1_labels_and_fields(tmp_path):
    # \xb0 is the degree sign in latin-1; as UTF-8 these bytes would not even decode.
    body = (HD_HEADER
            + "2,100001,Acme Bracket 90\xb0,Bent  Bracket,3\r\n"
            + "3,100001,Acme Bracket 90\xb0,bent bracket,2.5\r\n"
            + "9,100002,Porch Paint,porch coat,2.33\r\n"
            + "16,100005,Tub Spout,bath spout set,1.75\r\n"
            + "17,100006,Drill,cordless drill,1.67\r\n"
            + "18,100007,Rug,rug,1\r\n")
    p = write(tmp_path / "train.csv", body, "latin-1")
    recs, rep = load_home_depot(p)
    assert [r.label for r in recs] == ["Exact", "Exact", "Partial", "Partial", "Irrelevant", "Irrelevant"]
    assert [r.score for r in recs] == [3.0, 2.5, 2.33, 1.75, 1.67, 1.0]
    r0 = recs[0]
    assert r0.id == "2" and r0.product.title == "Acme Bracket 90\u00b0"
    assert r0.query == "Bent  Bracket" and r0.query_id == "bent bracket"
    assert r0.product.attributes == {"product_uid": "100001"}
    assert r0.taxonomy == "hd3" and r0.source == "home-depot" and r0.facts.is_empty()
    assert recs[0].group == recs[1].group  # same query typed differently: one split group
    assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_blank) == (6, 6, 0, 0)
    assert rep.rejects_path is None


def test_home_depot_custom_cuts_and_taxonomy(tmp_path):
    p = write(tmp_path / "train.csv", HD_HEADER + "1,5,A,q,1.75\n2,5,B,q,2.33\n3,5,C,q,1.4\n", "latin-1")
    recs, _ = load_home_depot(p, cuts=(1.5, 2.0))
    assert [r.label for r in recs] == ["Partial", "Exact", "Irrelevant"]
    recs, _ = load_records(p, taxonomy="esci4")  # hd3 Partial -> esci4 Substitute
    assert [(r.label, r.taxonomy) for r in recs] == [("Substitute", "esci4"), ("Substitute", "esci4"),
                                                     ("Irrelevant", "esci4")]
    with pytest.raises(ValueError, match="cuts"):
        load_home_depot(p, cuts=(2.5, 1.75))


def test_home_depot_fail_mode_names_file_line_field(tmp_path):
    p = write(tmp_path / "train.csv", HD_HEADER + "1,5,A,q,3\n2,5,B,q,3\n3,5,C,q,abc\n4,5,D,q,9\n", "latin-1")
    with pytest.raises(DataError) as ei:
        load_home_depot(p)
    e = ei.value
    assert (e.line, e.field) == (4, "relevance")
    assert str(e) == f"{p}:4: field 'relevance': not a number: 'abc'"
    assert not (tmp_path / "train.csv.rejects.jsonl").exists()


def test_home_depot_skip_mode_rejects_file(tmp_path):
    lines = [
        HD_COLUMNS,                                             # 1
        "1,5,Good one,q1,3",                                    # 2 ok
        "2,5,,q1,3",                                            # 3 empty title
        "3,5,T,q2,high",                                        # 4 non-numeric
        "4,5,T,q2,3.5",                                         # 5 out of range
        "",                                                     # 6 blank
        "5,5,T,q3",                                             # 7 4 columns
        "1,5,T,q3,2",                                           # 8 duplicate id
        '6,5,"Two-line',                                        # 9 ok, quoted field over 2 lines
        'title",q4,2.67',                                       # 10
        "7,5,T, ,1",                                            # 11 blank query
        "8,5,T,q5,nan",                                         # 12 not finite
        '9,5,"bad',                                             # 13 bad row over 2 lines:
        'row",q6,zzz',                                          # 14 reported at its first line
    ]
    p = write(tmp_path / "train.csv", "\n".join(lines) + "\n", "latin-1")
    recs, rep = load_home_depot(p, on_error="skip")
    assert [r.id for r in recs] == ["1", "6"]
    assert recs[1].product.title == "Two-line\ntitle"
    assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_blank) == (10, 2, 8, 1)
    assert rep.rejects_path == tmp_path / "train.csv.rejects.jsonl"
    rej = read_rejects(rep.rejects_path)
    assert [(r["line"], r["field"]) for r in rej] == [
        (3, "product_title"), (4, "relevance"), (5, "relevance"), (7, None), (8, "id"), (11, "search_term"),
        (12, "relevance"), (13, "relevance")]
    assert [r["raw"] for r in rej] == [lines[i - 1] for i in (3, 4, 5, 7, 8, 11, 12)] + ['9,5,"bad\nrow",q6,zzz']
    assert rej[2]["reason"] == "rating 3.5 outside the 1..3 scale"
    assert rej[3]["reason"] == "expected 5 columns, found 4"
    assert rej[4]["reason"] == "duplicate id '1' (first at line 2)"
    assert all(r["path"] == str(p) for r in rej)
    assert [e.line for e in rep.errors] == [3, 4, 5, 7, 8, 11, 12, 13]


def test_rejects_explicit_path_and_stale_file_cleared(tmp_path):
    bad = write(tmp_path / "a.csv", HD_HEADER + "1,5,T,q,x\n", "latin-1")
    out = tmp_path / "out" / "rej.jsonl"
    _, rep = load_home_depot(bad, on_error="skip", rejects_path=out)
    assert rep.rejects_path == out and len(read_rejects(out)) == 1
    good = write(tmp_path / "a.csv", HD_HEADER + "1,5,T,q,2\n", "latin-1")
    _, rep = load_home_depot(good, on_error="skip", rejects_path=out)
    assert out.read_text() == "" and rep.rejects_path == out  # an old rejects file must not survive
    _, rep = load_home_depot(good, on_error="skip")
    assert rep.rejects_path is None and not (tmp_path / "a.csv.rejects.jsonl").exists()


def test_home_depot_missing_column_and_bom(tmp_path):
    p = write(tmp_path / "t.csv", "id,product_uid,product_title,search_term\n1,2,T,q\n", "latin-1")
    with pytest.raises(DataError, match="missing column") as ei:
        load_home_depot(p, on_error="skip")  # a broken header is never skippable
    assert (ei.value.line, ei.value.field) == (1, "relevance")
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbf" + HD_HEADER.encode() + b"1,2,T,q,3\n")
    recs, _ = load_records(p)
    assert [r.label for r in recs] == ["Exact"]


def test_csv_syntax_error_is_a_row_error_and_reading_goes_on(tmp_path):
    p = write(tmp_path / "t.csv", HD_HEADER + '1,2,"T"x,q,3\n2,2,T,q,3\n', "latin-1")
    recs, rep = load_home_depot(p, on_error="skip")
    assert [r.id for r in recs] == ["2"]
    assert rep.errors[0].line == 2 and rep.errors[0].reason.startswith("CSV syntax error")


def test_limit_counts_accepted_records(tmp_path):
    p = write(tmp_path / "t.csv", HD_HEADER + "1,2,T,q,x\n2,2,T,q,3\n3,2,T,q,3\n4,2,T,q,3\n", "latin-1")
    recs, rep = load_home_depot(p, on_error="skip", limit=2)
    assert [r.id for r in recs] == ["2", "3"] and (rep.n_read, rep.n_ok, rep.n_rejected) == (3, 2, 1)


# ----------------------------------------------------------------------------------------------
# ESCI

ESCI_COLS = ["example_id", "query", "query_id", "product_id", "product_locale", "esci_label", "product_title",
             "product_description", "product_bullet_point", "product_brand", "product_color"]


def esci_csv(tmp_path: Path, rows: list[str], name: str = "esci.csv") -> Path:
    return write(tmp_path / name, ",".join(ESCI_COLS) + "\n" + "".join(r + "\n" for r in rows))


def test_esci_csv_labels_facts_and_products(tmp_path):
    p = esci_csv(tmp_path, [
        "10,red shoes,1,B1,us,E,Red Shoe,nice,b1,Acme,Red",
        "11,red shoes,1,B2,us,S,Blue Shoe,,,Acme,Blue",
        "12,shoes without laces,2,B3,us,Complement,Shoe Laces,,,,",
        "13,shoes without laces,2,B4,us,I,Garden Hose,,,Hosy,Green",
    ])
    write(tmp_path / "shopping_queries_dataset_sources.csv", "query_id,source\n1,other\n2,negations\n")
    recs, rep = load_esci(p)
    assert [r.label for r in recs] == ["Exact", "Substitute", "Complement", "Irrelevant"]
    assert all(r.taxonomy == "esci4" and r.source == "esci" for r in recs)
    assert [r.facts.type_relation for r in recs] == ["same", "related", "accessory", "different"]
    assert [r.facts.specs_met for r in recs] == ["yes", "no", "no", "no"]
    assert [r.facts.negation for r in recs] == [None, None, "yes", "yes"]
    assert [r.query_meta.get("query_type") for r in recs] == ["other", "other", "negations", "negations"]
    assert all(r.facts.brand is None and r.facts.color is None for r in recs)  # brand match is not known
    r0 = recs[0]
    assert (r0.id, r0.query_id, r0.group) == ("10", "1", "1")
    assert r0.product == Product(title="Red Shoe", brand="Acme", color="Red", description="nice",
                                 attributes={"product_id": "B1", "product_locale": "us", "bullet_points": "b1"})
    assert recs[2].product.brand is None and recs[2].product.description is None
    assert r0.query_meta == {"locale": "us", "query_type": "other"}
    assert rep.n_ok == 4
    # the facts are per-record copies, not the shared template
    assert recs[0].facts is not ESCI_LABEL_FACTS["Exact"]
    recs, _ = load_esci(p, sources=None)
    assert all(r.facts.negation is None and "query_type" not in r.query_meta for r in recs)


def test_esci_to_hd3_taxonomy(tmp_path):
    p = esci_csv(tmp_path, ["1,q,1,B,us,E,T,,,,", "2,q,1,B,us,S,T,,,,", "3,q,1,B,us,C,T,,,,", "4,q,1,B,us,I,T,,,,"])
    recs, _ = load_records(p, taxonomy="hd3")
    assert [r.label for r in recs] == ["Exact", "Partial", "Irrelevant", "Irrelevant"]
    assert all(r.taxonomy == "hd3" for r in recs)
    assert recs[2].facts.type_relation == "accessory"  # facts describe the pair, not the scale
    with pytest.raises(ValueError, match="unknown taxonomy"):
        load_records(p, taxonomy="nope")


def test_esci_bad_rows_with_multiline_field(tmp_path):
    p = esci_csv(tmp_path, [
        '1,q,1,B,us,E,T,"line one',      # 2-3: multi-line description
        'line two",,,',
        "2,q,1,B,us,X,T,,,,",            # 4: bad label
        "3,,1,B,us,E,T,,,,",             # 5: empty query
        "4,q,,B,us,E,T,,,,",             # 6: empty query_id
        "5,q,1,B,us,E,,,,,",             # 7: empty title
    ])
    with pytest.raises(DataError, match=r"esci\.csv:4: field 'esci_label': unknown label 'X'"):
        load_esci(p)
    recs, rep = load_esci(p, on_error="skip")
    assert [r.id for r in recs] == ["1"] and recs[0].product.description == "line one\nline two"
    assert [(e.line, e.field) for e in rep.errors] == [(4, "esci_label"), (5, "query"), (6, "query_id"),
                                                      (7, "product_title")]


def test_esci_parquet_join(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    ex = pd.DataFrame({
        "example_id": [7, 3, 5, 9],
        "query": ["lamp", "lamp", "tapete", "lamp"],
        "query_id": [1, 1, 2, 1],
        "product_id": ["P1", "P2", "P1", "P9"],
        "product_locale": ["us", "us", "es", "us"],
        "esci_label": ["E", "I", "S", "E"],
        "small_version": [1, 1, 0, 1],
        "large_version": [1, 1, 1, 1],
        "split": ["train", "train", "test", "train"],
    })
    prod = pd.DataFrame({
        "product_id": ["P1", "P1", "P2"],
        "product_title": ["Desk Lamp", "Lampara", "Garden Gnome"],
        "product_description": [None, "es", None],
        "product_bullet_point": [None, None, None],
        "product_brand": ["Lumo", None, "Gno"],
        "product_color": ["White", None, None],
        "product_locale": ["us", "es", "us"],
    })
    ex.to_parquet(tmp_path / "shopping_queries_dataset_examples.parquet")
    prod.to_parquet(tmp_path / "shopping_queries_dataset_products.parquet")
    assert detect_format(tmp_path) == "esci"
    with pytest.raises(DataError, match=r"row 4: field 'product_title': empty"):
        load_records(tmp_path)  # P9 has no product row
    recs, rep = load_records(tmp_path, on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    assert [r.id for r in recs] == ["7", "3", "5"]  # examples order kept through the join
    assert [r.product.title for r in recs] == ["Desk Lamp", "Garden Gnome", "Lampara"]  # joined by id+locale
    assert recs[0].product.brand == "Lumo" and recs[0].product.color == "White"
    assert recs[0].query_meta == {"locale": "us", "esci_split": "train", "small_version": "1"}
    assert [r.label for r in recs] == ["Exact", "Irrelevant", "Substitute"]
    assert [(e.line, e.field) for e in rep.errors] == [(4, "product_title")]
    assert read_rejects(tmp_path / "rej.jsonl")[0]["raw"]["example_id"] == 9
    recs, rep = load_esci(tmp_path / "shopping_queries_dataset_examples.parquet", locales=["us"], on_error="skip",
                          rejects_path=tmp_path / "rej.jsonl")
    assert [r.id for r in recs] == ["7", "3"] and (rep.n_read, rep.n_filtered, rep.n_rejected) == (4, 1, 1)


# ----------------------------------------------------------------------------------------------
# WANDS


def wands_dir(tmp_path: Path, labels: str | None = None, products: str | None = None) -> Path:
    d = tmp_path / "wands"
    d.mkdir()
    write(d / "query.csv", "query_id\tquery\tquery_class\n0\tsalon chair\tMassage Chairs\n"
                           '1\t"desk 48"" wide"\tDesks\n2\tdinosaur\t\n')
    write(d / "product.csv", products or (
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features\t"
        "rating_count\taverage_rating\treview_count\n"
        "0\tsolid wood platform bed\tBeds\tFurniture / Beds\tgood sleep\tcolor:brown|width:60\t15.0\t4.5\t15.0\n"
        "1\tmassage chair\tMassage Chairs\tFurniture / Chairs\t\t\t\t\t\n"
        "2\twriting desk\tDesks|Office\tFurniture / Desks\tnice\tmaterial:oak\t1\t5\t1\n"))
    write(d / "label.csv", labels or "id\tquery_id\tproduct_id\tlabel\n0\t0\t1\tExact\n1\t0\t0\tIrrelevant\n"
                                     "2\t1\t2\tPartial\n3\t2\t0\tIrrelevant\n")
    return d


def test_wands_records(tmp_path):
    d = wands_dir(tmp_path)
    assert detect_format(d) == "wands" and detect_format(d / "label.csv") == "wands"
    recs, rep = load_records(d)
    assert [r.label for r in recs] == ["Exact", "Irrelevant", "Partial", "Irrelevant"]
    assert [r.query for r in recs] == ["salon chair", "salon chair", 'desk 48" wide', "dinosaur"]
    assert [r.query_id for r in recs] == ["0", "0", "1", "2"]
    assert [(r.facts.query_class, r.facts.product_class) for r in recs] == [
        ("Massage Chairs", "Massage Chairs"), ("Massage Chairs", "Beds"), ("Desks", "Desks|Office"), (None, "Beds")]
    assert recs[1].product == Product(title="solid wood platform bed", description="good sleep", attributes={
        "product_id": "0", "product_class": "Beds", "category_hierarchy": "Furniture / Beds",
        "features": "color:brown|width:60"})
    assert recs[0].product.description is None
    assert recs[0].query_meta == {"query_class": "Massage Chairs"} and recs[3].query_meta == {}
    assert recs[1].product.attributes is not recs[3].product.attributes  # no shared mutable state
    assert all(r.source == "wands" and r.taxonomy == "hd3" for r in recs) and rep.n_ok == 4
    recs2, _ = load_wands(d / "label.csv", taxonomy="esci4")
    assert [r.label for r in recs2] == ["Exact", "Irrelevant", "Substitute", "Irrelevant"]


def test_wands_bad_rows(tmp_path):
    products = ("product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features\t"
                "rating_count\taverage_rating\treview_count\n"
                "0\tbed\tBeds\t\t\t\t\t\t\n"
                "1\t\tChairs\t\t\t\t\t\t\n")  # line 3: no name
    labels = ("id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tExact\n2\t0\t7\tPartial\n"
              "3\t9\t0\tPartial\n4\t0\t0\tPerfect\n")
    d = wands_dir(tmp_path, labels=labels, products=products)
    with pytest.raises(DataError, match=r"product\.csv:3: field 'product_name': empty"):
        load_wands(d)
    recs, rep = load_wands(d, on_error="skip")
    assert [r.id for r in recs] == ["0"]
    assert [(Path(e.path).name, e.line, e.field) for e in rep.errors] == [
        ("product.csv", 3, "product_name"), ("label.csv", 3, "product_id"), ("label.csv", 4, "product_id"),
        ("label.csv", 5, "query_id"), ("label.csv", 6, "label")]
    assert (rep.n_read, rep.n_ok, rep.n_rejected) == (5, 1, 4)  # n_* count label rows; errors hold all
    assert rep.rejects_path == tmp_path / "wands.rejects.jsonl"
    assert len(read_rejects(rep.rejects_path)) == 5


def test_wands_queries_table(tmp_path):
    d = wands_dir(tmp_path)
    q = load_wands_queries(d)
    assert q == [{"query_id": "0", "query": "salon chair", "query_class": "Massage Chairs"},
                 {"query_id": "1", "query": 'desk 48" wide', "query_class": "Desks"},
                 {"query_id": "2", "query": "dinosaur", "query_class": None}]
    with pytest.raises(DataError, match="WANDS query table"):
        detect_format(d / "query.csv")


# ----------------------------------------------------------------------------------------------
# generic JSONL


def test_jsonl_roundtrip_through_save(tmp_path):
    recs = [
        Record(id="a", query="red lamp", product=Product(title="Lamp", brand="Lu", attributes={"k": "v"}),
               label="Partial", score=2.0, query_id="q1", query_meta={"query_type": "other"},
               facts=StepFacts(type_relation="same", color="mismatch"), source="x"),
        Record(id="b", query="red lamp", product=Product(title="Shade"), label=None),
    ]
    p = save_jsonl(recs, tmp_path / "sub" / "r.jsonl")
    assert p == tmp_path / "sub" / "r.jsonl" and sorted(x.name for x in p.parent.iterdir()) == ["r.jsonl"]
    back, rep = load_records(p)
    assert back == recs and rep.n_ok == 2


def test_save_jsonl_is_atomic(tmp_path):
    p = save_jsonl([Record(id="a", query="q", product=Product(title="t"))], tmp_path / "r.jsonl")
    before = p.read_bytes()

    def broken():
        yield Record(id="b", query="q", product=Product(title="t"))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        save_jsonl(broken(), p)
    assert p.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["r.jsonl"]


def test_jsonl_errors_blank_lines_and_bom(tmp_path):
    lines = [
        '{"id": "1", "query": "q", "product": {"title": "t"}, "label": "Exact"}',            # 1 ok
        "",                                                                                 # 2 blank
        '{"id": "2", "query": "q", "product": {"title": "t"}',                              # 3 bad JSON
        '{"id": "3", "product": {"title": "t"}}',                                           # 4 missing query
        '{"id": "4", "query": "q", "product": {"title": "t"}, "facts": {"brand": "maybe"}}',  # 5 bad fact
        '{"id": "5", "query": "q", "product": {"title": "t"}, "label": "Great"}',           # 6 bad label
        '{"id": "1", "query": "q", "product": {"title": "t"}}',                             # 7 duplicate id
        "   ",                                                                              # 8 blank
        '{"id": "6", "query": "q", "product": {}}',                                         # 9 no title
        '[1, 2]',                                                                           # 10 not an object
        '{"id": "7", "query": "q", "product": {"title": "t"}, "colour": "red"}',            # 11 unknown field
    ]
    p = tmp_path / "r.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    with pytest.raises(DataError) as ei:
        load_jsonl(p)
    assert str(ei.value).startswith(f"{p}:3: invalid JSON")
    recs, rep = load_jsonl(p, on_error="skip")
    assert [r.id for r in recs] == ["1"]
    assert (rep.n_read, rep.n_ok, rep.n_rejected, rep.n_blank) == (9, 1, 8, 2)
    assert [(e.line, e.field) for e in rep.errors] == [
        (3, None), (4, "query"), (5, "facts.brand"), (6, "label"), (7, "id"), (9, "product.title"), (10, None),
        (11, "colour")]
    assert read_rejects(rep.rejects_path)[1]["raw"] == lines[3]


def test_jsonl_taxonomy_mapping(tmp_path):
    p = write(tmp_path / "r.jsonl",
              '{"id": "1", "query": "q", "product": {"title": "t"}, "label": "C", "taxonomy": "esci4"}\n'
              '{"id": "2", "query": "q", "product": {"title": "t"}, "label": "Exact", "taxonomy": "hd3"}\n')
    recs, _ = load_records(p, taxonomy="hd3")
    assert [(r.label, r.taxonomy) for r in recs] == [("Irrelevant", "hd3"), ("Exact", "hd3")]


def test_utf8_decoding_error_names_its_line(tmp_path):
    ok = '{"id": "%d", "query": "q", "product": {"title": "t"}}\n'
    p = tmp_path / "r.jsonl"
    p.write_bytes(b"".join((ok % i).encode() for i in range(500)) + b'{"id": "x\xff"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:501: not valid utf-8"):
        load_jsonl(p)


# ----------------------------------------------------------------------------------------------
# detection, errors, commands


def test_detect_format(tmp_path):
    assert detect_format(write(tmp_path / "a.csv", HD_HEADER, "latin-1")) == "home-depot"
    assert detect_format(esci_csv(tmp_path, [])) == "esci"
    assert detect_format(write(tmp_path / "a.jsonl", "")) == "jsonl"
    assert detect_format(write(tmp_path / "a.txt", '{"id": 1}\n')) == "jsonl"
    with pytest.raises(DataError, match="cannot detect the format"):
        detect_format(write(tmp_path / "b.csv", "foo,bar\n1,2\n"))
    with pytest.raises(DataError, match="no such file"):
        detect_format(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(tmp_path / "a.jsonl", format="xml")


def test_data_error_is_one_line():
    e = DataError("bad\nthing", path="f.csv", line=3, field="x")
    assert str(e) == "f.csv:3: field 'x': bad thing"
    assert str(DataError.from_row(RowError("t.parquet", 2, None, "empty"))) == "t.parquet row 2: empty"
    assert str(DataError("nothing here")) == "nothing here"
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl("whatever.jsonl", on_error="ignore")


def test_commands_validate_stats_split(tmp_path):
    p = write(tmp_path / "t.csv", HD_HEADER + "1,5,Abc,q one,3\n2,5,Abcdefg,q one,1\n3,5,Ab,q two,2\n4,5,x,q,bad\n",
              "latin-1")
    with pytest.raises(DataError):
        commands.validate(p)
    rep = commands.validate(p, "auto", "skip", tmp_path / "rej.jsonl")
    assert isinstance(rep, LoadReport) and (rep.n_ok, rep.n_rejected) == (3, 1)
    recs, _ = load_records(p, on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    s = commands.stats(recs)
    assert s["n"] == 3 and s["n_queries"] == 2 and s["mean_records_per_query"] == 1.5
    assert s["labels"] == {"hd3": {"Irrelevant": 1, "Partial": 1, "Exact": 1}}
    assert s["title_chars"] == {"min": 2, "mean": 4.0, "median": 3, "max": 7}
    assert s["facts_known"]["type_relation"] == 0.0 and "query_types" not in s
    text = commands.format_stats(s)
    assert "records: 3" in text and "Exact 1 (33.3%)" in text and "step facts known: none" in text

    esci = esci_csv(tmp_path, ["1,q,1,B,us,E,T,,,,", "2,r,2,B,us,S,T,,,,"])
    write(tmp_path / "shopping_queries_dataset_sources.csv", "query_id,source\n1,negations\n")
    s = commands.stats(load_records(esci)[0])
    assert s["query_types"] == {"negations": 1}
    assert s["facts_known"]["negation"] == 0.5 and s["facts_known"]["type_relation"] == 1.0

    jl = tmp_path / "many.jsonl"
    save_jsonl([Record(id=str(i), query=f"query {i % 20}", product=Product(title="t"), label="Exact")
                for i in range(100)], jl)
    paths = commands.split(jl, "auto", tmp_path / "splits", {"train": 0.5, "validation": 0.25, "test": 0.25}, seed=1)
    assert sorted(paths) == ["test", "train", "validation"]
    parts = {k: load_records(v)[0] for k, v in paths.items()}
    assert sum(len(v) for v in parts.values()) == 100
    assert [len({r.group for r in parts[k]}) for k in ("train", "validation", "test")] == [10, 5, 5]
    groups = [{r.group for r in v} for v in parts.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


# ----------------------------------------------------------------------------------------------
# real files (skipped when the shared data folder is absent)


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


def test_real_home_depot():
    p = shared("home-depot-product-search-relevance/train.csv")
    recs, rep = load_records(p)  # its load time is a benchmark (docs/benchmarks.md), not a test
    assert detect_format(p) == "home-depot"
    assert len(recs) == 59_773 and rep.n_rejected == 0
    # default cuts (1.75, 2.5): <1.75 Irrelevant, [1.75, 2.5) Partial, >=2.5 Exact
    assert Counter(r.label for r in recs) == {"Irrelevant": 9_731, "Partial": 22_428, "Exact": 27_614}
    assert len({r.group for r in recs}) == 9_513


def test_real_esci_sample():
    p = shared("esci/esci.csv")
    recs, rep = load_records(p)
    assert len(recs) == 200 and rep.n_rejected == 0
    assert Counter(r.label for r in recs) == {"Exact": 138, "Substitute": 49, "Irrelevant": 12, "Complement": 1}
    assert all(r.product.brand and r.product.color for r in recs)
    if (p.parent / "shopping_queries_dataset_sources.csv").exists():
        assert Counter(r.query_meta["query_type"] for r in recs) == {
            "other": 177, "negations": 10, "parse_pattern": 9, "behavioral": 4}
        assert sum(r.facts.negation == "yes" for r in recs) == 10


def test_real_wands_queries():
    q = load_wands_queries(shared("wands/query.csv"))
    assert len(q) == 480
    assert len({x["query_class"] for x in q if x["query_class"]}) == 188
    assert sum(x["query_class"] is None for x in q) == 6
