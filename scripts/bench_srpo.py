"""SRPO vs vanilla GRPO step time, from one process, with a breakdown of where the time goes.

Both trainers get the same policy, prompts, batch, group size, seed and generation settings; the only
difference is ``step_rewards`` (and, for SRPO, the examiner: ``--examiner verifier|hybrid|blend``, where
hybrid/blend also run the generative judge). Runs alternate (GRPO, SRPO, SRPO, GRPO, ...) so slow drift
of a shared CPU hits both. The first step of every run is a warm-up and is excluded.

Breakdown per optimisation step (seconds, mean over measured steps):
  generation        TRL's ``_generate`` (sampling the rollouts)
  score_total       ``_generate_and_score_completions`` minus generation: old/ref log-probs, rewards,
                    and for SRPO the examiner, segmentation and advantage math
  reference         the reference/old-policy forward passes inside scoring (``_get_per_token_logps_and_entropies``
                    called under no_grad)
  examiner          the whole examiner (verifier + judge)
  judge             the judge's one forward pass per rollout batch
  policy_fwd_bwd    the rest of the step: the policy's forward and backward and the optimiser

``--compare lm_head`` times two GRPO arms instead: TRL's fused LM head projecting every position (TRL's CPU
path) against only the completion positions (she.training.lm_head, the default); the same values, so the same
training.

``--compare logp_prefix`` times GRPO with every rollout scored as its own row (TRL's) against the rollouts of a
prompt packed over one shared prompt (``rl.logp_prefix: shared``, she.models.prefix_tree): the same values up to
matmul rounding; the difference is in ``policy_fwd_bwd`` and ``reference`` (with ``--beta`` > 0).

``--compare decoding`` times GRPO with transformers' attention, KV cache and linear layers in the rollouts'
decoding (``SHE_DECODING=plain``) against she.models.generation.fast_decoding (the default since session 47): the
same distribution (the packed layers are bit for bit, the attention and cache up to float rounding), so the difference
is in ``generation``. ``--compare lean`` times the session-47 form of fast_decoding (``SHE_DECODE_STEP=transformers``)
against it with she.models.decode_step's lean one-token step (the default since session 48).

``--compare micro_batches`` times GRPO with the step's rollouts through the loss in one pass against
``--micro-batches`` pieces (``rl.loss_micro_batches``: the same update, less activation memory at once); every arm
also reports its peak resident memory (``peak_rss_gb``, VmHWM reset before the arm where the kernel allows it).

Usage:
  python scripts/bench_srpo.py --model runs/hd-sft-bal/sft/final --judge smollm2-135m \
      --data ../shared/data/home-depot-product-search-relevance/train.csv --format home-depot --steps 4 --reps 2
  python scripts/bench_srpo.py --tiny   # a smoke run on a tiny random model and synthetic data
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _bench import (  # noqa: E402 - scripts/_bench.py, next to this file
    add_common_args, bench_records, report, set_decoding_arm)

TIMES: dict[str, float] = defaultdict(float)
_DEPTH: dict[str, int] = defaultdict(int)


@contextmanager
def timed(name: str):
    _DEPTH[name] += 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _DEPTH[name] -= 1
        if _DEPTH[name] == 0:  # re-entrant calls count once
            TIMES[name] += time.perf_counter() - t0


def wrap(obj, attr: str, name: str, only_no_grad: bool = False) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        if only_no_grad and torch.is_grad_enabled():
            return fn(*a, **k)
        with timed(name):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def build_trainer(args, step_rewards: bool, train, out_dir: str, labelled_only: bool = True, micro_batches: int = 1,
                  logp_prefix: str = "per_row"):
    from she.models.registry import load_model_and_tokenizer
    from she.rewards.hybrid import HybridExaminer, VerifierExaminer
    from she.training.rl import loss_batch_settings
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    model, tok = load_model_and_tokenizer(args.model)
    tok.padding_side = "left"
    examiner = VerifierExaminer()
    judge = None
    if step_rewards and args.examiner in ("hybrid", "blend"):
        from she.rewards.judge import StepJudge

        judge = StepJudge.from_pretrained(args.judge, bf16=args.bf16)
        examiner = HybridExaminer(VerifierExaminer(), judge, mode="verifier_first" if args.examiner == "hybrid" else "blend")
    cfg = build_grpo_config(
        out_dir, num_generations=args.group, **loss_batch_settings(args.group * args.prompts, micro_batches),
        max_completion_length=args.max_completion_length, max_steps=args.steps, learning_rate=1e-6,
        beta=args.beta, temperature=1.0, bf16=args.bf16, seed=args.seed, logging_steps=1, report_to="none",
        save_strategy="no",
    )
    trainer = SRPOTrainer(
        model=model, args=cfg, train_dataset=make_prompt_dataset(train, args.prompt_style),
        processing_class=tok, records_by_id={r.id: r for r in train}, examiner=examiner,
        step_rewards=step_rewards, taxonomy=train[0].taxonomy, labelled_positions_only=labelled_only,
        logp_prefix=logp_prefix,
    )
    return trainer, judge


def _reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux: writing 5 to /proc/self/clear_refs); silently kept elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_gb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def run_once(args, step_rewards: bool, train, labelled_only: bool = True, micro_batches: int = 1,
             logp_prefix: str = "per_row", decoding: str = "fast") -> dict[str, float]:
    from transformers import TrainerCallback

    from she.runtime import release_memory

    set_decoding_arm(decoding)  # read by the trainer's generation (she.models.generation.fast_decoding)

    release_memory()
    _reset_peak_rss()  # to what the process holds now, which includes what an earlier arm left: start_rss_gb
    start = _peak_rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, judge = build_trainer(args, step_rewards, train, tmp, labelled_only, micro_batches, logp_prefix)
        wrap(trainer, "_generate", "generation")
        wrap(trainer, "_generate_and_score_completions", "score_total")
        wrap(trainer, "_get_per_token_logps_and_entropies", "reference", only_no_grad=True)
        wrap(trainer, "score_rollouts", "examiner_and_segmentation")
        if hasattr(trainer.examiner, "examine_batch"):
            wrap(trainer.examiner, "examine_batch", "examiner")
        if judge is not None:
            wrap(judge, "probabilities", "judge")
        per_step: list[dict[str, float]] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, *_a, **_k):
                TIMES.clear()
                self.t0 = time.perf_counter()

            def on_step_end(self, *_a, **_k):
                row = dict(TIMES)
                row["step"] = time.perf_counter() - self.t0
                per_step.append(row)

        trainer.add_callback(Clock())
        trainer.train()
    measured = per_step[1:] or per_step  # the first step warms caches up
    keys = sorted({k for r in measured for k in r})
    mean = {k: statistics.mean(r.get(k, 0.0) for r in measured) for k in keys}
    mean["score_total"] = mean.get("score_total", 0.0) - mean.get("generation", 0.0)
    mean["policy_fwd_bwd"] = mean["step"] - mean.get("generation", 0.0) - mean["score_total"]
    mean["peak_rss_gb"], mean["start_rss_gb"] = _peak_rss_gb(), start
    return mean


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", default="smollm2-135m", help="judge folder or registry name (hybrid/blend)")
    p.add_argument("--examiner", default="blend", choices=["verifier", "hybrid", "blend"])
    p.add_argument("--n-records", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--compare", default="estimator",
                   choices=["estimator", "lm_head", "micro_batches", "logp_prefix", "decoding", "lean"],
                   help="estimator: GRPO against SRPO; lm_head: GRPO with the LM head on every position against "
                        "the completion positions only; micro_batches: GRPO's loss in one pass against "
                        "--micro-batches pieces; logp_prefix: GRPO scoring every rollout as its own row against "
                        "the rollouts of a prompt packed over one shared prompt (rl.logp_prefix: shared); decoding: "
                        "GRPO with transformers' decoding (SHE_DECODING=plain) against fast_decoding; lean: "
                        "fast_decoding with transformers' one-token step against the lean step")
    p.add_argument("--micro-batches", type=int, default=4, help="pieces of the micro_batches arm")
    add_common_args(p)
    args = p.parse_args(argv)
    train = bench_records(p, args, args.n_records)

    # (name, step_rewards, labelled positions only, loss micro-batches, logp_prefix[, decoding]); the ratio is the
    # second arm's step time over the first's
    arms = {"estimator": (("grpo", False, True, 1, "per_row"), ("srpo", True, True, 1, "per_row")),
            "lm_head": (("all_positions", False, False, 1, "per_row"), ("labelled_only", False, True, 1, "per_row")),
            "micro_batches": (("one_pass", False, True, 1, "per_row"),
                              ("micro_batches", False, True, args.micro_batches, "per_row")),
            "logp_prefix": (("per_row", False, True, 1, "per_row"), ("shared", False, True, 1, "shared")),
            "decoding": (("plain", False, True, 1, "per_row", "plain"), ("fast", False, True, 1, "per_row", "fast")),
            "lean": (("packed", False, True, 1, "per_row", "packed"), ("lean", False, True, 1, "per_row", "fast")),
            }[args.compare]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in arms}
    for rep in range(args.reps):
        for name, sr, labelled, micro, prefix, *decoding in (arms if rep % 2 == 0 else arms[::-1]):  # alternating
            r = run_once(args, sr, train, labelled, micro, prefix, *decoding)
            results[name].append(r)
            print(f"rep {rep} {name}: " + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(r.items())), flush=True)
    agg = {n: {k: statistics.mean(r[k] for r in rows) for k in rows[0]} for n, rows in results.items()}
    (a, *_), (b, *_) = arms
    ratio = agg[b]["step"] / agg[a]["step"]
    pairwise = [rb["step"] / ra["step"] for ra, rb in zip(results[a], results[b])]
    report(args, mean=agg, **{f"ratio_{b}_over_{a}": ratio}, pairwise_ratios=pairwise)


if __name__ == "__main__":
    main()
