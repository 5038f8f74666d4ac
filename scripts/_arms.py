"""What the two-arm comparison scripts (paired_eval.py, rating_rank.py) share: their command line."""

from __future__ import annotations

import argparse


def two_arm_args(doc: str, metavar: str, gold_choice: bool = False) -> argparse.Namespace:
    """``--data-config`` (the YAML whose data: section made the evaluated split), ``--a`` / ``--b`` (one or more
    evaluations each: seeds pooled), ``--n-boot`` and ``--seed`` of the query bootstrap; with ``gold_choice``,
    ``--gold data|facts`` (the pairs' data labels, or the labels their step facts imply)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data-config", required=True, help="YAML whose data: section made the evaluated split")
    ap.add_argument("--a", nargs="+", required=True, metavar=metavar)
    ap.add_argument("--b", nargs="+", required=True, metavar=metavar)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    if gold_choice:
        ap.add_argument("--gold", choices=("data", "facts"), default="data",
                        help="score against the data labels, or against the labels the step facts imply")
    return ap.parse_args()
