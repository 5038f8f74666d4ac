"""Paired bootstrap of Macro F1 between two (or more) evaluations of the same pairs, raw and calibrated.

Each arm is one or more ``predictions.jsonl`` files (``she eval``, ``she demo``'s ``eval_*``, or a
``she compare`` row's ``eval/``) or prediction archives (``results/predictions/*.jsonl.gz``, written by
``scripts/archive_predictions.py``; their gold labels come from the split); several files in one arm are seeds,
pooled. The calibrated label of a
prediction is ``label`` when the model was calibrated before its evaluation (``raw_label`` then holds the
generated one), or, with ``PRED@OFFSETS`` (a ``calibration.json`` of a compare row, or any JSON with
``label_offsets``), the raw label re-read from ``probs`` with those offsets; a file with neither reports its
raw labels as "calibrated" too. Query groups for the bootstrap
come from the data config's split (the same seeded split the evaluations used). With as many files in A as
in B, the k-th of each is taken as the k-th seed and the per-seed differences are summarised with seeds as
the unit (``seed_differences``: mean, spread, t-interval, and about how many seeds detect the mean).
``--gold facts`` scores every pair against the label its step facts imply (``label_from_facts``) instead of its
data label: for synthetic data made with label noise, whose facts stay true (docs/synthetic.md); the arms may then
come from data made with different label noise (the same pairs and facts, other data labels), which ``--gold data``
refuses.

    python scripts/paired_eval.py --data-config configs/best-cpu.yaml \
      --a runs/best-cpu/eval_srpo/predictions.jsonl \
      --b runs/compare-hd-srpo-b32/sft/eval/predictions.jsonl@runs/compare-hd-srpo-b32/sft/eval/calibration.json
"""

from __future__ import annotations

import json
from pathlib import Path

from she.config import data_section
from she.data.guideline import label_from_facts
from she.data.labels import get_taxonomy
from she.data.sources import load_splits
from she.evaluation.archive import read_predictions
from she.evaluation.metrics import bootstrap_ci, classification_report, paired_bootstrap_diff, seed_differences

from _arms import two_arm_args  # scripts/_arms.py, next to this file


def read_arm(specs: list[str], gold: dict[str, str]) -> list[dict[str, dict[str, str | None]]]:
    """Per file: ``{id: {"gold", "raw", "calibrated"}}`` (an archive's gold labels from ``gold``, the split's)."""
    runs = []
    for spec in specs:
        path, _, off_path = spec.partition("@")
        offsets = json.loads(Path(off_path).read_text())["label_offsets"] if off_path else None
        runs.append(read_predictions(path, offsets, gold))
    return runs


def main() -> None:
    args = two_arm_args(__doc__, "PRED[@OFFSETS]", gold_choice=True)

    data = data_section(args.data_config)  # any job's or compare's config
    records = [r for part in load_splits(data).values() for r in part]
    query = {r.id: r.query for r in records}
    labels = list(get_taxonomy(data.taxonomy).labels)
    split_gold = {r.id: r.label for r in records if r.label is not None}
    a, b = read_arm(args.a, split_gold), read_arm(args.b, split_gold)
    ids = sorted(set.intersection(*(set(r) for r in a + b)))
    if not ids:
        raise SystemExit("the arms share no pair id")
    unknown = [i for i in ids if i not in query]
    if unknown:
        raise SystemExit(f"{len(unknown)} pair ids are not in the data config's split, e.g. {unknown[:3]}")
    gold = [a[0][i]["gold"] for i in ids]
    disagree = sum(any(r[i]["gold"] != g for r in a + b) for i, g in zip(ids, gold))
    if disagree and args.gold == "data":
        raise SystemExit("the arms disagree on a pair's gold label: they were not evaluated on the same data "
                         "(with --gold facts, the same pairs under other label noise can be compared)")
    if args.gold == "facts":  # the label the pair's (true) step facts imply, not its data label
        if disagree:  # the same pairs made with other label noise (docs/synthetic.md): the facts are the same
            print(f"the arms' data labels differ on {disagree} of {len(ids)} pairs (other label noise); "
                  f"scored against the facts")
        by_id = {r.id: r for r in records}
        no_facts = [i for i in ids if by_id[i].facts.type_relation is None]
        if no_facts:
            raise SystemExit(f"--gold facts: {len(no_facts)} pairs have no step facts to imply a label, e.g. "
                             f"{no_facts[:3]} (synthetic data, or data with human step facts, has them)")
        gold = [label_from_facts(by_id[i].facts, data.taxonomy) for i in ids]
        print(f"gold: the facts' labels; the data labels differ on {sum(g != a[0][i]['gold'] for i, g in zip(ids, gold))}"
              f" of {len(ids)} pairs")
    print(f"{len(ids)} shared pairs, {len({query[i] for i in ids})} queries; arm A {len(a)} run(s), arm B {len(b)}")
    for kind in ("raw", "calibrated"):
        pa = [[r[i][kind] for i in ids] for r in a]
        pb = [[r[i][kind] for i in ids] for r in b]
        groups = [query[i] for i in ids]

        def runs(preds: list[list[str | None]]) -> str:  # each run's Macro F1 with its query-bootstrap interval
            out = []
            for p in preds:
                lo, hi = bootstrap_ci(gold, p, labels, n_boot=args.n_boot, seed=args.seed, groups=groups)
                out.append(f"{classification_report(gold, p, labels)['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]")
            return " ".join(out)

        d = paired_bootstrap_diff(gold, pa, pb, labels, n_boot=args.n_boot, seed=args.seed, groups=groups)
        print(f"{kind:>10}: A {runs(pa)} | B {runs(pb)} | "
              f"A - B {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}], share <= 0: {d['p_le_0']:.3f}")
        if len(pa) == len(pb) > 1:  # the k-th file of each arm is the k-th seed: seeds as the unit
            per_seed = [classification_report(gold, x, labels)["macro_f1"] - classification_report(gold, y, labels)
                        ["macro_f1"] for x, y in zip(pa, pb)]
            s = seed_differences(per_seed)
            print(f"{'':>10}  per seed A - B {' '.join(f'{v:+.3f}' for v in per_seed)}: mean {s['mean']:+.3f}, "
                  f"sd {s['sd']:.3f}, t-interval [{s['lo']:+.3f}, {s['hi']:+.3f}], seeds to detect the mean at "
                  f"80 % power: {s['seeds_needed'] if s['seeds_needed'] is not None else '-'}")


if __name__ == "__main__":
    main()
