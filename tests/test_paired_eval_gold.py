"""scripts/paired_eval.py --gold facts: on synthetic data with label noise, the pairs are scored against the labels
their (true) step facts imply, not their noisy data labels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from she.config import data_section
from she.data.guideline import label_from_facts
from she.data.sources import load_splits

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, labels: dict[str, str], gold: dict[str, str]) -> str:
    path.write_text("".join(json.dumps({"id": i, "label": lab, "gold": gold[i]}) + "\n" for i, lab in labels.items()))
    return str(path)


def _macro_f1s(out: str, kind: str) -> tuple[float, float, float]:
    """(A, B, A - B) of the script's line for ``kind`` (raw / calibrated)."""
    line = next(x for x in out.splitlines() if x.strip().startswith(f"{kind}:"))
    a, b = (float(x) for x in re.findall(r"[AB] (\d\.\d{3}) \[", line))
    return a, b, float(re.search(r"A - B ([+-]\d\.\d{3})", line).group(1))


def test_gold_facts_scores_against_the_facts_labels(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  synthetic_queries: 80\n  synthetic_products_per_query: 4\n  synthetic_label_noise: 0.3\n"
                   "  split_seed: 0\n  test_fraction: 0.5\n")
    test = load_splits(data_section(str(cfg)))["test"]
    gold = {r.id: r.label for r in test}
    facts = {r.id: label_from_facts(r.facts, "hd3") for r in test}
    n_noisy = sum(gold[i] != facts[i] for i in gold)
    assert 0 < n_noisy < len(gold)  # the noise is there, and the facts are not all overridden
    a = _write(tmp_path / "a.jsonl", facts, gold)  # predicts what the facts imply
    b = _write(tmp_path / "b.jsonl", gold, gold)  # predicts the noisy data label
    runs = {}
    for which in ("data", "facts"):
        res = subprocess.run([sys.executable, str(ROOT / "scripts/paired_eval.py"), "--data-config", str(cfg),
                              "--a", a, "--b", b, "--gold", which, "--n-boot", "20"],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        runs[which] = res.stdout
    assert _macro_f1s(runs["data"], "raw")[1] == 1.0 and _macro_f1s(runs["data"], "raw")[2] < 0
    assert _macro_f1s(runs["facts"], "raw")[0] == 1.0 and _macro_f1s(runs["facts"], "raw")[2] > 0
    assert f"differ on {n_noisy} of {len(gold)} pairs" in runs["facts"]
    assert "differ on" not in runs["data"]


def test_gold_facts_without_facts_is_a_clear_error(tmp_path):
    rows = [{"id": f"p{i}", "query": f"query {i // 2}", "product": {"title": f"product {i}"},
             "label": ["Irrelevant", "Partial", "Exact"][i % 3]} for i in range(40)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data:\n  path: {data}\n  format: jsonl\n  split_seed: 0\n  test_fraction: 0.5\n")
    test = load_splits(data_section(str(cfg)))["test"]
    gold = {r.id: r.label for r in test}
    pred = _write(tmp_path / "a.jsonl", gold, gold)
    res = subprocess.run([sys.executable, str(ROOT / "scripts/paired_eval.py"), "--data-config", str(cfg),
                          "--a", pred, "--b", pred, "--gold", "facts", "--n-boot", "20"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "have no step facts" in res.stderr


def test_arms_under_other_label_noise_compare_on_the_facts_only(tmp_path):
    """The same pairs made with and without label noise (same ids and facts, other data labels): --gold data refuses
    to pair them, --gold facts scores both against the facts."""
    splits = {}
    for noise in (0.0, 0.3):
        cfg = tmp_path / f"data{noise}.yaml"
        cfg.write_text(f"data:\n  synthetic_queries: 80\n  synthetic_products_per_query: 4\n  synthetic_label_noise: "
                       f"{noise}\n  split_seed: 0\n  test_fraction: 0.5\n")
        splits[noise] = (cfg, {r.id: r for r in load_splits(data_section(str(cfg)))["test"]})
    (cfg, noisy), (_, clean) = splits[0.3], splits[0.0]
    assert noisy.keys() == clean.keys()
    facts = {i: label_from_facts(r.facts, "hd3") for i, r in noisy.items()}
    assert all(clean[i].label == facts[i] for i in facts)  # without noise every label is the facts' label
    n_noisy = sum(noisy[i].label != facts[i] for i in facts)
    assert n_noisy > 0
    a = _write(tmp_path / "a.jsonl", facts, {i: r.label for i, r in clean.items()})  # evaluated on the clean data
    b = _write(tmp_path / "b.jsonl", {i: r.label for i, r in noisy.items()}, {i: r.label for i, r in noisy.items()})
    out = {}
    for which in ("data", "facts"):
        out[which] = subprocess.run([sys.executable, str(ROOT / "scripts/paired_eval.py"), "--data-config", str(cfg),
                                     "--a", a, "--b", b, "--gold", which, "--n-boot", "20"],
                                    capture_output=True, text=True, cwd=ROOT)
    assert out["data"].returncode != 0 and "disagree on a pair's gold label" in out["data"].stderr
    assert out["facts"].returncode == 0, out["facts"].stderr
    assert f"data labels differ on {n_noisy} of {len(facts)} pairs" in out["facts"].stdout
    assert _macro_f1s(out["facts"].stdout, "raw")[0] == 1.0 and _macro_f1s(out["facts"].stdout, "raw")[2] > 0
