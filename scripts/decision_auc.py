"""How a judge ranks the decision: AUC of P(Relevant = no) and of P(Irrelevant) against gold Irrelevant, and how
sure it is, from ``predictions.jsonl`` files written with ``step_probs`` (``--evidence marginal | computed`` on the
decision schema; ``scripts/marginal_eval.py``).

Per file: ``auc_no`` (the step's P(no) ranks the gold-Irrelevant pairs above the others: 1 perfect, 0.5 chance),
``auc_irrelevant`` (the verdict's P(Irrelevant) the same way), ``no_share`` (pairs with P(no) > 0.5: what greedy
decoding would answer), ``unsure`` (pairs with 0.3 < P(no) < 0.7).

    python scripts/decision_auc.py runs/s15-marginal/grpo/predictions.jsonl runs/s16-marginal/srpo_likelihood/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from she.evaluation.metrics import roc_auc


def decision_stats(path: Path, negative: str = "Irrelevant") -> dict[str, float | int | None]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    read = [r for r in rows if r.get("step_probs") and "no" in r["step_probs"]]
    if not read:
        raise SystemExit(f"{path}: no row has step_probs with a 'no' value (read it with --evidence marginal)")
    p_no = [float(r["step_probs"]["no"]) for r in read]
    gold_neg = [r["gold"] == negative for r in read]
    return {
        "n": len(read),
        "auc_no": roc_auc(p_no, gold_neg),
        "auc_irrelevant": roc_auc([float(r["probs"][negative]) for r in read], gold_neg),
        "no_share": sum(p > 0.5 for p in p_no) / len(read),
        "unsure": sum(0.3 < p < 0.7 for p in p_no) / len(read),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="+", type=Path)
    args = ap.parse_args()
    print("| file | n | AUC P(no) | AUC P(Irrelevant) | P(no) > 0.5 | 0.3 < P(no) < 0.7 |")
    print("|---|---|---|---|---|---|")
    for path in args.predictions:
        s = decision_stats(path)
        auc = ["n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("auc_no", "auc_irrelevant")]  # one class only
        print(f"| {path} | {s['n']} | {auc[0]} | {auc[1]} | {s['no_share']:.1%} | {s['unsure']:.1%} |")


if __name__ == "__main__":
    main()
