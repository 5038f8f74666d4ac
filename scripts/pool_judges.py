"""Pool several judges' verdict probabilities into one judge, calibrate it on validation pairs, read the test pairs.

Each ``--judge VAL=TEST`` is one judge's reads of the split's validation pairs (a ``predictions.jsonl`` with
``probs``: ``she eval --split validation --no-calibration``, or ``scripts/calibrate_ce.py --predictions``) and of its
test pairs (a ``predictions.jsonl`` or a prediction archive). Per pair the label distributions are pooled
log-linearly (:func:`she.evaluation.calibration.pool_probs`, equal weights unless ``--weights``); per-class offsets
are fitted on the pooled validation reads (never the test pairs) as ``she calibrate`` fits one judge's; the pooled
test reads are written to ``--out`` (id, gold, raw label, calibrated label, probabilities), which
``scripts/paired_eval.py``, ``scripts/rating_rank.py`` and ``scripts/archive_predictions.py`` take. Every judge must
read the same pairs; a pair missing from one of them is an error.

    python scripts/pool_judges.py --data-config configs/best-cpu.yaml \\
        --judge runs/val/sft6k2ep/predictions.jsonl=results/predictions/decision6k2ep-sft-s1-computed.jsonl.gz \\
        --judge runs/ce-hd-3k/reads/validation.jsonl=runs/ce-hd-3k/reads/test.jsonl \\
        --out runs/pool/sft6k2ep-ce3k/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from she.config import data_section
from she.data.labels import get_taxonomy
from she.data.sources import load_splits
from she.data.validation import atomic_write_lines, iter_jsonl
from she.evaluation.calibration import apply_offsets, fit_label_offsets, pool_probs
from she.evaluation.metrics import bootstrap_ci, classification_report


def read_probs(path: str, labels: list[str]) -> dict[str, dict[str, float]]:
    """``{id: {label: p}}`` of one judge's reads; a line without probabilities over ``labels`` is an error."""
    out = {}
    for n, d in iter_jsonl(path):
        probs = d.get("probs")
        if not isinstance(probs, dict) or set(probs) != set(labels):
            raise SystemExit(f"{path}, line {n}: field 'probs': expected probabilities over {labels}")
        out[str(d["id"])] = {c: float(probs[c]) for c in labels}
    return out


def pooled(judges: list[dict[str, dict[str, float]]], weights, what: str) -> dict[str, dict[str, float]]:
    ids = set(judges[0])
    for k, j in enumerate(judges[1:], 2):
        if set(j) != ids:
            raise SystemExit(f"{what}: judge {k} reads {len(set(j) ^ ids)} pairs judge 1 does not (or the reverse)")
    return {i: pool_probs([j[i] for j in judges], weights) for i in sorted(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-config", required=True, help="YAML whose data: section made the evaluated split")
    ap.add_argument("--judge", action="append", required=True, metavar="VAL=TEST")
    ap.add_argument("--weights", type=float, nargs="+", help="one per judge, summing to 1 (default: equal)")
    ap.add_argument("--out", required=True, help="the pooled test reads (predictions.jsonl)")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()

    data = data_section(args.data_config)
    labels = list(get_taxonomy(data.taxonomy).labels)
    records = {r.id: r for part in load_splits(data).values() for r in part if r.label is not None}
    pairs = [spec.split("=", 1) for spec in args.judge]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("--judge: expected VAL=TEST (a validation read and a test read of one judge)")
    if args.weights is not None and (len(args.weights) != len(pairs) or min(args.weights) < 0
                                     or abs(sum(args.weights) - 1.0) > 1e-9):
        raise SystemExit(f"--weights: one per judge ({len(pairs)}), non-negative, summing to 1; got {args.weights}")
    val = pooled([read_probs(v, labels) for v, _ in pairs], args.weights, "validation")
    test = pooled([read_probs(t, labels) for _, t in pairs], args.weights, "test")
    unknown = [i for i in list(val) + list(test) if i not in records]
    if unknown:
        raise SystemExit(f"{len(unknown)} pair ids are not labelled pairs of the data config's split, e.g. {unknown[:3]}")

    def raw(p: dict[str, float]) -> str:
        return max(p, key=p.get)

    offsets = fit_label_offsets([val[i] for i in val], [raw(val[i]) for i in val], [records[i].label for i in val],
                                labels)
    ids = list(test)
    gold = [records[i].label for i in ids]
    reads = {"raw": [raw(test[i]) for i in ids]}
    reads["calibrated"] = [apply_offsets(test[i], r, offsets) for i, r in zip(ids, reads["raw"])]
    print(f"{len(pairs)} judges, weights {args.weights or 'equal'}; offsets {offsets} from {len(val)} validation pairs")
    for kind, pred in reads.items():
        lo, hi = bootstrap_ci(gold, pred, labels, n_boot=args.n_boot, groups=[records[i].query for i in ids])
        print(f"{kind:>10}: Macro F1 {classification_report(gold, pred, labels)['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] "
              f"on {len(ids)} test pairs")
    atomic_write_lines(args.out, [json.dumps({"id": i, "gold": g, "raw_label": r, "label": c, "probs": test[i]}) + "\n"
                                  for i, g, r, c in zip(ids, gold, reads["raw"], reads["calibrated"])])
    Path(args.out).with_name("calibration.json").write_text(json.dumps({"label_offsets": offsets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
