"""What a judge said on a choice step against the step's true value, per evaluated pair: a confusion table and each
true value's recall. For data whose records carry step facts (the synthetic generator's ``type_relation``), the
check that shows a step collapsing to one value -- the step-level form of the majority collapse.

    python scripts/step_confusion.py --data-config configs/compare-cpu-synthetic-noisy.yaml --step Type \
      --pred runs/compare-synthetic-noisy/sft/eval/predictions.jsonl runs/compare-synthetic-noisy/srpo_gated/eval/predictions.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter

from she.config import data_section
from she.data.sources import load_splits
from she.data.validation import iter_jsonl
from she.reasoning.parse import parse_trace
from she.reasoning.schema import SCHEMAS, default_schema
from she.rewards.verifier import choice_truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-config", required=True, help="YAML whose data: section made the evaluated split")
    ap.add_argument("--pred", nargs="+", required=True, help="predictions.jsonl files with their reasoning")
    ap.add_argument("--step", default="Type", help="a choice step whose true value the records carry (Type)")
    ap.add_argument("--schema", default=None, help="the judges' step schema (default: the taxonomy's default)")
    args = ap.parse_args()

    data = data_section(args.data_config)
    records = {r.id: r for part in load_splits(data).values() for r in part}
    schema = SCHEMAS[args.schema](data.taxonomy) if args.schema else default_schema(data.taxonomy)
    for path in args.pred:
        table: Counter = Counter()
        for n, d in iter_jsonl(path):
            rec = records.get(str(d.get("id")))
            if rec is None:
                raise SystemExit(f"{path}:{n}: field 'id': {d.get('id')!r} is not a pair of the data config's split")
            truth = choice_truth(args.step, rec)
            if truth is None:
                raise SystemExit(f"{path}:{n}: record {rec.id} has no true value for step {args.step!r}")
            step = parse_trace(d.get("reasoning") or "", schema).step(args.step.lower())
            said = step.conclusion if step is not None and isinstance(step.conclusion, str) else "(none)"
            table[(truth, said)] += 1
        truths = sorted({t for t, _ in table})
        saids = sorted({s for _, s in table})
        n = sum(table.values())
        print(f"{path}: {n} pairs; {args.step} right {sum(v for (t, s), v in table.items() if t == s) / n:.3f}; "
              f"said: " + ", ".join(f"{s} {sum(v for (_, x), v in table.items() if x == s)}" for s in saids))
        for t in truths:
            row = {s: table[(t, s)] for s in saids if table[(t, s)]}
            total = sum(row.values())
            print(f"  true {t:>10} ({total:>4}): recall {table[(t, t)] / total:.3f}  said {row}")


if __name__ == "__main__":
    main()
