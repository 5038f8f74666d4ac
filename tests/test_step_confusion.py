"""scripts/step_confusion.py: what a judge said on the Type step against the synthetic facts' true type."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from she.config import data_section
from she.data.sources import load_splits

ROOT = Path(__file__).resolve().parents[1]


def test_step_confusion_counts_said_against_true_values(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  synthetic_queries: 60\n  synthetic_products_per_query: 4\n  split_seed: 0\n"
                   "  test_fraction: 0.5\n")
    test = load_splits(data_section(str(cfg)))["test"]
    truth = Counter(r.facts.type_relation for r in test)
    assert truth["same"] and len(truth) > 1
    # a judge that says `same` for every pair but the first, which gets an unreadable trace
    lines = [{"id": r.id, "label": "Exact", "reasoning": "Query: x\nProduct: y\nType: same\nAttributes: none\nVerdict: Exact"}
             for r in test]
    lines[0]["reasoning"] = "garbled"
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(d) + "\n" for d in lines))
    res = subprocess.run([sys.executable, str(ROOT / "scripts/step_confusion.py"), "--data-config", str(cfg),
                          "--pred", str(pred)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    first = test[0].facts.type_relation
    right = truth["same"] - (first == "same")
    assert f"Type right {right / len(test):.3f}" in res.stdout
    assert f"said: (none) 1, same {len(test) - 1}" in res.stdout
    for t, n in truth.items():
        same = n - (first == t)
        recall = (same if t == "same" else 0) / n
        assert f"true {t:>10} ({n:>4}): recall {recall:.3f}" in res.stdout
