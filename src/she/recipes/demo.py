"""The main job (``she demo``): data -> evaluate the base model -> SFT -> evaluate -> SRPO -> evaluate -> report."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

from she.config import DemoConfig, to_dict
from she.data.labels import get_taxonomy
from she.data.sources import majority_label, prior_train
from she.errors import UserError

log = logging.getLogger(__name__)


def _loss_curve(log_history: list[dict]) -> list[tuple[float, float]]:
    return [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]


def _reads(cfg: DemoConfig) -> list[str]:
    """The evidence modes the models are read in, the headline first (``evidence`` is one mode or a list)."""
    reads = [cfg.evidence] if isinstance(cfg.evidence, str) else list(dict.fromkeys(cfg.evidence))
    if not reads:
        raise UserError("demo config: evidence lists no read; give one of generated, computed, marginal")
    return reads


def _calibrate(cfg: DemoConfig, model, splits, timings: dict, key: str) -> None:
    """``calibration_pairs`` > 0: fit the model's verdict offsets on validation pairs (never test) into she.json,
    once per read (each read has its own offsets)."""
    if cfg.calibration_pairs <= 0 or not splits.get("validation"):
        return
    from she.evaluation.evaluate import calibrate

    for evidence in _reads(cfg):
        t = time.time()
        calibrate(str(model), splits["validation"][: cfg.calibration_pairs], taxonomy=cfg.data.taxonomy,
                  batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, bf16=cfg.sft.bf16,
                  progress=False, evidence=evidence, method=cfg.calibration_method)
        timings[key if evidence == "generated" else f"{key}_{evidence}"] = time.time() - t


def _evaluate_reads(cfg: DemoConfig, model, test, out: Path, name: str, title: str, rows: dict, timings: dict,
                    **common) -> None:
    """Evaluate ``model`` on ``test`` in each read: row ``name`` (the generated read keeps the plain name and
    folder; another read is ``name (computed evidence)`` in ``<folder>_computed``)."""
    from she.evaluation.evaluate import evaluate

    for evidence in _reads(cfg):
        plain = evidence == "generated"
        folder = out.name if plain else f"{out.name}_{evidence}"
        t = time.time()
        rows[name if plain else f"{name} ({evidence} evidence)"] = evaluate(
            str(model), test, out.with_name(folder), title=title if plain else f"{title}, {evidence} evidence",
            evidence=evidence, **common)
        timings[folder] = time.time() - t


def _links(out: Path, folders) -> str:
    """The report's links to the figures this run wrote: the confusion matrix of each evaluation folder in
    ``folders`` (in order) and the RL curves; only files that exist, so a run without a base evaluation, or read
    with computed evidence, links no dead file."""
    parts = []
    evals = [f for f in (out / name / "confusion.png" for name in folders) if f.exists()]
    if evals:
        parts.append("Confusion matrices: " + ", ".join(f"[{f.parent.name.removeprefix('eval_')}]"
                                                        f"({f.relative_to(out).as_posix()})" for f in evals) + ".")
    curves = [(n, out / "srpo" / f) for n, f in (("reward", "reward.png"), ("collapse signs", "collapse.png"),
                                                 ("examiner check", "examiner_check.json"))]
    curves = [f"[{n}]({f.relative_to(out).as_posix()})" for n, f in curves if f.exists()]
    if curves:
        parts.append("RL curves: " + ", ".join(curves) + ".")
    return " ".join(parts)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    from she.data.loaders import save_jsonl
    from she.data.sources import load_splits
    from she.evaluation.evaluate import evaluate
    from she.evaluation.report import metrics_table, plot_curves
    from she.models.registry import resolve_model
    from she.training.sft import train_sft

    _reads(cfg)  # a config without a read fails here, not after the training
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    timings: dict[str, float] = {}
    t = time.time()
    splits = load_splits(cfg.data)
    for name, recs in splits.items():
        save_jsonl(recs, out / "data" / f"{name}.jsonl")
    timings["data"] = time.time() - t
    log.info("data: %s", {k: len(v) for k, v in splits.items()})

    t = time.time()
    base = resolve_model(cfg.model)
    timings["model"] = time.time() - t
    test = splits["test"]
    labels = list(get_taxonomy(cfg.data.taxonomy).labels)
    rows: dict[str, dict] = {}
    common = dict(taxonomy=cfg.data.taxonomy, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                  bf16=cfg.sft.bf16, progress=progress)
    if cfg.eval_before:
        t = time.time()
        rows["base (zero-shot)"] = evaluate(str(base), test, out / "eval_base", title="Base model, zero-shot", **common)
        timings["eval_base"] = time.time() - t

    t = time.time()
    sft_cfg = cfg.sft
    sft_cfg.model = cfg.model
    sft_cfg.output_dir = str(out / "sft")
    sft_cfg.data = cfg.data
    final = train_sft(sft_cfg, splits["train"])
    timings["sft"] = time.time() - t

    # the SFT row is read as the SRPO row is, calibrated when calibration is on: a calibrated SRPO beside a raw SFT
    # would credit RL with what the offsets do (their offsets do not reach RL: its she.json is written afresh)
    _calibrate(cfg, final, splits, timings, "calibration_sft" if cfg.rl is not None else "calibration")
    _evaluate_reads(cfg, final, test, out / "eval_sft", "SFT", "After SFT", rows, timings, **common)

    if cfg.rl is not None:
        import dataclasses

        from she.training.rl import run_rl_job

        t = time.time()
        rl_cfg = dataclasses.replace(cfg.rl, model=str(final), output_dir=str(out / "srpo"), data=cfg.data)
        rl_final = run_rl_job(rl_cfg, splits["train"], check_records=splits["validation"] or None)
        timings["srpo"] = time.time() - t
        _calibrate(cfg, rl_final, splits, timings, "calibration")
        # step_rewards false is vanilla GRPO (the estimator then has no step term to name)
        algo = "SRPO" if rl_cfg.step_rewards else "GRPO"
        estimator = f"{rl_cfg.advantage or 'srpo_gated'}, " if rl_cfg.step_rewards else ""
        _evaluate_reads(cfg, rl_final, test, out / "eval_srpo", f"{algo} ({estimator}{rl_cfg.max_steps} steps)",
                        f"After {algo}", rows, timings, **common)

    history = json.loads((out / "sft" / "log_history.json").read_text())
    plot_curves({"train loss": _loss_curve(history)}, out / "sft_loss.png", "SFT training loss")
    majority = majority_label(prior_train(cfg.data, splits["train"]), labels)  # the split's prior, not the sample's
    from she.evaluation.metrics import classification_report

    rows[f"majority class ({majority})"] = classification_report([r.label for r in test], [majority] * len(test), labels)
    report = [
        "# she demo report", "",
        f"Data: {'synthetic generator' if cfg.data.path is None else cfg.data.path}; "
        f"train {len(splits['train'])}, validation {len(splits['validation'])}, test {len(test)} pairs "
        "(query-disjoint split).", "",
        f"Model: `{cfg.model}`; SFT target: {cfg.sft.target}.", "",
        metrics_table(rows, labels), "",
        "![SFT loss](sft_loss.png)", "",
        _links(out, [k for k in timings if k.startswith("eval_")]), "",  # timings: each evaluation's folder
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
    ]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    report.append(f"Peak memory (RSS): {peak_mib:.0f} MiB.")
    (out / "report.md").write_text("\n".join(report))
    sft_log = dict(next((h for h in reversed(history) if "train_runtime" in h), {}))
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.schema import resolve_schema
    from she.training.sft import count_tokens

    tok = load_model_and_tokenizer(final)[1]
    sft_log.update(count_tokens(splits["train"], tok, cfg.sft.target, cfg.sft.prompt_style,
                                resolve_schema(cfg.sft.schema, cfg.data.taxonomy)))
    if "train_runtime" in sft_log and sft_log["train_runtime"]:
        epochs = float(sft_log.get("epoch", 1.0))
        sft_log["train_tokens_per_s"] = sft_log["tokens"] * epochs / float(sft_log["train_runtime"])
    summary = {"rows": rows, "timings": timings, "peak_rss_mib": peak_mib, "sft_train": sft_log,
               "report": str(out / "report.md"), "final_model": str(final)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
