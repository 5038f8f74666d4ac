#!/usr/bin/env python
"""Re-read a finished evaluation's traces with the marginal verdict, without generating them again (issue 10).

    she calibrate --model M --data-config D --evidence marginal        # offsets fitted in this mode, on validation
    python scripts/marginal_eval.py --model M --data-config D \
        --predictions runs/<compare>/<row>/eval/predictions.jsonl --out runs/marginal/<row>

`she eval --evidence marginal` generates the greedy traces and then reads the verdict as
P(label) = sum_v P(S = v | steps) P(label | steps, S = v), S the choice step before the verdict
(:func:`she.evaluation.fast.marginal_judgements`). The greedy traces of a finished `she eval` / `she compare` row
are the same traces (greedy decoding), so this script takes them from its predictions.jsonl and runs only the
forced reads: ~3 minutes for 1,000 pairs instead of ~10 on the 2-core VM. It writes metrics.json and
predictions.jsonl like `she eval` (the latter for scripts/paired_eval.py) and prints Macro F1 with query-group
bootstrap intervals, raw (argmax of the marginal) and with the model's `label_offsets_marginal`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from she.config import DataConfig, from_dict, read_yaml
from she.data.labels import get_taxonomy
from she.data.sources import eval_records
from she.evaluation.evaluate import judgement_json, score
from she.evaluation.generate import Judgement
from she.evaluation.metrics import f1_summary
from she.reasoning.parse import parse_trace


def judgements_from_rows(rows: list[dict], schema) -> list[Judgement]:
    """The generated judgements behind predictions.jsonl rows: the trace re-parsed, the generated verdict
    distribution, and the label before the generated mode's offsets (``raw_label``, else ``label``)."""
    out = []
    for d in rows:
        raw = d.get("raw_label", d["label"])
        parsed = parse_trace(d["reasoning"], schema)
        out.append(Judgement(d["id"], d["reasoning"], raw, d["probs"], parsed.format_ok, parsed, 0, raw_label=raw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model whose traces these are (save_pretrained folder)")
    ap.add_argument("--data-config", required=True, help="YAML whose data: section made the evaluated split")
    ap.add_argument("--predictions", required=True, help="that model's predictions.jsonl (she eval / she compare)")
    ap.add_argument("--out", required=True, help="folder for metrics.json and predictions.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from she.evaluation.fast import marginal_judgements
    from she.models.metadata import label_offsets_of, model_step_schema, prompt_style_of
    from she.models.registry import load_model_and_tokenizer

    data = from_dict(DataConfig, read_yaml(args.data_config)["data"], f"{args.data_config}.data")
    by_id = {r.id: r for r in eval_records(data, "test")[0]}
    rows = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
    missing = [d["id"] for d in rows if d["id"] not in by_id]
    if missing:
        raise SystemExit(f"{args.predictions}: {len(missing)} ids are not test pairs of {args.data_config} "
                         f"(first: {missing[0]})")
    records = [by_id[d["id"]] for d in rows]
    schema = model_step_schema(args.model, data.taxonomy)
    judgements = judgements_from_rows(rows, schema)
    offsets = label_offsets_of(args.model, "marginal")
    if offsets is None:
        print(f"{args.model} has no label_offsets_marginal (she calibrate --evidence marginal): raw reading only")
    model, tok = load_model_and_tokenizer(args.model)
    t0 = time.perf_counter()
    out = marginal_judgements(model, tok, records, taxonomy=data.taxonomy, prompt_style=prompt_style_of(args.model),
                              schema=schema, batch_size=args.batch_size, bf16=True, label_offsets=offsets,
                              judgements=judgements)
    seconds = time.perf_counter() - t0
    m = score(records, out, data.taxonomy)
    m.update(model=str(args.model), evidence="marginal", traces=str(args.predictions), seconds=seconds,
             marginalised=sum(j.step_probs is not None for j in out))
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "metrics.json").write_text(json.dumps(m, indent=2))
    with open(dest / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r, j in zip(records, out):
            f.write(json.dumps(judgement_json(j, r), ensure_ascii=False) + "\n")
    labels = list(get_taxonomy(data.taxonomy).labels)
    gold, groups = [r.label for r in records], [r.query for r in records]
    print(f"{args.model}: {len(records)} pairs ({len(set(groups))} queries), {m['marginalised']} marginalised, "
          f"{seconds:.0f} s; offsets {offsets}")
    for name, pred in (("raw", [j.raw_label for j in out]), ("calibrated", [j.label for j in out])):
        print(f"  {name}: {f1_summary(gold, pred, labels, groups)}")


if __name__ == "__main__":
    main()
