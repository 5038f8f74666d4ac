"""CLI glue for ``she data filter``, ``she data diverse`` and ``she train curriculum`` (kept out of cli.py so
the shared CLI file only gains a few lines). Imports here stay light: torch loads only when a command runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def add_data_parsers(d, add_data_args: Callable) -> None:
    """Register ``filter`` and ``diverse`` under ``she data``."""
    df = d.add_parser("filter", help="keep prompts whose pass rate under k sampled rollouts is in a band (0<p<1)")
    df.add_argument("--model", required=True, help="policy folder (or registered name) that samples the rollouts")
    df.add_argument("--k", type=int, default=4, help="rollouts per prompt")
    df.add_argument("--cache", required=True, help="pass-rate cache JSONL (resumable; reused by the curriculum)")
    df.add_argument("--out", required=True, help="kept records as JSONL")
    df.add_argument("--low", type=float, default=0.0, help="lower end of the pass-rate band (default 0)")
    df.add_argument("--high", type=float, default=1.0, help="upper end of the pass-rate band (default 1)")
    df.add_argument("--inclusive", action="store_true", help="keep low <= p <= high (default: low < p < high)")
    df.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    df.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    df.add_argument("--max-new-tokens", type=int, default=96, help="longest rollout (default 96)")
    df.add_argument("--limit", type=int, default=None, help="only the first N records")
    df.add_argument("--report", default=None, help="histogram report JSON (default: <out>.report.json)")
    df.add_argument("--plot", default=None, help="also draw the histograms to this PNG")
    add_data_args(df, required=True)

    dd = d.add_parser("diverse", help="pick N diverse records: embeddings, k-means, near-duplicate removal, strata")
    dd.add_argument("--n", type=int, required=True, help="records to select")
    dd.add_argument("--out", required=True, help="selected records as JSONL")
    dd.add_argument("--embedder", default="auto", choices=["auto", "minilm", "hashing"],
                    help="text embedder (auto: MiniLM when installed, else hashed TF-IDF)")
    dd.add_argument("--clusters", type=int, default=None, help="k-means clusters (default about sqrt(N))")
    dd.add_argument("--dup-threshold", type=float, default=0.95, help="cosine at or above which a pair is a near-duplicate")
    dd.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    dd.add_argument("--report", default=None, help="report JSON (default: <out>.report.json)")
    add_data_args(dd, required=True)


def add_train_parser(t, add_data_args: Callable) -> None:
    tc = t.add_parser("curriculum", help="multi-stage RL: one SRPO/GRPO run per stage (docs/sampling.md)")
    tc.add_argument("--config", required=True, help="YAML with `rl:` and `curriculum:` sections")
    tc.add_argument("--model", default=None, help="start model of the first stage")
    tc.add_argument("--output-dir", "--out", default=None, help="output folder (one subfolder per stage)")
    tc.add_argument("--pass-rates", default=None, help="pass-rate cache from `she data filter`")
    add_data_args(tc)


def cmd_data(a, records) -> None:
    """``she data filter | diverse`` on ``records`` (loaded by the CLI from its data flags)."""
    from she.data.loaders import save_jsonl
    from she.data.validation import atomic_write_lines

    out = Path(a.out)
    report_path = Path(a.report) if a.report else out.with_name(out.name + ".report.json")
    if a.data_cmd == "filter":
        from she.sampling.difficulty import difficulty_report, estimate_pass_rates, pass_rate_band

        if a.limit:
            records = records[: a.limit]
        rates = estimate_pass_rates(a.model, records, a.k, a.cache, batch_size=a.batch_size,
                                    temperature=a.temperature, max_new_tokens=a.max_new_tokens)
        kept_ids = set(pass_rate_band(rates, a.low, a.high, a.inclusive))
        kept = [r for r in records if r.id in kept_ids]
        rep = difficulty_report(rates, list(kept_ids), a.k, a.plot)
        rep["band"] = {"low": a.low, "high": a.high, "inclusive": a.inclusive}
    else:
        from she.sampling.diverse import diverse_select

        kept, rep = diverse_select(records, a.n, embedder=a.embedder, n_clusters=a.clusters,
                                   dup_threshold=a.dup_threshold, seed=a.seed)
    save_jsonl(kept, out)
    atomic_write_lines(report_path, [json.dumps(rep, indent=2) + "\n"])
    print(json.dumps({k: v for k, v in rep.items() if not isinstance(v, dict)}, indent=2))
    print(f"kept {len(kept)} of {len(records)} records -> {out}; report: {report_path}")


def cmd_train_curriculum(cfg) -> None:
    """``she train curriculum`` with the config the CLI loaded (YAML plus flags)."""
    from she.sampling.curriculum import run_curriculum_job

    for final in run_curriculum_job(cfg):
        print(f"saved {final}")
