#!/usr/bin/env python
"""Time SRPO optimizer steps on 1 vs N processes with the same global batch.

    python scripts/bench_distributed.py --model tiny --steps 5
    python scripts/bench_distributed.py --model runs/sft/final --steps 20 --processes 1,2 \
        --accelerate-config configs/accelerate/cpu-ddp-2proc.yaml --global-batch 16 --max-completion-length 80
    python scripts/bench_distributed.py --model Qwen/... --processes 1,4,8 \
        --accelerate-config configs/accelerate/gpu-ddp.yaml --bf16          # on a GPU node

Each layout runs ``she train srpo`` in a fresh subprocess (1 process: ``python -m she.cli``; more:
``accelerate launch --config_file CONFIG --num_processes N -m she.cli``) with ``per_device_batch_size =
global_batch / N``, so every layout does the same work per step. Per-step times are TRL's ``step_time``
from ``log_history.json`` (generation + scoring + forward/backward + optimizer, without process start-up and
model loading); the first step is reported but left out of the mean (warm-up). Prints a table and,
with ``--json-out``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ACC = ROOT / "configs" / "accelerate" / "cpu-ddp-2proc.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registered name or save_pretrained folder (default: tiny)")
    p.add_argument("--data", default=None, help="data file (default: a synthetic set written to the work dir)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per layout")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--accelerate-config", default=str(DEFAULT_ACC), help="accelerate config for N > 1")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8, help="completions per optimizer step, all processes")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--layout-invariant-sampling", action="store_true",
                   help="identical rollouts on every layout (fair when completion lengths vary a lot)")
    p.add_argument("--work-dir", default=None, help="keep runs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per layout before it is killed")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> int:
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
            proc.wait()
            return -9


def run_layout(n: int, a: argparse.Namespace, work: Path, data: Path) -> dict:
    if a.global_batch % n:
        raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {n} processes")
    out = work / f"p{n}"
    cfg = work / f"p{n}.yaml"
    cfg.write_text(
        f"num_generations: {a.num_generations}\nper_device_batch_size: {a.global_batch // n}\n"
        f"max_steps: {a.steps}\nmax_completion_length: {a.max_completion_length}\nbf16: {str(a.bf16).lower()}\n"
        f"report_to: none\nsave_steps: {a.steps + 10**6}\nresume: false\nlogging_steps: 1\n"
        f"layout_invariant_sampling: {str(a.layout_invariant_sampling).lower()}\n"
    )
    she = ["-m", "she.cli", "train", "srpo", "--config", str(cfg), "--model", a.model, "--data", str(data),
           "--output-dir", str(out)]
    if n == 1:
        cmd = [sys.executable, *she]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", a.accelerate_config,
               "--num_processes", str(n), *she]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    rc = _run(cmd, env, a.timeout, work / f"p{n}.log")
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (work / f"p{n}.log").read_text()[-3000:]
        raise SystemExit(f"{n} process(es): exit status {rc}; log {work / f'p{n}.log'}:\n{tail}")
    hist = json.loads((out / "log_history.json").read_text())
    times = [h["step_time"] for h in hist if "step_time" in h]
    steady = times[1:] or times
    return {"processes": n, "per_device_batch_size": a.global_batch // n, "step_times_s": times,
            "mean_step_s_after_first": statistics.fmean(steady), "median_step_s": statistics.median(times),
            "wall_s": wall, "reward": [h.get("reward") for h in hist if "step_time" in h]}


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    counts = [int(x) for x in a.processes.split(",") if x.strip()]
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="she-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data) if a.data else work / "data.jsonl"
    if not a.data:
        subprocess.run([sys.executable, "-m", "she.cli", "data", "generate", "--out", str(data), "--queries", "40"],
                       check=True, stdout=subprocess.DEVNULL)
    results = [run_layout(n, a, work, data) for n in counts]
    base = results[0]["mean_step_s_after_first"]
    print(f"model={a.model} steps={a.steps} global_batch={a.global_batch} G={a.num_generations} "
          f"max_completion_length={a.max_completion_length} work_dir={work}")
    print(f"{'procs':>5} {'per-dev':>7} {'mean s/step (after 1st)':>24} {'speedup':>8} {'wall s':>7}  per-step s")
    for r in results:
        steps = " ".join(f"{t:.3f}" for t in r["step_times_s"])
        print(f"{r['processes']:>5} {r['per_device_batch_size']:>7} {r['mean_step_s_after_first']:>24.3f} "
              f"{base / r['mean_step_s_after_first']:>8.2f} {r['wall_s']:>7.1f}  {steps}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
