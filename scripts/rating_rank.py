"""Does a judge order pairs as the raters' mean rating does? Spearman correlation between each evaluation's expected
grade (sum over labels of P(label) x its grade, from the verdict probabilities) and the pairs' mean human rating
(Home Depot), per run and as a paired difference of two arms, each arm the mean over its runs (seeds pooled); and
each run's verdict entropy (the mean, over the pairs, of the entropy in nats of its label distribution).

The mechanism check of ``rl.rated_verdict`` (docs/srpo.md, "Rated verdicts"): a step reward that pays agreement with
the rating should raise this correlation before it can move Macro F1. Intervals resample query groups, the same
draw for both arms.

    python scripts/rating_rank.py --data-config configs/best-cpu.yaml \\
        --a results/predictions/decision3k-sft-s1-srpo-exact-rated-s{1,2,3}-pin3-fresh-computed.jsonl.gz \\
        --b results/predictions/decision3k-sft-s1-grpo-exact-s{1,2,3}-pin3-fresh-computed.jsonl.gz
"""

from __future__ import annotations


import numpy as np

from she.config import data_section
from she.data.labels import get_taxonomy
from she.data.sources import load_splits
from she.data.validation import iter_jsonl
from she.evaluation.calibration import bootstrap_draws
from she.evaluation.metrics import spearman

from _arms import two_arm_args  # scripts/_arms.py, next to this file


def verdict_probs(path: str, labels: list[str]) -> dict[str, np.ndarray]:
    """``{id: P(label_k), renormalised over the labels}`` of an evaluation's ``probs`` (a pair without them is an error
    naming the line); the expected grade is ``sum_k P(label_k) k``."""
    out = {}
    for n, d in iter_jsonl(path):
        probs = d.get("probs")
        if not isinstance(probs, dict) or not probs:
            raise SystemExit(f"{path}, line {n}: field 'probs' missing (an evaluation with verdict probabilities)")
        p = np.array([float(probs.get(lab, 0.0)) for lab in labels])
        if not p.sum() > 0:
            raise SystemExit(f"{path}, line {n}: 'probs' has no mass on the labels {labels} (another taxonomy?)")
        out[str(d["id"])] = p / p.sum()
    return out


def main() -> None:
    args = two_arm_args(__doc__, "PRED")

    data = data_section(args.data_config)
    records = {r.id: r for part in load_splits(data).values() for r in part if r.score is not None}
    labels = list(get_taxonomy(data.taxonomy).labels)
    arms = {name: [verdict_probs(p, labels) for p in paths] for name, paths in (("A", args.a), ("B", args.b))}
    ids = sorted(set(records).intersection(*(set(g) for runs in arms.values() for g in runs)))
    if not ids:
        raise SystemExit("the evaluations share no rated pair id with the data")
    rating = np.array([records[i].score for i in ids])
    probs = {name: np.array([[g[i] for i in ids] for g in runs]) for name, runs in arms.items()}  # [runs, ids, K]
    grades = {name: p @ np.arange(len(labels)) for name, p in probs.items()}
    # how sharp a judge's verdict is: the mean entropy (nats) of its verdict distributions
    entropy = {name: -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).mean(-1) for name, p in probs.items()}
    # whole queries resampled, as scripts/paired_eval.py does (the query text is the group)
    draws = bootstrap_draws(len(ids), args.n_boot, args.seed, groups=[records[i].query for i in ids])

    def rho(run: np.ndarray, idx: np.ndarray) -> float:
        r = spearman(run[idx], rating[idx])
        if r is None:
            raise SystemExit("a run's expected grades (or the ratings) are constant on a resample: no rank correlation")
        return r

    def arm_rho(name: str, idx: np.ndarray) -> float:
        return float(np.mean([rho(run, idx) for run in grades[name]]))

    print(f"{len(ids)} rated pairs, {len({records[i].query for i in ids})} queries; arm A {len(args.a)} run(s), "
          f"arm B {len(args.b)}")
    full = np.arange(len(ids))
    for name, paths in (("A", args.a), ("B", args.b)):
        for path, run, h in zip(paths, grades[name], entropy[name]):
            boot = np.percentile([rho(run, d) for d in draws], [2.5, 97.5])
            print(f"  {name} {rho(run, full):.3f} [{boot[0]:.3f}, {boot[1]:.3f}]  verdict entropy {h:.3f}  {path}")
    diff = [arm_rho("A", d) - arm_rho("B", d) for d in draws]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    print(f"Spearman A - B (runs averaged): {arm_rho('A', full) - arm_rho('B', full):+.4f} [{lo:+.4f}, {hi:+.4f}], "
          f"share <= 0: {np.mean(np.array(diff) <= 0):.3f}")


if __name__ == "__main__":
    main()
