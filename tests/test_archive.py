"""Prediction archives (she.evaluation.archive): what they keep, what they leave out, and reading them back."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from she.errors import UserError
from she.evaluation.archive import compact_prediction, read_predictions, write_archive

PREDS = [
    {"id": "a", "label": "Exact", "probs": {"Exact": 0.7, "Partial": 0.2, "Irrelevant": 0.1}, "format_ok": True,
     "reasoning": "Missing: none\nVerdict: Exact", "gold": "Exact"},
    # calibrated at evaluation time: raw_label holds the generated label
    {"id": "b", "label": "Partial", "raw_label": "Exact", "probs": {"Exact": 0.5, "Partial": 0.45,
                                                                     "Irrelevant": 0.05}, "gold": "Partial"},
    {"id": "c", "label": "Irrelevant", "probs": {"Exact": 1.234567891e-9, "Partial": 0.1, "Irrelevant": 0.9},
     "gold": "Partial"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compact_keeps_labels_and_probs_and_drops_the_data():
    d = compact_prediction(PREDS[0])
    assert d == {"id": "a", "raw_label": "Exact", "label": "Exact",
                 "probs": {"Exact": 0.7, "Partial": 0.2, "Irrelevant": 0.1}}
    b = compact_prediction(PREDS[1])
    assert (b["raw_label"], b["label"]) == ("Exact", "Partial")
    # 6 significant digits: a probability of ~1e-9 keeps its log to within 1e-6
    c = compact_prediction(PREDS[2])
    assert c["probs"]["Exact"] == 1.23457e-9
    assert abs(math.log(c["probs"]["Exact"]) - math.log(1.234567891e-9)) < 1e-5


def test_compact_rereads_with_offsets():
    # log 0.5 = -0.693, log 0.45 + 0.2 = -0.599: Partial wins with the offset
    assert compact_prediction(PREDS[1] | {"label": "Exact"}, {"Partial": 0.2})["label"] == "Partial"
    assert compact_prediction(PREDS[1] | {"label": "Exact"}, {"Partial": 0.05})["label"] == "Exact"


@pytest.mark.parametrize("name", ["arch.jsonl.gz", "arch.jsonl"])
def test_archive_round_trip_with_gold_from_the_data(tmp_path, name):
    src = _write(tmp_path / "predictions.jsonl", PREDS)
    dest = tmp_path / "out" / name
    assert write_archive(src, dest) == 3
    opener = gzip.open if name.endswith(".gz") else open
    with opener(dest, "rt", encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
    assert all(set(x) <= {"id", "raw_label", "label", "probs"} for x in lines)  # no gold, no reasoning
    gold = {"a": "Exact", "b": "Partial", "c": "Partial"}
    back = read_predictions(dest, gold=gold)
    assert back == read_predictions(src)  # the same as the full predictions file
    assert back["b"] == {"gold": "Partial", "raw": "Exact", "calibrated": "Partial"}
    # offsets at reading time re-read the raw label
    assert read_predictions(dest, {"Irrelevant": -5.0}, gold)["c"]["calibrated"] == "Partial"


def test_archive_without_gold_is_an_error_naming_the_line(tmp_path):
    dest = tmp_path / "a.jsonl.gz"
    write_archive(_write(tmp_path / "p.jsonl", PREDS), dest)
    with pytest.raises(UserError, match=r"a\.jsonl\.gz:1: field 'gold'"):
        read_predictions(dest)
    with pytest.raises(UserError, match=r"a\.jsonl\.gz:3: field 'id': 'c' is not a labelled pair"):
        read_predictions(dest, gold={"a": "Exact", "b": "Partial"})


def test_a_format_invalid_prediction_is_kept_with_its_null_label(tmp_path):
    preds = [PREDS[0], {"id": "x", "label": None, "probs": None, "format_ok": False, "reasoning": "Verdict", "gold": "Exact"}]
    dest = tmp_path / "a.jsonl.gz"
    assert write_archive(_write(tmp_path / "p.jsonl", preds), dest, {"Exact": 1.0}) == 2
    back = read_predictions(dest, gold={"a": "Exact", "x": "Exact"})
    assert back["x"] == {"gold": "Exact", "raw": None, "calibrated": None}
    # a null label on a line that does not say it is format-invalid is still refused
    with pytest.raises(UserError, match=r"q\.jsonl:1: field 'label': missing"):
        write_archive(_write(tmp_path / "q.jsonl", [{"id": "a", "label": None}]), tmp_path / "y.jsonl.gz")


def test_bad_predictions_are_refused_with_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"p\.jsonl:2: field 'id': duplicate"):
        write_archive(_write(tmp_path / "p.jsonl", [PREDS[0], PREDS[0]]), tmp_path / "x.jsonl.gz")
    with pytest.raises(UserError, match=r"q\.jsonl:1: field 'label': missing"):
        write_archive(_write(tmp_path / "q.jsonl", [{"id": "a"}]), tmp_path / "x.jsonl.gz")
    (tmp_path / "r.jsonl").write_text('{"id": "a", "label": "Exact"}\nnot json\n')
    with pytest.raises(UserError, match=r"r\.jsonl:2: invalid JSON"):
        write_archive(tmp_path / "r.jsonl", tmp_path / "x.jsonl.gz")
    (tmp_path / "s.jsonl").write_text('["a", "Exact"]\n')
    with pytest.raises(UserError, match=r"s\.jsonl:1: expected a JSON object"):
        write_archive(tmp_path / "s.jsonl", tmp_path / "x.jsonl.gz")
    with pytest.raises(UserError, match="no predictions"):
        write_archive(_write(tmp_path / "e.jsonl", []), tmp_path / "x.jsonl.gz")
    assert not (tmp_path / "x.jsonl.gz").exists()


def test_gzip_lines_are_written_atomically_and_read_back(tmp_path):
    """atomic_write_lines compresses a .gz name; iter_jsonl reads it; a failure midway keeps the old file and
    leaves no temporary behind."""
    from she.data.validation import atomic_write_lines, iter_jsonl

    dest = tmp_path / "x.jsonl.gz"
    atomic_write_lines(dest, ['{"a": 1}\n', "\n", '{"a": "\u00e9"}\n'])
    assert gzip.decompress(dest.read_bytes()).decode() == '{"a": 1}\n\n{"a": "\u00e9"}\n'
    assert list(iter_jsonl(dest)) == [(1, {"a": 1}), (3, {"a": "\u00e9"})]

    def broken():
        yield '{"a": 2}\n'
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        atomic_write_lines(dest, broken())
    assert list(iter_jsonl(dest)) == [(1, {"a": 1}), (3, {"a": "\u00e9"})]
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl.gz"]
