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
  python scripts/bench_peak.py --plain-step runs/hd-sft-decision-3k/sft/final   # + a plain HF training step

``--plain-step MODEL`` also times the reference the SFT figures are judged against: a plain Hugging Face training
step of the model (random token ids, batch x sequence = ``--tokens``, bf16 autocast, loss on every position,
backward, AdamW), no trainer, no data pipeline -- what "plain PyTorch" reaches on this machine (its MFU counts
SmolLM2-135M's parameters: pass that model).
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


def plain_step(model_dir: str, batch: int, seq: int, steps: int, warmup: int = 2) -> dict:
    """Trained tokens/s of a plain HF step (forward with labels, backward, AdamW) in bf16 autocast."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"batch": batch, "seq": seq, "steps": steps, "median_step_s": round(sec, 3),
            "tokens_per_s": round(batch * seq / sec, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=832, help="rows of each matmul (batch x sequence length)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mfu", type=float, default=None, metavar="TOKENS_PER_S",
                   help="also report the MFU of a training throughput (tokens/s)")
    p.add_argument("--mfu-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--plain-step", metavar="MODEL", default=None,
                   help="also time a plain HF training step of this model folder (batch 8 x tokens/8)")
    p.add_argument("--plain-steps", type=int, default=8)
    a = p.parse_args()
    res = measure(a.tokens, a.reps)
    if a.plain_step:
        res["plain_step"] = plain_step(a.plain_step, 8, a.tokens // 8, a.plain_steps)
        res["plain_step"]["mfu"] = round(mfu(res["plain_step"]["tokens_per_s"], res["peak_gflops_bf16"]), 4)
    if a.mfu is not None:
        res["mfu"] = {"tokens_per_s": a.mfu, "dtype": a.mfu_dtype,
                      "mfu": round(mfu(a.mfu, res[f"peak_gflops_{a.mfu_dtype}"]), 4)}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
