"""Where greedy judgement decoding spends its time: the prompts' forward passes against the one-token steps, per arm.

`she eval` decodes with she.models.greedy.greedy_generate (docs/benchmarks.md, "Greedy judgements"). This script runs
it on the prompts `she eval` would build for ``--pairs`` records (ordered by token count, batches of
``--batch-size``), in the same contexts (bf16 autocast, she.models.generation.fast_decoding), one arm after the other
and in alternating order each repetition (the first is a warm-up), and reports per arm: the wall, new tokens/s, the
seconds spent in prompt passes (every forward call of more than one token, the shared prefix's included), the
prompt tokens those passes computed (padding included), the one-token steps and the row-steps they ran. Arms:

* ``generate`` -- ``model.generate`` on left-padded rows (SHE_GREEDY=generate);
* ``she[:share|noshare][:FRACTION|never]`` -- the loop, with or without the shared prefix (default ``share``) and
  ``retire_fraction`` FRACTION (default 0.25) or no retirement.

Usage:
  python scripts/bench_greedy.py --model runs/compare-synthetic-noisy/sft/final --pairs 128 --batch-size 32 \\
      --max-new-tokens 64 --arms generate,she:noshare:never,she --reps 3
  python scripts/bench_greedy.py --tiny     # a smoke run on a tiny random model and synthetic data
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _bench import add_common_args, bench_records, report  # noqa: E402 - scripts/_bench.py, next to this file


def parse_arm(arm: str) -> dict:
    """``generate`` or ``she[:share|noshare][:FRACTION|never]`` as greedy_generate's keyword arguments."""
    parts = arm.split(":")
    if parts == ["generate"]:
        return {"engine": "generate"}
    if parts[0] != "she" or len(parts) > 3:
        raise ValueError(f"unknown arm {arm!r}: generate or she[:share|noshare][:FRACTION|never]")
    kw = {"engine": "she", "share_prefix": True, "retire_fraction": 0.25}
    for part in parts[1:]:
        if part in ("share", "noshare"):
            kw["share_prefix"] = part == "share"
        elif part == "never":
            kw["retire_fraction"] = None
        else:
            kw["retire_fraction"] = float(part)
    return kw


def timed(fn, calls: list, min_tokens: int, busy: list):
    """``fn`` recording (seconds, input tokens) of its calls whose ``input_ids`` have ``min_tokens`` or more a row and
    that no other timed call encloses (``busy``: the timed calls open, shared by the wrappers)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        busy.append(1)
        t = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            busy.pop()
        shape = kwargs["input_ids"].shape
        if shape[1] >= min_tokens and not busy:
            calls.append((time.perf_counter() - t, shape[0] * shape[1]))
        return out
    return wrapper


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--arms", default="generate,she")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the first is a warm-up")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.reps < 2:
        p.error("--reps must be >= 2: the first repetition is a warm-up and is not counted")
    arms = [a.strip() for a in args.arms.split(",")]
    try:
        kws = {a: parse_arm(a) for a in arms}
    except ValueError as e:
        p.error(str(e))
    records = bench_records(p, args, args.pairs)

    import torch

    from she.models.generation import fast_decoding
    from she.models.greedy import greedy_generate
    from she.models.metadata import autocast, model_step_schema, prompt_style_of
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.prompts import build_messages
    from she.reasoning.schema import schema_for

    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    schema, style = model_step_schema(args.model, "hd3"), prompt_style_of(args.model)
    prompts = [tok.apply_chat_template(build_messages(r, style=style, schema=schema_for(schema, r.taxonomy)),
                                       tokenize=False, add_generation_prompt=True) for r in records]
    rows = sorted(tok(prompts, add_special_tokens=False)["input_ids"], key=len)  # as generate_judgements orders them
    batches = [rows[s:s + args.batch_size] for s in range(0, len(rows), args.batch_size)]

    prompt_calls: list = []  # (seconds, tokens) of every forward call of more than one token
    busy: list = []
    model.forward = timed(model.forward, prompt_calls, 2, busy)  # under fast_decoding's lean step: prompts only
    model.base_model.forward = timed(model.base_model.forward, prompt_calls, 1, busy)  # the loop's shared prefix
    stats: dict[str, list] = {a: [] for a in arms}
    device = next(model.parameters()).device
    with torch.no_grad(), fast_decoding(model, pack=args.bf16), autocast(args.bf16, device):
        for rep in range(args.reps):
            for arm in (arms if rep % 2 == 0 else arms[::-1]):
                prompt_calls.clear()
                t = time.perf_counter()
                outs = [greedy_generate(model, b, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **kws[arm]) for b in batches]
                wall = time.perf_counter() - t
                eos = tok.eos_token_id
                new = sum(len(x) - (x[-1] == eos) for o in outs for x in o.tokens if x)  # as she eval counts
                row = {"seconds": wall, "new_tokens": new, "prompt_seconds": sum(c[0] for c in prompt_calls),
                       "prompt_tokens": sum(c[1] for c in prompt_calls),
                       "steps": sum(len(o.step_rows) - 1 for o in outs),
                       "row_steps": sum(len(r) for o in outs for r in o.step_rows[1:])}
                if rep:
                    stats[arm].append(row)
                print(f"rep {rep} {arm}: {wall:.1f} s, {new / wall:.1f} new tokens/s, prompt passes "
                      f"{row['prompt_seconds']:.1f} s ({row['prompt_tokens']} tokens), {row['steps']} steps, "
                      f"{row['row_steps']} row-steps", flush=True)
    del model.forward, model.base_model.forward
    out = {}
    for arm, runs in stats.items():
        secs = statistics.median(r["seconds"] for r in runs)
        out[arm] = {**{k: v for k, v in runs[0].items() if k in ("new_tokens", "prompt_tokens", "steps", "row_steps")},
                    "seconds": secs, "tokens_per_s": runs[0]["new_tokens"] / secs,
                    "prompt_seconds": statistics.median(r["prompt_seconds"] for r in runs),
                    "seconds_each": [r["seconds"] for r in runs]}
    report(args, pairs=len(records), batch_size=args.batch_size, arms=out)


if __name__ == "__main__":
    main()
