#!/usr/bin/env python
"""How often the grounded schema's computed steps fire on a labelled file, and their mean value per gold label.

    python scripts/grounded_stats.py ../shared/data/home-depot-product-search-relevance/train.csv

Pure Python (no torch): loads the file with ``she.data.loaders.load_records`` (Home Depot: cuts 1.75/2.5 on the
mean rating), computes ``Missing``, ``Numbers`` and ``Head`` for every pair exactly as the rationale writer and
the verifier do, and prints per gold label: pairs; ``Missing`` -- mean number of query words missing;
``Numbers`` -- share of pairs whose query states a quantity (fires), and among those the share with every
quantity ``match``, with any ``mismatch``, with any ``missing``; ``Head`` -- share of pairs with a head, and
among those the share found in the title. Nothing is written.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from she.data.loaders import load_records
from she.reasoning.rationale import head_check, missing_query_words, number_checks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--format", default="home-depot")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    records, _ = load_records(a.path, a.format, limit=a.limit)
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        c = acc[r.label]
        c["n"] += 1
        c["missing_words"] += len(missing_query_words(r))
        checks = number_checks(r)
        if checks:
            states = {s for _, s in checks}
            c["num_fires"] += 1
            c["num_all_match"] += states == {"match"}
            c["num_any_mismatch"] += "mismatch" in states
            c["num_any_missing"] += "missing" in states
        word, state = head_check(r)
        if state != "none":
            c["head_fires"] += 1
            c["head_found"] += state == "found"
    print(f"{len(records)} pairs")
    print(f"{'label':<11} {'n':>6} {'Missing':>8} | {'Num fires':>9} {'all match':>9} {'mismatch':>9} {'missing':>9}"
          f" | {'Head fires':>10} {'found':>6}")
    for label in sorted(acc, key=lambda k: -acc[k]["n"]):
        c = acc[label]
        nf, hf = c["num_fires"] or 1, c["head_fires"] or 1
        print(f"{label:<11} {int(c['n']):>6} {c['missing_words'] / c['n']:>8.2f} | {c['num_fires'] / c['n']:>9.3f}"
              f" {c['num_all_match'] / nf:>9.3f} {c['num_any_mismatch'] / nf:>9.3f} {c['num_any_missing'] / nf:>9.3f}"
              f" | {c['head_fires'] / c['n']:>10.3f} {c['head_found'] / hf:>6.3f}")


if __name__ == "__main__":
    main()
