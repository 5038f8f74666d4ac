"""The computed read's speed (``evidence: computed`` on the decision schema): one packed pass a pair against one pass
a text, from one process.

The computed read forces a pair's computed evidence, reads ``P(Relevant = v)`` at the stem's end and ``P(label |
Relevant = v)`` after each value (she.evaluation.fast.marginal_reads). ``shared_prefix=False`` runs ``1 + |values|``
forward passes a pair (three on the decision schema); the default packs the stem and its branches into one sequence
over the shared stem (she.models.prefix_tree). Every RL row of a comparison pays this read twice (calibration pairs
and test pairs). Each repetition runs both arms on the same pairs in alternating order; the first repetition is a
warm-up. ``max_abs_diff`` is the largest difference of any probability between the arms (bf16 rounding).

Usage:
  python scripts/bench_read.py --model runs/best-cpu/sft/final \\
      --data ../shared/data/home-depot-product-search-relevance/train.csv --format home-depot --pairs 192
  python scripts/bench_read.py --tiny     # a smoke run on a tiny random model and synthetic data
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _bench import add_common_args, bench_records, report  # noqa: E402 - scripts/_bench.py, next to this file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=2, help="repetitions; the first is a warm-up")
    add_common_args(p)
    args = p.parse_args(argv)
    records = bench_records(p, args, args.pairs)

    from she.evaluation.fast import marginal_reads
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import computed_stem
    from she.reasoning.schema import resolve_schema

    model, tok = load_model_and_tokenizer(args.model)
    schema = resolve_schema("decision", records[0].taxonomy)
    stems = [tok.apply_chat_template(build_messages(r, style=args.prompt_style, schema=schema), tokenize=False,
                                     add_generation_prompt=True) + computed_stem(r, schema) for r in records]
    arms = {"per_text": False, "packed": True}
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    reads = {}
    for rep in range(args.reps):
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            t0 = time.perf_counter()
            reads[name] = marginal_reads(model, tok, stems, schema, batch_size=args.batch_size, bf16=args.bf16,
                                         shared_prefix=arms[name])
            if rep > 0 or args.reps == 1:
                seconds[name].append(time.perf_counter() - t0)
            print(f"rep {rep} {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    diff = max(abs(a[k] - b[k]) for (d1, p1), (d2, p2) in zip(reads["packed"], reads["per_text"])
               for a, b in ((d1, d2), (p1, p2)) for k in a)
    mean = {a: statistics.mean(s) for a, s in seconds.items()}
    report(args, seconds=mean, pairs_per_s={a: len(records) / s for a, s in mean.items()},
           ratio_packed_over_per_text=mean["packed"] / mean["per_text"], max_abs_diff=diff)


if __name__ == "__main__":
    main()
