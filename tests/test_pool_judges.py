"""scripts/pool_judges.py end to end on a small made-up data set: the pooled reads are pool_probs of the judges',
the offsets come from the validation reads only, and a judge that misses a pair is a clear error."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from she.config import data_section
from she.data.sources import load_splits
from she.evaluation.calibration import apply_offsets, fit_label_offsets, pool_probs

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Irrelevant", "Partial", "Exact"]


@pytest.fixture()
def split(tmp_path):
    rng = random.Random(0)
    rows = [{"id": f"p{i}", "query": f"query {i // 3}", "product": {"title": f"product {i}"},
             "label": LABELS[rng.randrange(3)]} for i in range(300)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data:\n  path: {data}\n  format: jsonl\n  split_seed: 0\n  validation_fraction: 0.3\n"
                   "  test_fraction: 0.3\n")
    return cfg, load_splits(data_section(str(cfg)))


def _reads(path: Path, records, seed: int) -> dict[str, dict[str, float]]:
    """A judge's reads: probabilities leaning to the gold label, written as a predictions.jsonl."""
    rng = random.Random(seed)
    out = {}
    for r in records:
        w = [rng.random() + (1.5 if lab == r.label else 0.0) for lab in LABELS]
        out[r.id] = {lab: x / sum(w) for lab, x in zip(LABELS, w)}
    path.write_text("".join(json.dumps({"id": i, "label": max(p, key=p.get), "probs": p}) + "\n"
                            for i, p in out.items()))
    return out


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/pool_judges.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_pool_judges_pools_calibrates_on_validation_and_writes_the_test_reads(split, tmp_path):
    cfg, parts = split
    judges = []
    for k in (1, 2):
        judges.append((_reads(tmp_path / f"v{k}.jsonl", parts["validation"], k),
                       _reads(tmp_path / f"t{k}.jsonl", parts["test"], 10 + k)))
    out = tmp_path / "pool" / "predictions.jsonl"
    res = _run("--data-config", cfg, "--judge", f"{tmp_path / 'v1.jsonl'}={tmp_path / 't1.jsonl'}",
               "--judge", f"{tmp_path / 'v2.jsonl'}={tmp_path / 't2.jsonl'}", "--weights", "0.25", "0.75",
               "--out", out, "--n-boot", "20")
    assert res.returncode == 0, res.stderr
    # the offsets are those of the pooled *validation* reads
    val = {r.id: pool_probs([judges[0][0][r.id], judges[1][0][r.id]], [0.25, 0.75]) for r in parts["validation"]}
    ids = sorted(val)
    want = fit_label_offsets([val[i] for i in ids], [max(val[i], key=val[i].get) for i in ids],
                             [next(r.label for r in parts["validation"] if r.id == i) for i in ids], LABELS)
    assert json.loads((out.parent / "calibration.json").read_text())["label_offsets"] == want
    got = [json.loads(line) for line in out.read_text().splitlines()]
    gold = {r.id: r.label for r in parts["test"]}
    assert sorted(d["id"] for d in got) == sorted(gold)
    for d in got:
        p = pool_probs([judges[0][1][d["id"]], judges[1][1][d["id"]]], [0.25, 0.75])
        assert d["probs"] == pytest.approx(p)
        assert d["raw_label"] == max(p, key=p.get)
        assert d["label"] == apply_offsets(p, d["raw_label"], want)
        assert d["gold"] == gold[d["id"]]
    assert "calibrated: Macro F1" in res.stdout


def test_pool_judges_refuses_judges_that_read_different_pairs(split, tmp_path):
    cfg, parts = split
    _reads(tmp_path / "v.jsonl", parts["validation"], 1)
    _reads(tmp_path / "t.jsonl", parts["test"], 2)
    _reads(tmp_path / "t_short.jsonl", parts["test"][1:], 3)
    res = _run("--data-config", cfg, "--judge", f"{tmp_path / 'v.jsonl'}={tmp_path / 't.jsonl'}",
               "--judge", f"{tmp_path / 'v.jsonl'}={tmp_path / 't_short.jsonl'}", "--out", tmp_path / "o.jsonl")
    assert res.returncode != 0
    assert "test: judge 2 reads 1 pairs judge 1 does not" in res.stderr
    res = _run("--data-config", cfg, "--judge", f"{tmp_path / 'v.jsonl'}={tmp_path / 't.jsonl'}", "--weights", "0.5",
               "0.5", "--out", tmp_path / "o.jsonl")
    assert res.returncode != 0 and "--weights: one per judge" in res.stderr
