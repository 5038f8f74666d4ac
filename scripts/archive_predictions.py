"""Archive evaluations' predictions into results/predictions/ (ids, labels, probabilities; no data), to commit.

``runs/`` is not kept from one session to the next; an archive keeps what ``scripts/paired_eval.py`` needs to pair a
later row with this one (she.evaluation.archive). Each argument is ``NAME=PRED[@OFFSETS]``: a ``predictions.jsonl``,
optionally with a JSON holding ``label_offsets`` (a compare row's ``calibration.json``) whose calibrated labels the
archive then stores; written to ``results/predictions/NAME.jsonl.gz``.

    python scripts/archive_predictions.py \
      best-cpu-grpo-s1-computed=runs/best-cpu/eval_srpo_computed/predictions.jsonl \
      decision3k-grpo-s0=runs/compare-hd-decision-3k/grpo/eval/predictions.jsonl@runs/compare-hd-decision-3k/grpo/eval/calibration.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from she.evaluation.archive import write_archive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("items", nargs="+", metavar="NAME=PRED[@OFFSETS]")
    ap.add_argument("--out-dir", default="results/predictions")
    args = ap.parse_args()
    for item in args.items:
        name, sep, spec = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise SystemExit(f"{item!r}: expected NAME=PRED[@OFFSETS], NAME of letters, digits, '.', '_', '-'")
        path, _, off_path = spec.partition("@")
        offsets = json.loads(Path(off_path).read_text())["label_offsets"] if off_path else None
        dest = Path(args.out_dir) / f"{name}.jsonl.gz"
        n = write_archive(path, dest, offsets)
        print(f"{dest}: {n} pairs ({dest.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
