"""What the RL benchmark scripts (bench_srpo.py, bench_rollouts.py) share: their common flags and their records."""

from __future__ import annotations

import argparse
import os
import random


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: the model and data (see :func:`bench_records`), precision, seed, output."""
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="data file (default: synthetic)")
    p.add_argument("--format", default="auto")
    p.add_argument("--prompt-style", default="compact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random model, synthetic data")
    p.add_argument("--json", default=None, help="also write the result as JSON here")


def bench_records(p: argparse.ArgumentParser, args: argparse.Namespace, n: int | None) -> list:
    """``n`` records: a seeded sample of ``--data`` (format ``--format``; all of them for ``n=None``), or the
    synthetic generator's (64 for ``n=None``); with
    ``--tiny`` the tiny random model becomes ``args.model`` (and ``args.judge`` where the script has one)."""
    from she.data.synthetic import generate

    if args.tiny:
        from she.models.registry import prepare

        args.model = str(prepare("tiny"))
        if hasattr(args, "judge"):
            args.judge = args.model
    if args.model is None:
        p.error("--model is required (or --tiny)")
    if args.data:
        from she.data.loaders import load_records

        recs, _ = load_records(args.data, args.format)
        return recs if n is None else random.Random(args.seed).sample(recs, min(n, len(recs)))
    n = 64 if n is None else n
    return generate(n_queries=max(8, n // 4), products_per_query=4, seed=args.seed)[:n]


def report(args: argparse.Namespace, **fields) -> dict:
    """Print the result as JSON (with the command, machine and thread count) and write it to ``--json`` if given."""
    import json
    import platform
    import sys

    import torch

    out = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.platform(),
           "threads": torch.get_num_threads(), "args": vars(args), **fields}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


DECODING_ARMS = ("plain", "packed", "fast")  # transformers' decoding; points 4-6 (session 47); 4-7 (the default)


def set_decoding_arm(arm: str) -> None:
    """The environment switches of she.models.generation.fast_decoding for one arm: ``plain`` (SHE_DECODING=plain),
    ``packed`` (its attention, cache and packed layers, transformers' step: SHE_DECODE_STEP=transformers) or
    ``fast`` (all of it, with she.models.decode_step's lean step)."""
    if arm not in DECODING_ARMS:
        raise ValueError(f"unknown decoding arm {arm!r}; choose from {', '.join(DECODING_ARMS)}")
    os.environ["SHE_DECODING"] = "plain" if arm == "plain" else "fast"
    os.environ["SHE_DECODE_STEP"] = "lean" if arm == "fast" else "transformers"
