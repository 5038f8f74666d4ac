#!/usr/bin/env python
"""How much would the judge's verdict gain if all its steps were right? (issue 10)

    python scripts/oracle_steps.py --model runs/hd-sft-evidence-vw/sft/final \
        --data-config configs/home-depot-sft-evidence.yaml [--out runs/oracle/vw.jsonl]

A step reward can at best make every step right. This script measures what that is worth to *this* judge's
verdict: instead of letting the model write its steps, it forces the exact trace the rationale writer computes
from the pair (the SFT target: for the evidence schema, `Missing`, `Numbers` and `Head` computed from the
strings, no label involved) up to `Verdict:`, and reads the label-token probabilities there (one forward pass a
pair, `she predict --fast`'s path with a per-pair prefix; the same reading as `she eval --evidence computed`).
Offsets are fitted on the split's validation pairs and the test pairs are scored once, with query-group
bootstrap intervals. Compare with the model's own evaluation
(generated steps) by `scripts/paired_eval.py` on `--out`: the difference is the head-room of the step term.

Only schemas whose written steps are label-free measure a head-room (the evidence and semantic schemas); for
schemas whose `Type`/`Attributes` lines are derived from the gold label the forced trace leaks the label (refused).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from she.config import DataConfig, from_dict, read_yaml
from she.data.labels import get_taxonomy
from she.data.sources import load_splits
from she.evaluation.calibration import apply_offsets, fit_label_offsets
from she.evaluation.metrics import f1_summary
from she.reasoning.rationale import computed_evidence

LABEL_FREE = ("evidence", "semantic")  # schemas whose written steps do not depend on the gold label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a reasoning model's save_pretrained folder (she.json)")
    ap.add_argument("--data-config", required=True, help="YAML whose data: section makes the split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="test predictions (id, gold, label = calibrated, raw_label, probs) for paired_eval")
    args = ap.parse_args()

    from she.evaluation.fast import score_labels_fast
    from she.models.metadata import model_step_schema, prompt_style_of, schema_of
    from she.models.registry import load_model_and_tokenizer

    spec = schema_of(args.model)
    if spec not in LABEL_FREE:
        raise SystemExit(f"{args.model}: schema {spec!r} writes label-derived steps; forced traces would leak the "
                         f"label (use a model of schema {', '.join(LABEL_FREE)})")
    data = from_dict(DataConfig, read_yaml(args.data_config)["data"], f"{args.data_config}.data")
    splits = load_splits(data)
    labels = list(get_taxonomy(data.taxonomy).labels)
    schema = model_step_schema(args.model, data.taxonomy)
    model, tok = load_model_and_tokenizer(args.model)
    prefixes = {r.id: computed_evidence(r, schema) for name in ("validation", "test") for r in splits[name]}
    t0 = time.perf_counter()
    scored = {name: score_labels_fast(model, tok, splits[name], taxonomy=data.taxonomy,
                                      prompt_style=prompt_style_of(args.model),
                                      prefix=lambda r: prefixes[r.id], batch_size=args.batch_size,
                                      bf16=True, schema=schema)
              for name in ("validation", "test")}
    seconds = time.perf_counter() - t0
    val, test = splits["validation"], splits["test"]
    offsets = fit_label_offsets([j.probs for j in scored["validation"]], [j.label for j in scored["validation"]],
                                [r.label for r in val], labels)
    raw = [j.label for j in scored["test"]]
    cal = [apply_offsets(j.probs, j.label, offsets) for j in scored["test"]]
    gold, groups = [r.label for r in test], [r.query for r in test]
    print(f"{args.model}: verdict after the exact {spec} steps; {len(val)} validation, {len(test)} test pairs "
          f"({len(set(groups))} queries), {seconds:.0f} s; offsets {offsets}")
    for name, pred in (("raw", raw), ("calibrated", cal)):
        print(f"  {name}: {f1_summary(gold, pred, labels, groups)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r, j, c in zip(test, scored["test"], cal):
                f.write(json.dumps({"id": r.id, "gold": r.label, "label": c, "raw_label": j.label,
                                    "probs": j.probs, "reasoning": prefixes[r.id]}) + "\n")


if __name__ == "__main__":
    main()
