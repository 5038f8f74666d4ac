#!/usr/bin/env python
"""Is the relevance label in the frozen model's features? A linear probe, no fine-tuning (issue 13).

    python scripts/probe_label.py --model smollm2-135m --data-config configs/compare-cpu-label-only.yaml \
        [--train 3000] [--layers -1,-6]

The label-only SFT row of ``she compare`` learned the label prior and nothing else (docs/results.md): every pair
got the same label probabilities. This script separates the two possible reasons. It runs the *frozen* model
over the label-only prompt of each pair (``--prompt-style``, the chat template up to the assistant turn: exactly
what the label-only SFT conditions on), takes hidden states at ``--layers`` -- the last prompt token and the
mean over the prompt -- and fits a multinomial logistic regression on ``--train`` label-balanced pairs of the
training queries. The regularisation strength and per-class log-offsets are chosen on the validation pairs (as
``she calibrate`` does for a model); the test pairs of the data config's split (``data.max_eval``) are scored
once, with 1,000-replicate query-group bootstrap intervals. If the probe is well above the prior, the features
carry the signal and the fine-tune's failure is one of optimisation; if it is not, the backbone does not see it.

``--at verdict`` (a reasoning model, e.g. ``runs/hd-sft-evidence/sft/final``): the model first writes its steps
greedily (``she eval``'s generation, its own prompt style and schema), and the probe reads the hidden state at
the position where it generated the verdict label -- the state its label-token probabilities come from, having
attended to the pair *and* the steps. The probe is then a linear verdict head fitted in place of the three
label-token rows of the output head plus offsets (``she calibrate``): how much better the same state can be
read. Pairs whose trace has no verdict keep the model's own (invalid) answer.

Needs scikit-learn (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from she.config import DataConfig, from_dict, read_yaml
from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.data.sources import with_train_draw
from she.evaluation.calibration import apply_offsets, fit_label_offsets
from she.evaluation.metrics import classification_report, f1_summary
from she.reasoning.prompts import build_messages
from she.reasoning.schema import resolve_schema

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def prompt_texts(records: list[Record], tokenizer, prompt_style: str = "compact") -> list[str]:
    """The chat-templated prompt of each record, up to the start of the assistant turn (what the model reads
    before it writes ``Verdict:``)."""
    out = []
    for r in records:
        schema = resolve_schema(None, r.taxonomy)
        msgs = build_messages(r, style=prompt_style, schema=schema)
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def pooled_features(hidden, mask):
    """``hidden`` [B, T, H] and right-padded ``mask`` [B, T] -> [B, 2H]: the last real token's state, then the
    mean over the real tokens. Pure tensor code (float32 out)."""
    import torch

    mask = mask.to(hidden.dtype)
    last = mask.sum(1).long() - 1
    rows = torch.arange(hidden.shape[0])
    mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return torch.cat([hidden[rows, last], mean], dim=-1).float()


def extract(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 32) -> np.ndarray:
    """Features of every text: :func:`pooled_features` of each hidden layer in ``layers``, concatenated. Texts
    are processed length-sorted (less padding) and returned in their input order."""
    import torch

    tokenizer.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats: list[np.ndarray | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model(**enc, output_hidden_states=True)
            f = torch.cat([pooled_features(out.hidden_states[layer], enc["attention_mask"]) for layer in layers], -1)
            for i, row in zip(idx, f.numpy()):
                feats[i] = row
    return np.stack(feats)


def verdict_features(model, tokenizer, records: list[Record], model_path: str, batch_size: int = 32,
                     max_new_tokens: int = 96) -> tuple[np.ndarray, np.ndarray, list[str | None], list[dict | None]]:
    """(features [N, H], has-verdict mask [N], the model's own labels, its label-token probabilities) at the
    verdict positions of its greedy traces; rows without a verdict are zeros."""
    from she.evaluation.generate import generate_judgements
    from she.models.metadata import model_step_schema, prompt_style_of

    taxonomy = records[0].taxonomy
    js = generate_judgements(model, tokenizer, records, taxonomy=taxonomy, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, schema=model_step_schema(model_path, taxonomy),
                             prompt_style=prompt_style_of(model_path), keep_hidden=True, progress=False)
    width = next((len(j.verdict_hidden) for j in js if j.verdict_hidden is not None), 0)
    ok = np.array([j.verdict_hidden is not None for j in js])
    x = np.array([j.verdict_hidden if j.verdict_hidden is not None else [0.0] * width for j in js], dtype=np.float32)
    return x, ok, [j.label for j in js], [j.probs for j in js]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a registered model name or a save_pretrained folder")
    ap.add_argument("--data-config", required=True, help="YAML whose data: section makes the split")
    ap.add_argument("--train", type=int, default=3000, help="label-balanced training pairs for the probe")
    ap.add_argument("--layers", default="-1,-6", help="hidden-state layers (0 = embeddings, -1 = last)")
    ap.add_argument("--prompt-style", default="compact")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--at", choices=("prompt", "verdict"), default="prompt",
                    help="prompt: the frozen prompt's states (--layers); verdict: a reasoning model's verdict position")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="--at verdict: the trace's token budget")
    ap.add_argument("--out", help="write the probe's test predictions here (predictions.jsonl: id, gold, label = "
                                  "the calibrated probe, raw_label = the raw probe, probs), for scripts/paired_eval.py")
    args = ap.parse_args()
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from she.models.registry import load_model_and_tokenizer

    data = from_dict(DataConfig, read_yaml(args.data_config)["data"], f"{args.data_config}.data")
    splits = with_train_draw(data, args.train, args.seed)
    labels = list(get_taxonomy(data.taxonomy).labels)
    train, val, test = splits["train"], splits["validation"], splits["test"]
    layers = [int(x) for x in args.layers.split(",")]

    parts = (("train", train), ("validation", val), ("test", test))
    t0 = time.perf_counter()
    if args.at == "prompt":
        model, tok = load_model_and_tokenizer(args.model, dtype=torch.bfloat16)
        model.eval()
        xs = {name: extract(model, tok, prompt_texts(rs, tok, args.prompt_style), layers, args.batch_size)
              for name, rs in parts}
        ok = {name: np.ones(len(rs), dtype=bool) for name, rs in parts}
        own: dict[str, list[str | None]] = {}
    else:  # generation runs in bf16 autocast on float32 weights, as she eval does
        model, tok = load_model_and_tokenizer(args.model)
        xs, ok, own, own_probs = {}, {}, {}, {}
        for name, rs in parts:
            xs[name], ok[name], own[name], own_probs[name] = verdict_features(model, tok, rs, args.model,
                                                                              args.batch_size, args.max_new_tokens)
        layers = ["verdict"]
    seconds = time.perf_counter() - t0
    scaler = StandardScaler().fit(xs["train"][ok["train"]])
    xs = {k: scaler.transform(v) for k, v in xs.items()}
    y = [labels.index(r.label) for r, good in zip(train, ok["train"]) if good]

    def fit(c: float):
        return LogisticRegression(C=c, max_iter=2000).fit(xs["train"][ok["train"]], y)

    def probs(clf, x, good) -> list[dict[str, float] | None]:
        return [dict(zip(labels, map(float, p))) if g else None for p, g in zip(clf.predict_proba(x), good)]

    def argmax(ps, name: str, offsets: dict[str, float] | None = None) -> list[str | None]:
        """The probe's label (with ``offsets``: calibrated); a pair without a verdict keeps the model's own answer."""
        return [own[name][i] if p is None else apply_offsets(p, max(p, key=p.get), offsets) for i, p in enumerate(ps)]

    val_gold = [r.label for r in val]
    scores = {}
    for c in C_GRID:
        scores[c] = classification_report(val_gold, argmax(probs(fit(c), xs["validation"], ok["validation"]),
                                                           "validation"), labels)["macro_f1"]
    best = max(C_GRID, key=lambda c: scores[c])
    clf = fit(best)
    pv = probs(clf, xs["validation"], ok["validation"])
    keep = [i for i, p in enumerate(pv) if p is not None]
    val_raw = argmax(pv, "validation")
    offsets = fit_label_offsets([pv[i] for i in keep], [val_raw[i] for i in keep], [val_gold[i] for i in keep], labels)
    pt = probs(clf, xs["test"], ok["test"])
    gold, groups = [r.label for r in test], [r.query for r in test]
    print(f"{args.model}: at {args.at}, layers {layers}, {len(train)} training pairs (label-balanced), {len(val)} "
          f"validation, {len(test)} test pairs ({len(set(groups))} queries); features {xs['train'].shape[1]} in "
          f"{seconds:.0f} s; without a verdict (train/validation/test): "
          f"{'/'.join(str(int((~v).sum())) for v in ok.values())}; "
          f"C by validation Macro F1 {', '.join(f'{c}: {s:.3f}' for c, s in scores.items())} -> {best}; "
          f"offsets {offsets}")
    rows = [("probe, raw", argmax(pt, "test")), ("probe, calibrated", argmax(pt, "test", offsets))]
    if own:  # the same run's baseline: the model's label, raw and with offsets fitted on the same validation pairs
        vi = [i for i, p in enumerate(own_probs["validation"]) if p is not None]
        own_off = fit_label_offsets([own_probs["validation"][i] for i in vi], [own["validation"][i] for i in vi],
                                    [val_gold[i] for i in vi], labels)
        rows.append(("the model's own generated label", own["test"]))
        rows.append((f"the model's label, offsets {own_off}",
                     [apply_offsets(p, lab, own_off) for p, lab in zip(own_probs["test"], own["test"])]))
    if args.out:
        import json
        from pathlib import Path

        cal, raw = rows[1][1], rows[0][1]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r, p, lab, rl in zip(test, pt, cal, raw):
                f.write(json.dumps({"id": r.id, "gold": r.label, "label": lab, "raw_label": rl, "probs": p}) + "\n")
    for name, pred in rows:
        print(f"{name:<20} {f1_summary(gold, pred, labels, groups)}")


if __name__ == "__main__":
    main()
