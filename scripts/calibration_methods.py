"""Which way of fitting the verdict offsets reads the test pairs best: each method fitted on every model's
validation read, applied to the same model's test read, compared paired (same pairs, models pooled).

Each ``--model NAME=VALIDATION@TEST`` gives one model's verdict probabilities on the validation pairs (a
``predictions.jsonl`` of ``she eval --split validation --no-calibration``, or the
``calibration_<mode>_predictions.jsonl`` that ``she calibrate`` writes) and on the test pairs (a ``predictions.jsonl``
or a prediction archive, ``results/predictions/*.jsonl.gz``). Offsets are fitted on the validation pairs only (never
the test pairs), by every method of :func:`she.evaluation.calibration.fit_label_offsets`; the bagged fit resamples
whole validation queries. Per model: its test Macro F1 under each method; then, pooled over the models, each
method minus ``grid`` (today's fit) with the paired query-bootstrap interval and the models as the unit
(t-interval).

    python scripts/calibration_methods.py --data-config configs/best-cpu.yaml \\
      --model sft3k=runs/val/sft3k/predictions.jsonl@results/predictions/decision3k-sft-s1-packed-computed.jsonl.gz
"""

from __future__ import annotations

import argparse
import json

from she.config import data_section
from she.data.labels import get_taxonomy
from she.data.sources import load_splits
from she.data.validation import iter_jsonl
from she.evaluation.calibration import CALIBRATION_METHODS, apply_offsets, fit_label_offsets
from she.evaluation.metrics import classification_report, paired_bootstrap_diff, seed_differences


def read_probs(path: str, gold: dict[str, str]) -> dict[str, tuple[str | None, dict | None, str]]:
    """``{id: (generated label, label probabilities, gold)}`` of a predictions file or an archive."""
    out = {}
    for n, d in iter_jsonl(path):
        rid = str(d["id"])
        g = d.get("gold") or gold.get(rid)
        if g is None:
            raise SystemExit(f"{path}:{n}: pair {rid!r} has no gold label here or in the data config's split")
        out[rid] = (d.get("raw_label", d.get("label")), d.get("probs"), g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-config", required=True, help="YAML whose data: section made the evaluated split")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=VALIDATION@TEST")
    ap.add_argument("--methods", nargs="+", default=list(CALIBRATION_METHODS), choices=CALIBRATION_METHODS)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the test intervals")
    ap.add_argument("--bag", type=int, default=50, help="resamples of the bagged fit")
    ap.add_argument("--json", default=None, help="also write every model's offsets and scores here")
    args = ap.parse_args()

    data = data_section(args.data_config)
    records = [r for part in load_splits(data).values() for r in part]
    query = {r.id: r.query for r in records}
    split_gold = {r.id: r.label for r in records if r.label is not None}
    labels = list(get_taxonomy(data.taxonomy).labels)

    preds = {m: [] for m in args.methods}  # per method, one prediction list per model (same test pairs)
    test_ids, test_gold, table = None, None, []
    for spec in args.model:
        name, _, paths = spec.partition("=")
        val_path, _, test_path = paths.partition("@")
        if not (name and val_path and test_path):
            raise SystemExit(f"--model {spec!r}: expected NAME=VALIDATION@TEST")
        val, test = read_probs(val_path, split_gold), read_probs(test_path, split_gold)
        if set(val) & set(test):
            raise SystemExit(f"{name}: the validation and test files share pairs; fit on validation pairs only")
        ids = sorted(test)
        if test_ids is None:
            test_ids, test_gold = ids, [test[i][2] for i in ids]
        elif ids != test_ids:
            raise SystemExit(f"{name}: its test file covers other pairs than the first model's")
        vids = sorted(val)
        outside = [i for i in vids if i not in query]
        if outside:
            raise SystemExit(f"{name}: {len(outside)} validation pairs are not in the data config's split (e.g. "
                             f"{outside[0]!r}); their queries group the bagged fit")
        row = {"model": name}
        for method in args.methods:
            b = fit_label_offsets([val[i][1] for i in vids], [val[i][0] for i in vids], [val[i][2] for i in vids],
                                  labels, method=method, n_boot=args.bag, groups=[query[i] for i in vids])
            p = [apply_offsets(test[i][1], test[i][0], b) for i in ids]
            preds[method].append(p)
            row[method] = {"offsets": b, "macro_f1": classification_report(test_gold, p, labels)["macro_f1"]}
        table.append(row)
        print(f"{name:>28}: " + "  ".join(f"{m} {row[m]['macro_f1']:.3f} ({'/'.join(f'{v:+.2f}' for v in list(row[m]['offsets'].values())[1:])})"
                                          for m in args.methods))
    groups = [query[i] for i in test_ids]
    print(f"{len(test_ids)} test pairs, {len(set(groups))} queries, {len(table)} models")
    summary = {}
    for method in args.methods:
        if method == "grid" or "grid" not in preds:
            continue
        d = paired_bootstrap_diff(test_gold, preds[method], preds["grid"], labels, n_boot=args.n_boot, groups=groups)
        per = [r[method]["macro_f1"] - r["grid"]["macro_f1"] for r in table]
        s = seed_differences(per) if len(per) > 1 else {"mean": per[0], "lo": float("nan"), "hi": float("nan")}
        summary[method] = {"pooled": d, "per_model": per, "models": s}
        print(f"{method} - grid: pooled {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; per model "
              f"{' '.join(f'{v:+.3f}' for v in per)}; mean {s['mean']:+.4f}, t-interval [{s['lo']:+.4f}, {s['hi']:+.4f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": table, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
