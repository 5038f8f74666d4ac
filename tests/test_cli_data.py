"""Data commands as a user meets them (issue 14 items 4-6): split files are used as split, eval scores the
held-out part and refuses training pairs unless asked, encodings are detected, exit codes 0/1/2."""

import json

import pytest

from she.cli import main
from she.config import DataConfig
from she.data.loaders import load_records
from she.data.sources import eval_records, load_splits

HD = ",".join(["id", "product_uid", "product_title", "search_term", "relevance"]) + "\n"  # made-up rows follow


def run(argv, capsys):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def records_file(tmp_path, n=60, name="all.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"id": str(i), "query": f"query {i % 20}", "product": {"title": f"t{i}"},
                                     "label": ["Exact", "Partial", "Irrelevant"][i % 3]}) + "\n" for i in range(n)))
    return p


def test_split_then_train_keeps_every_training_row(tmp_path, capsys):
    src = records_file(tmp_path)
    code, out, _ = run(["data", "split", src, "--out", tmp_path / "splits"], capsys)
    assert code == 0
    train_file = tmp_path / "splits" / "train.jsonl"
    n_train = sum(1 for _ in open(train_file))
    splits = load_splits(DataConfig(path=str(train_file)))
    assert len(splits["train"]) == n_train and splits["validation"] == [] and splits["test"] == []
    # the three files concatenated: the same parts again, never a fresh 80/10/10
    both = tmp_path / "both.jsonl"
    both.write_text("".join(open(tmp_path / "splits" / f"{k}.jsonl").read() for k in ("train", "validation", "test")))
    again = load_splits(DataConfig(path=str(both)))
    orig = {k: [json.loads(l)["id"] for l in open(tmp_path / "splits" / f"{k}.jsonl")] for k in again}
    assert {k: [r.id for r in v] for k, v in again.items()} == orig
    # files named as parts are used as they are
    named = load_splits(DataConfig(train_file=str(src), test_file=str(tmp_path / "splits" / "test.jsonl")))
    assert len(named["train"]) == 60 and len(named["test"]) == len(orig["test"]) and named["validation"] == []


def test_mixed_split_marks_are_an_error(tmp_path, capsys):
    run(["data", "split", records_file(tmp_path), "--out", tmp_path / "s"], capsys)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(open(tmp_path / "s" / "train.jsonl").read()
                     + json.dumps({"id": "new", "query": "q", "product": {"title": "t"}, "label": "Exact"}) + "\n")
    from she.data.validation import DataError

    with pytest.raises(DataError, match="carry the split"):
        load_splits(DataConfig(path=str(mixed)))


def test_eval_says_which_part_and_refuses_training_pairs(tmp_path, capsys):
    src = records_file(tmp_path)
    run(["data", "split", src, "--out", tmp_path / "s"], capsys)
    recs, note = eval_records(DataConfig(path=str(tmp_path / "s" / "test.jsonl")))
    assert note.startswith("scoring the test part") and len(recs) == sum(1 for _ in open(tmp_path / "s" / "test.jsonl"))
    with pytest.raises(ValueError, match="only training pairs.*--split train"):
        eval_records(DataConfig(path=str(tmp_path / "s" / "train.jsonl")))
    recs, note = eval_records(DataConfig(path=str(tmp_path / "s" / "train.jsonl")), "train")
    assert len(recs) == sum(1 for _ in open(tmp_path / "s" / "train.jsonl"))
    # an unsplit file: its seeded test split, the one the training commands hold out
    recs, note = eval_records(DataConfig(path=str(src)))
    assert [r.id for r in recs] == [r.id for r in load_splits(DataConfig(path=str(src)))["test"]]
    assert "test part" in note and "split_seed 0" in note and len(recs) < 60
    recs, note = eval_records(DataConfig(path=str(src)), "all")
    assert len(recs) == 60 and "training pairs included" in note
    # through the CLI: a one-line user error before any model is loaded
    code, _, err = run(["eval", "--model", tmp_path / "nope", "--data", tmp_path / "s" / "train.jsonl",
                        "--out", tmp_path / "ev"], capsys)
    assert code == 2 and "--split train" in err
    code, _, err = run(["eval", "--model", tmp_path / "nope", "--out", tmp_path / "ev"], capsys)
    assert code == 2 and "needs --data" in err


@pytest.mark.parametrize("encoding,bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("latin-1", b""),
                                          ("utf-16", b"")])
def test_home_depot_encodings(tmp_path, encoding, bom):
    text = HD + "1,100001,Caf\u00e9 Table 90\u00b0,caf\u00e9 table,3\n2,100002,Drill,drill,1\n"
    p = tmp_path / "train.csv"
    p.write_bytes(bom + text.encode(encoding))  # Python's utf-16 codec writes a BOM itself
    recs, rep = load_records(p)
    assert recs[0].product.title == "Caf\u00e9 Table 90\u00b0" and recs[0].query == "caf\u00e9 table"
    assert rep.n_ok == 2


def test_utf16_without_bom_and_wrong_encoding_name_it(tmp_path, capsys):
    p = tmp_path / "train.csv"
    p.write_bytes((HD + "1,2,T,q,3\n").encode("utf-16-le"))
    code, _, err = run(["data", "validate", p], capsys)
    assert code == 2 and "UTF-16" in err and "--encoding" in err
    code, out, _ = run(["data", "validate", p, "--encoding", "utf-16-le"], capsys)
    assert code == 0 and "1 ok" in out
    q = tmp_path / "latin.jsonl"
    q.write_bytes(json.dumps({"id": "1", "query": "q", "product": {"title": "Caf\u00e9"}}, ensure_ascii=False)
                  .encode("latin-1") + b"\n")
    code, _, err = run(["data", "validate", q], capsys)
    assert code == 2 and "not valid utf-8" in err and "--encoding" in err
    code, _, _ = run(["data", "validate", q, "--encoding", "latin-1"], capsys)
    assert code == 0
    code, _, err = run(["data", "validate", q, "--encoding", "klingon"], capsys)
    assert code == 2 and "unknown encoding 'klingon'" in err


def test_exit_codes_and_every_bad_row(tmp_path, capsys):
    p = tmp_path / "d.csv"
    p.write_text(HD + "".join(f"{i},1,T,q{i},{'x' if i % 2 else 2}\n" for i in range(1, 26)), encoding="utf-8")
    code, out, _ = run(["data", "validate", p, "--on-error", "skip", "--show", "5"], capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[:2] == [f"{p}:2: field 'relevance': not a number: 'x'", f"{p}:4: field 'relevance': not a number: 'x'"]
    assert sum(": field 'relevance':" in l for l in lines) == 5 and "... and 8 more bad rows" in out
    assert "12 ok, 13 rejected of 25 rows" in out
    code, out, _ = run(["data", "stats", p, "--on-error", "skip"], capsys)
    assert code == 1 and "records: 12" in out and "rejected 13" in out
    code, out, _ = run(["data", "split", p, "--on-error", "skip", "--out", tmp_path / "s"], capsys)
    assert code == 1 and sum(1 for f in ("train", "validation", "test")
                             for _ in open(tmp_path / "s" / f"{f}.jsonl")) == 12
    code, _, err = run(["data", "stats", p], capsys)  # fail mode: the first bad row, exit 2
    assert code == 2 and f"{p}:2: field 'relevance'" in err
    good = tmp_path / "g.csv"
    good.write_text(HD + "1,1,T,q,2\n", encoding="utf-8")
    assert run(["data", "validate", good], capsys)[0] == 0
    assert run(["data", "stats", good, "--on-error", "skip"], capsys)[0] == 0


def test_split_and_generate_arguments(tmp_path, capsys):
    src = records_file(tmp_path)
    code, _, err = run(["data", "split", src, "--out", tmp_path / "s", "--fractions", "a,b,c"], capsys)
    assert code == 2 and err == "she: error: --fractions 'a,b,c': expected three numbers train,validation,test " \
                                "such as 0.8,0.1,0.1\n"
    code, _, err = run(["data", "split", src, "--out", src], capsys)
    assert code == 2 and f"--output-dir {src}: is a file" in err
    code, out, _ = run(["data", "generate", "--out", f"{tmp_path / 'gen'}/", "--queries", "3"], capsys)
    assert code == 0 and (tmp_path / "gen" / "synthetic.jsonl").is_file()
    (tmp_path / "existing").mkdir()
    run(["data", "generate", "--out", tmp_path / "existing", "--queries", "3"], capsys)
    assert (tmp_path / "existing" / "synthetic.jsonl").is_file()
