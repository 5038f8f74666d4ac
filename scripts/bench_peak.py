"""The machine's measured matmul throughput at the model's shapes: the peak every MFU figure is a share of.

For each linear layer shape of the model (tokens x in_features @ in_features x out_features) it times
``torch.matmul`` in bf16 and fp32 with the process's thread count, takes the median of ``--reps`` timed runs
after warm-up, and reports GFLOP/s (2*M*K*N per matmul). The FLOP-weighted mean over one forward pass's
shapes is the "model-shape peak": the best a plain-PyTorch step of this model could do on this machine.
``--mfu TOKENS_PER_S`` turns a measured training throughput into MFU (6 N FLOPs per token: forward and
backward) against that peak.

Usage:
  python scripts/bench_peak.py                     # SmolLM2-135M shapes, 832 tokens (8 x 104), JSON to stdout
  python scripts/bench_peak.py --tokens 320 --mfu 395 --mfu-dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

# SmolLM2-135M (HF config): hidden 576, intermediate 1536, 30 layers, 9 heads x 64, 3 KV heads, vocab 49152
SMOLLM2_135M = {"hidden": 576, "intermediate": 1536, "layers": 30, "kv_dim": 3 * 64, "vocab": 49152,
                "params": 134_515_008}


def layer_shapes(m: dict) -> list[tuple[str, int, int, int]]:
    """(name, in_features, out_features, count per forward pass) of the model's matmuls."""
    h, i, kv, n = m["hidden"], m["intermediate"], m["kv_dim"], m["layers"]
    return [("q/o proj", h, h, 2 * n), ("k/v proj", h, kv, 2 * n), ("gate/up proj", h, i, 2 * n),
            ("down proj", i, h, n), ("lm head", h, m["vocab"], 1)]


def time_matmul(tokens: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    """Median seconds of one (tokens x k) @ (k x n) matmul."""
    a = torch.randn(tokens, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    inner = max(1, int(2e9 / (2 * tokens * k * n)))  # ~2 GFLOP per timed run, so short shapes are timed too
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure(tokens: int, reps: int, model: dict = SMOLLM2_135M) -> dict:
    out: dict = {"tokens": tokens, "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "shapes": {}}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        flops_total = secs_total = 0.0
        for name, k, n, count in layer_shapes(model):
            s = time_matmul(tokens, k, n, dtype, reps)
            flops = 2 * tokens * k * n
            out["shapes"].setdefault(name, {})[dtype_name] = round(flops / s / 1e9, 1)
            flops_total += flops * count
            secs_total += s * count
        out[f"peak_gflops_{dtype_name}"] = round(flops_total / secs_total / 1e9, 1)
    return out


def mfu(tokens_per_s: float, peak_gflops: float, params: int = SMOLLM2_135M["params"]) -> float:
    """Model FLOP/s (6 N per trained token) as a share of the measured peak."""
    return 6 * params * tokens_per_s / (peak_gflops * 1e9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=832, help="rows of each matmul (batch x sequence length)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mfu", type=float, default=None, metavar="TOKENS_PER_S",
                   help="also report the MFU of a training throughput (tokens/s)")
    p.add_argument("--mfu-dtype", choices=("bf16", "fp32"), default="bf16")
    a = p.parse_args()
    res = measure(a.tokens, a.reps)
    if a.mfu is not None:
        res["mfu"] = {"tokens_per_s": a.mfu, "dtype": a.mfu_dtype,
                      "mfu": round(mfu(a.mfu, res[f"peak_gflops_{a.mfu_dtype}"]), 4)}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
