"""`she eval`'s generation (greedy judgements with the verdict read) at several batch sizes, from one process.

The evaluation of a reasoning judge is greedy decoding of its steps and verdict, ``batch`` pairs at a time, the
pairs sorted by prompt length (she.evaluation.generate.generate_judgements: float32 weights inside one bf16
autocast region, the verdict's label logits re-read in float32). Every RL row of a comparison pays it twice (the
calibration's validation pairs and the test pairs), so its speed is a share of every experiment's wall time.

Each repetition runs every batch size on the same ``--pairs`` pairs, in alternating order, so drift of a shared CPU
hits all of them; the first repetition is a warm-up and is not counted. New tokens are the judgements' own (up to
their end of sequence, as ``she eval``'s ``metrics.json`` counts them). The judgements must be the same at every
batch size up to bf16 rounding of the padded batches: the share of identical labels is printed (``agree``).

Usage:
  python scripts/bench_eval.py --model runs/hd-sft-decision-3k/sft/final \\
      --data ../shared/data/home-depot-product-search-relevance/train.csv --format home-depot --pairs 256 \\
      --batch-sizes 32,64,128
  python scripts/bench_eval.py --tiny     # a smoke run on a tiny random model and synthetic data
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _bench import (  # noqa: E402 - scripts/_bench.py, next to this file
    DECODING_ARMS, add_common_args, bench_records, report, set_decoding_arm)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=2, help="repetitions; the first is a warm-up")
    p.add_argument("--decoding", default="fast",
                   help="comma-separated arms, from fast (she.models.generation.fast_decoding with the lean "
                        "step, the default since session 48), packed (its session-47 form: attention, cache and "
                        "packed layers, transformers' step) and plain (transformers' attention, cache and linear "
                        "layers): each batch size runs once per arm, the arms alternating")
    p.add_argument("--engines", default="she",
                   help="comma-separated greedy engines (she.models.greedy, SHE_GREEDY): she (the default since "
                        "session 49: the batch's shared prompt prefix run once, ended rows retired) and generate "
                        "(model.generate); each batch size and decoding arm runs once per engine, alternating")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.reps < 2:
        p.error("--reps must be >= 2: the first repetition is a warm-up and is not counted")
    arms = [a.strip() for a in args.decoding.split(",")]
    if unknown := [a for a in arms if a not in DECODING_ARMS]:
        p.error(f"unknown --decoding arms {unknown}; choose from {', '.join(DECODING_ARMS)}")
    engines = [e.strip() for e in args.engines.split(",")]
    from she.models.greedy import GREEDY_ENGINES

    if unknown := [e for e in engines if e not in GREEDY_ENGINES]:
        p.error(f"unknown --engines {unknown}; choose from {', '.join(GREEDY_ENGINES)}")
    sizes = [(int(b), a, e) for b in args.batch_sizes.split(",") for a in arms for e in engines]
    records = bench_records(p, args, args.pairs)

    from she.evaluation.generate import generate_judgements
    from she.models.metadata import model_step_schema, prompt_style_of
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    schema = model_step_schema(args.model, "hd3")
    style = prompt_style_of(args.model)
    times: dict[tuple, list[float]] = {b: [] for b in sizes}
    tokens: dict[tuple, int] = {}
    labels: dict[tuple, list] = {}
    for rep in range(args.reps):
        for key in (sizes if rep % 2 == 0 else sizes[::-1]):
            b, arm, engine = key
            set_decoding_arm(arm)
            os.environ["SHE_GREEDY"] = engine
            t = time.perf_counter()
            js = generate_judgements(model, tok, records, batch_size=b, max_new_tokens=args.max_new_tokens,
                                     bf16=args.bf16, progress=False, schema=schema, prompt_style=style)
            dt = time.perf_counter() - t
            if rep:
                times[key].append(dt)
            tokens[key] = sum(j.n_new_tokens for j in js)
            labels[key] = [j.label for j in js]
            print(f"rep {rep} batch {b} {arm} {engine}: {dt:.1f} s, {tokens[key] / dt:.1f} new tokens/s", flush=True)
    base = sizes[0]
    rows = {}
    for b in sizes:
        secs = statistics.median(times[b])
        rows[" ".join(map(str, b))] = {"seconds": secs, "new_tokens": tokens[b], "tokens_per_s": tokens[b] / secs,
                        "pairs_per_s": len(records) / secs,
                        "speedup_vs_first": statistics.median(times[base]) / secs,
                        "agree": sum(x == y for x, y in zip(labels[b], labels[base])) / len(records)}
    report(args, pairs=len(records), batches=rows)


if __name__ == "__main__":
    main()
