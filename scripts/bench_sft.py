"""SFT throughput before and after the CPU levers, same config and data, one variant after the other.

Variants (each a fresh `she train sft` run of ``--steps`` optimiser steps into ``<out>/<variant>``):
  before          glibc's default allocator (SHE_MALLOC=system) and TRL's gradient checkpointing (on)
  tuned           she's allocator settings (she/runtime.py), no gradient checkpointing (the defaults now)
  tuned+grouped   the same with length-grouped batches (train_sampling_strategy: group_by_length)
  all_positions   tuned+grouped with TRL's fused LM head projecting every position, prompt and padding included
                  (SHE_LM_HEAD_POSITIONS=all: TRL's CPU path; the default projects the completion positions only,
                  she.training.lm_head)
  compiled        tuned+grouped with torch_compile (TorchInductor) and lengths padded to a multiple of 16, so
                  that a handful of batch shapes is compiled once each

For each: trained tokens/s (TRL's ``num_tokens`` over ``train_runtime``, model load excluded), the logged
losses (same data and seed: the curves should agree within noise; grouping changes the batch order), and
MFU against ``--peak-gflops`` (bf16 peak at the model's shapes from scripts/bench_peak.py) when given.
``--marginal-from N`` adds the steady-state rate: tokens trained between the first log at or after step N and
the last one, over the wall time between them (the SFT trainer logs ``wall_s``), so a one-off compile or
warm-up is left out. Use ``--logging-steps`` small enough to have entries there.

Usage:
  python scripts/bench_sft.py --config CONFIG.yaml --steps 20 --peak-gflops 2500 --out runs/bench-sft
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "before": ({"SHE_MALLOC": "system"}, ["--gradient_checkpointing", "true"]),
    "tuned": ({}, []),
    "tuned+grouped": ({}, ["--train_sampling_strategy", "group_by_length"]),
    "all_positions": ({"SHE_LM_HEAD_POSITIONS": "all"}, ["--train_sampling_strategy", "group_by_length"]),
    "compiled": ({}, ["--train_sampling_strategy", "group_by_length", "--torch_compile", "true",
                      "--pad_to_multiple_of", "16"]),
}
PARAMS = 134_515_008  # SmolLM2-135M


def mfu(tokens_per_s: float, peak_gflops: float) -> float:
    """Model FLOP/s (6 N per trained token) as a share of the measured bf16 peak."""
    return round(6 * PARAMS * tokens_per_s / (peak_gflops * 1e9), 4)


def marginal_rate(hist: list[dict], from_step: int) -> tuple[float, int] | None:
    """(tokens/s, steps) between the first training log at or after ``from_step`` and the last one, from the
    logged ``num_tokens`` and ``wall_s``; None when fewer than two such entries exist."""
    logs = [h for h in hist if "wall_s" in h and "num_tokens" in h and h["step"] >= from_step]
    if len(logs) < 2 or logs[-1]["wall_s"] <= logs[0]["wall_s"]:
        return None
    first, last = logs[0], logs[-1]
    rate = (float(last["num_tokens"]) - float(first["num_tokens"])) / (last["wall_s"] - first["wall_s"])
    return rate, last["step"] - first["step"]


def summarise(folder: Path, peak_gflops: float | None, marginal_from: int | None = None) -> dict:
    hist = json.loads((folder / "log_history.json").read_text())
    runtime = next(h["train_runtime"] for h in hist if "train_runtime" in h)
    tokens = max(float(h.get("num_tokens", 0)) for h in hist)
    out = {"train_runtime_s": round(runtime, 1), "tokens": int(tokens), "tokens_per_s": round(tokens / runtime, 1),
           "losses": [round(float(h["loss"]), 4) for h in hist if "loss" in h]}
    if peak_gflops:
        out["mfu"] = mfu(tokens / runtime, peak_gflops)
    if marginal_from is not None and (m := marginal_rate(hist, marginal_from)) is not None:
        out["marginal_tokens_per_s"], out["marginal_steps"] = round(m[0], 1), m[1]
        if peak_gflops:
            out["marginal_mfu"] = mfu(m[0], peak_gflops)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a `she train sft` config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="runs/bench-sft")
    p.add_argument("--peak-gflops", type=float, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--marginal-from", type=int, default=None, metavar="N",
                   help="also report tokens/s from step N on (a compile or warm-up left out)")
    p.add_argument("--logging-steps", type=int, default=None)
    a = p.parse_args()
    res = {}
    for name in a.variants.split(","):
        env_extra, flags = VARIANTS[name]
        folder = Path(a.out) / name.replace("+", "_")
        cmd = [sys.executable, "-m", "she.cli", "train", "sft", "--config", a.config, "--output-dir", str(folder),
               "--max_steps", str(a.steps), "--resume", "false", "--report_to", "none", "--save_steps", "100000",
               *(["--logging_steps", str(a.logging_steps)] if a.logging_steps else []), *flags]
        t0 = time.perf_counter()
        subprocess.run(cmd, env={**os.environ, **env_extra}, check=True, stdout=subprocess.DEVNULL)
        res[name] = {"wall_s": round(time.perf_counter() - t0, 1), **summarise(folder, a.peak_gflops, a.marginal_from)}
        print(name, json.dumps(res[name]), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
