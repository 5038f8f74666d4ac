"""Rollout generation as GRPO/SRPO runs it, three ways, from one process (docs/benchmarks.md, "Rollout generation").

The model is prepared by accelerate for bf16 training, as TRL's trainer has it (its ``forward`` carries its own
autocast), and samples G rollouts for each of P prompts (temperature 1, no top-k/top-p: TRL's defaults), left
padded, with a KV cache:

  trl        ``model.generate`` as TRL calls it: each forward its own autocast region, ``torch.multinomial``
  cached     the same inside one bf16 autocast region (she.models.generation.generation_autocast): the weights'
             bf16 casts made once a call instead of once a token
  cached+fast  the same, sampling by inversion (she.models.generation.fast_sampling)
  shared     cached+fast with the prompt's forward pass made once per group of G rollouts
             (she.models.generation.shared_prefill, rl.rollout_prefill: shared, the default since session 20)
  static     cached+fast with a static KV cache (``cache_implementation="static"``: preallocated to prompt +
             max new tokens, fixed shapes)
  static+compiled  the same with the decoding forward compiled by TorchInductor (transformers' CompileConfig,
             mode "default", forced on a CPU with ``_compile_all_devices``); its compile lands in the warm-up
  shared+attn  shared with every one-token query on SDPA's stacked-heads path, never its grouped-query kernel
             (she.models.generation.decode_attention)
  shared+grow  shared with the KV cache grown into spare room instead of concatenated at every token
             (she.models.generation.growing_cache)
  shared+packed  shared with every linear layer on a bf16 weight packed once a call (she.models.generation.
             packed_linears)
  shared+decoding  shared with all three (points 4-6 of she.models.generation.fast_decoding, session 47)
  shared+lean  shared+decoding with the one-token steps computed by she.models.decode_step's lean decoder (fused
             packed projections, no module stack, float32 attention scores; fast_decoding's default since session
             48)

``--variants`` picks which run (default: the first three). Variants alternate inside every repetition, each from
the same seed, so drift of a shared CPU hits all of them; the first repetition is a warm-up and is not counted.
``trl`` and ``cached`` must produce the same tokens (printed as ``identical``); ``cached+fast`` draws from the same
distribution with another random stream.

Usage:
  python scripts/bench_rollouts.py --model runs/hd-sft-decision-3k/sft/final \\
      --data ../shared/data/home-depot-product-search-relevance/train.csv --format home-depot --prompts 4 --group 8
  python scripts/bench_rollouts.py --tiny    # a smoke run on a tiny random model and synthetic data
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _bench import add_common_args, bench_records, report  # noqa: E402 - scripts/_bench.py, next to this file

VARIANTS = ("trl", "cached", "cached+fast", "shared", "static", "static+compiled", "shared+attn", "shared+grow",
            "shared+packed", "shared+decoding", "shared+lean")
DEFAULT_VARIANTS = "trl,cached,cached+fast"


def prepared_model(path: str, bf16: bool):
    from accelerate import Accelerator

    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path)
    tok.padding_side = "left"
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=True)
    model = acc.prepare(model)
    model.eval()
    return model, tok


def prompt_batch(tok, records, schema, style: str, group: int):
    from she.reasoning.prompts import build_messages
    from she.training.gold_prob import chat_prompt_ids

    ids = chat_prompt_ids(tok, [build_messages(r, schema=schema, style=style) for r in records])
    ids = [x for x in ids for _ in range(group)]  # TRL repeats each prompt G times, next to each other
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def generate_once(model, tok, input_ids, mask, variant: str, max_new: int, seed: int, bf16: bool):
    from transformers import GenerationConfig

    from she.models.decode_step import lean_decoding
    from she.models.generation import (decode_attention, fast_sampling, generation_autocast, growing_cache,
                                       packed_linears, shared_prefill)

    extra = {}
    if variant.startswith("static"):
        extra["cache_implementation"] = "static"
    if variant == "static+compiled":
        from transformers import CompileConfig

        cc = CompileConfig(mode="default")
        cc._compile_all_devices = True
        extra["compile_config"] = cc
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad(), generation_autocast(bf16 and variant != "trl", "cpu"), \
            fast_sampling(variant not in ("trl", "cached")), shared_prefill(model, variant.startswith("shared")), \
            decode_attention(model, variant.endswith(("+attn", "+decoding", "+lean"))), \
            growing_cache(variant.endswith(("+grow", "+decoding", "+lean"))), \
            packed_linears(model, variant.endswith(("+packed", "+decoding", "+lean"))), \
            lean_decoding(model, variant.endswith("+lean")):
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
    seconds = time.perf_counter() - t0
    completion = out[:, input_ids.size(1):]
    eos = completion == tok.eos_token_id
    # new tokens up to and with the first EOS (what TRL keeps), else the whole row
    lengths = torch.where(eos.any(1), eos.int().argmax(1) + 1, torch.full_like(eos[:, 0], completion.size(1),
                                                                            dtype=torch.long))
    return seconds, int(lengths.sum()), completion


def greedy_check(model, tok, input_ids, mask, max_new: int, bf16: bool) -> dict:
    """Greedy decoding with and without the shared prefill on one batch: the share of rows whose tokens are equal
    and the largest difference of a first-step logit (the prompt's last token is computed after the cached rest
    instead of with it, so bf16 rounds differently; in float32 the tiny-model tests find them equal)."""
    from transformers import GenerationConfig

    from she.models.generation import generation_autocast, shared_prefill_generate

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), generation_autocast(bf16, "cpu"):
        plain = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
        shared = shared_prefill_generate(model, input_ids, mask, generation_config=cfg)
    same_len = plain.sequences.size(1) == shared.sequences.size(1)
    rows_equal = (plain.sequences == shared.sequences).all(1).float().mean().item() if same_len else float("nan")
    return {"new_tokens": max_new, "rows_equal": rows_equal,
            "first_step_max_abs_logit_diff": (plain.scores[0] - shared.scores[0]).abs().max().item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--reps", type=int, default=3, help="repetitions; the first is a warm-up")
    p.add_argument("--n-records", type=int, default=None, help="records the prompts are drawn from (default: all)")
    p.add_argument("--check-shared", type=int, default=0, metavar="N",
                   help="first compare N greedy new tokens of the plain call and of the shared prefill on the first "
                        "batch (rows equal, largest first-step logit difference), then benchmark")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    add_common_args(p)
    args = p.parse_args(argv)

    from she.models.metadata import model_step_schema

    recs = bench_records(p, args, args.n_records)
    model, tok = prepared_model(args.model, args.bf16)
    schema = model_step_schema(args.model, recs[0].taxonomy)
    rng = random.Random(args.seed)

    if args.reps < 2:
        p.error("--reps must be >= 2 (the first is a warm-up and is not counted)")
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    base = variants[0]
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    checks = {}
    if args.check_shared:
        ids, mask = prompt_batch(tok, random.Random(args.seed).sample(recs, args.prompts), schema, args.prompt_style,
                                 args.group)
        checks["shared_vs_plain_greedy"] = greedy_check(model, tok, ids, mask, args.check_shared, args.bf16)
        print(checks, flush=True)
    identical: list[bool] = []
    same_draw: dict[str, list[bool]] = {}  # against cached+fast (else shared): equal unless rounding moves a token
    for rep in range(args.reps):
        input_ids, mask = prompt_batch(tok, rng.sample(recs, args.prompts), schema, args.prompt_style, args.group)
        seed = args.seed + rep
        outs = {}
        for v in variants:
            s, n, completion = generate_once(model, tok, input_ids, mask, v, args.max_new_tokens, seed, args.bf16)
            outs[v] = completion
            print(f"rep {rep} {v}: {s:.2f} s, {n} new tokens, {n / s:.1f} tokens/s"
                  + (" (warm-up)" if rep == 0 else ""), flush=True)
            if rep > 0:
                rows[v].append({"seconds": s, "tokens": n})
        if "trl" in outs and "cached" in outs:
            identical.append(bool(torch.equal(outs["trl"], outs["cached"])))
        ref = "cached+fast" if "cached+fast" in outs else "shared"  # the same seed: the same draws up to rounding
        for v in outs:
            if v != ref and ref in outs and (v in ("shared", "static") or v.startswith("shared+")):
                same_draw.setdefault(v, []).append(bool(torch.equal(outs[ref], outs[v])))
    agg = {}
    for v, rs in rows.items():
        sec = sum(r["seconds"] for r in rs)
        tokens = sum(r["tokens"] for r in rs)
        agg[v] = {"seconds_per_call": statistics.mean(r["seconds"] for r in rs), "new_tokens_per_s": tokens / sec,
                  "mean_new_tokens": tokens / len(rs)}
    # per-repetition ratios of seconds per new token against the first variant (lengths differ with the draws)
    ratios = {v: [(t["seconds"] / t["tokens"]) / (b["seconds"] / b["tokens"]) for b, t in zip(rows[base], rows[v])]
              for v in variants[1:]}
    report(args, mean=agg, **{f"time_per_token_vs_{base}": ratios}, trl_and_cached_identical=identical,
           identical_to_reference_draw=same_draw, **checks)


if __name__ == "__main__":
    main()
