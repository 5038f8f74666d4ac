"""Per-class offsets for a trained cross-encoder, fitted on validation pairs as `she calibrate` fits a judge's.

The reasoning rows of a comparison are read with offsets fitted on the split's validation pairs (never the test
pairs); for a like-for-like anchor the cross-encoder gets the same treatment: its class probabilities on the first
``--n`` validation pairs of ``--data-config``'s split, offsets fitted by
:func:`she.evaluation.calibration.fit_label_offsets`, written as ``calibration.json`` (``label_offsets``) into the
model's run folder, where ``scripts/paired_eval.py PRED@OFFSETS`` reads them.

Usage:
  python scripts/calibrate_ce.py --model runs/ce-hd-3k/final --data-config configs/ce-hd-3k.yaml \\
      --out runs/ce-hd-3k/calibration.json [--predictions runs/ce-hd-3k/reads]

``--predictions DIR`` also writes the cross-encoder's reads of those validation pairs and of the split's test pairs
as ``DIR/validation.jsonl`` / ``DIR/test.jsonl`` (id, gold, raw label, calibrated label, class probabilities: the
``predictions.jsonl`` fields that ``scripts/paired_eval.py``, ``scripts/rating_rank.py`` and
``scripts/pool_judges.py`` read).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a cross-encoder folder (she train cross-encoder's final)")
    p.add_argument("--data-config", required=True, help="YAML whose data: section made the split")
    p.add_argument("--n", type=int, default=1000, help="validation pairs to fit on")
    p.add_argument("--out", required=True)
    p.add_argument("--predictions", help="folder for validation.jsonl / test.jsonl of the reads")
    args = p.parse_args(argv)

    from she.config import data_section
    from she.data.labels import get_taxonomy
    from she.data.sources import load_splits
    from she.evaluation.calibration import apply_offsets, fit_label_offsets
    from she.evaluation.metrics import classification_report
    from she.training.cross_encoder import CrossEncoderJudge

    data = data_section(args.data_config)
    splits = load_splits(data)
    records = splits["validation"][: args.n]
    labels = list(get_taxonomy(data.taxonomy).labels)
    judge = CrossEncoderJudge.from_pretrained(args.model)
    rows = judge.predict(records)
    probs, raw, gold = [r["probs"] for r in rows], [r["label"] for r in rows], [r.label for r in records]
    offsets = fit_label_offsets(probs, raw, gold, labels)
    cal = [apply_offsets(pr, lab, offsets) for pr, lab in zip(probs, raw)]
    out = {"label_offsets": offsets, "n": len(records), "split": "validation",
           "macro_f1_before": classification_report(gold, raw, labels)["macro_f1"],
           "macro_f1_after": classification_report(gold, cal, labels)["macro_f1"]}
    Path(args.out).write_text(json.dumps(out, indent=2))
    if args.predictions:
        from she.data.validation import atomic_write_lines

        for name, recs, preds in (("validation", records, rows), ("test", splits["test"], None)):
            preds = preds if preds is not None else judge.predict(recs)
            lines = [json.dumps({"id": r.id, "gold": r.label, "raw_label": d["label"],
                                 "label": apply_offsets(d["probs"], d["label"], offsets), "probs": d["probs"]}) + "\n"
                     for r, d in zip(recs, preds)]
            atomic_write_lines(Path(args.predictions) / f"{name}.jsonl", lines)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
