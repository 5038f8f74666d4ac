"""Reporting of ``she compare``: per-row metrics with bootstrap intervals, the plots and ``results.md``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from she.data.schema import Record
from she.recipes.compare.plan import group_of
from she.recipes.compare.rows import FULL_ROWS, RL_ROWS, ROWS


def row_metrics(records: Sequence[Record], predicted: Mapping[str, str | None], labels: Sequence[str], *,
                n_boot: int, seed: int, alpha: float = 0.05) -> dict[str, Any]:
    """Macro F1 / accuracy with percentile bootstrap CIs that resample whole query groups, and class-wise F1."""
    from she.evaluation.metrics import bootstrap_ci, classification_report

    missing = [r.id for r in records if r.id not in predicted]
    if missing:
        raise ValueError(f"{len(missing)} evaluation record(s) have no prediction (first: {missing[0]!r})")
    y_true = [r.label for r in records]
    y_pred = [predicted[r.id] for r in records]
    groups = [group_of(r) for r in records]
    rep = classification_report(y_true, y_pred, labels)
    n = max(rep["n"], 1)
    out = {"macro_f1": rep["macro_f1"], "accuracy": rep["accuracy"], "n": rep["n"], "n_invalid": rep["n_invalid"],
           "n_groups": len(set(groups)), "per_class_f1": {k: v["f1"] for k, v in rep["per_class"].items()},
           "pred_share": {lab: sum(p == lab for p in y_pred) / n for lab in labels}}
    for metric in ("macro_f1", "accuracy"):
        lo, hi = bootstrap_ci(y_true, y_pred, labels, metric=metric, n_boot=n_boot, seed=seed, alpha=alpha,
                              groups=groups)
        out[f"{metric}_ci"] = [lo, hi]
    return out


def _series(hist: Sequence[Mapping[str, Any]], fn: Callable[[Mapping[str, Any]], float | None]) -> list[tuple[float, float]]:
    out = []
    for h in hist:
        if "step" not in h:
            continue
        v = fn(h)
        if v is not None and math.isfinite(v):
            out.append((float(h["step"]), float(v)))
    return out


def _mean_step_reward(h: Mapping[str, Any]) -> float | None:
    vals = [float(v) for k, v in h.items() if k.startswith("srpo/step_reward/") and v is not None]
    return sum(vals) / len(vals) if vals else None


def write_plots(ctx: Any, results: Mapping[str, Mapping[str, Any]], curves: Mapping[str, Any]) -> dict[str, str]:
    """reward / step_reward / entropy curves (one line per RL row that ran its own job), the Macro F1 bars,
    and the Macro F1 over training when checkpoints were scored. Returns {name: file}."""
    from she.evaluation.report import plot_curves

    written: dict[str, str] = {}
    rl_rows = [r for r in ctx.rows if r in RL_ROWS + FULL_ROWS and r not in ctx.same_as]
    hists = {r: ctx.log_history(r) for r in rl_rows}
    specs = {
        "reward": ("outcome reward (TRL `reward`) per RL row", lambda h: h.get("reward")),
        "step_reward": ("mean step reward (srpo/step_reward/*)", _mean_step_reward),
        "entropy": ("policy entropy", lambda h: h.get("entropy")),
    }
    for name, (title, fn) in specs.items():
        series = {r: _series(h, fn) for r, h in hists.items()}
        series = {r: s for r, s in series.items() if s}
        if series:
            plot_curves(series, ctx.out / f"{name}.png", title)
            written[name] = f"{name}.png"
    if results:
        plot_macro_f1_bars(results, ctx.out / "macro_f1.png")
        written["macro_f1"] = "macro_f1.png"
    if curves:
        plot_curves({r: [tuple(p) for p in pts] for r, pts in curves.items()}, ctx.out / "macro_f1_over_training.png",
                    f"Macro F1 on {min(ctx.cfg.checkpoint_eval_max, len(ctx.evals))} eval pairs over training")
        written["macro_f1_over_training"] = "macro_f1_over_training.png"
    return written


def plot_macro_f1_bars(results: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    vals = [results[n]["macro_f1"] for n in names]
    lo = [v - results[n]["macro_f1_ci"][0] for n, v in zip(names, vals)]
    hi = [results[n]["macro_f1_ci"][1] - v for n, v in zip(names, vals)]
    colors = ["tab:blue" if results[n].get("kind") == "main" else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("Macro F1 (95 % CI, query-group bootstrap)")
    ax.set_ylim(0, max([1e-3] + [results[n]["macro_f1_ci"][1] for n in names]) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def paired_results(records: Sequence[Record], predictions: Mapping[str, Mapping[str, str | None]],
                   pairs: Sequence[Sequence[str]], labels: Sequence[str], *, n_boot: int, seed: int,
                   alpha: float = 0.05) -> list[dict[str, Any]]:
    """Paired bootstrap of Macro F1 differences for each ``[A, B]`` of ``pairs`` whose rows were run; each arm
    pools its row with the row's seed repeats (``predictions``: row -> {record id: label})."""
    from she.evaluation.metrics import paired_bootstrap_diff
    from she.recipes.compare.rows import arm_of

    y = [r.label for r in records]
    groups = [group_of(r) for r in records]
    out = []
    for a, b in pairs:
        runs = {arm: [row for row in predictions if arm_of(row) == arm] for arm in (a, b)}
        if not runs[a] or not runs[b]:
            continue
        preds = {arm: [[predictions[row][r.id] for r in records] for row in rows] for arm, rows in runs.items()}
        res = paired_bootstrap_diff(y, preds[a], preds[b], labels, n_boot=n_boot, seed=seed, alpha=alpha,
                                    groups=groups)
        out.append({"a": a, "b": b, "runs_a": runs[a], "runs_b": runs[b], **res})
    return out


def _offsets(offsets: Mapping[str, float], labels: Sequence[str]) -> str:
    return "/".join(f"{offsets.get(lab, 0.0):+.2f}" for lab in labels)


def _table(rows: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    head = ("| row | Macro F1 [95% CI] | accuracy [95% CI] | " + " | ".join(f"F1 {lab}" for lab in labels)
            + f" | predicted ({'/'.join(lab[:3] for lab in labels)}) | step acc. | format valid | generations | "
            "train pairs | train wall (s) |")
    lines = [head, "|" + "---|" * (9 + len(labels))]
    for name, r in rows.items():
        name_cell = f"{name} (= {r['same_as']})" if r.get("same_as") else name
        lines.append(
            f"| {name_cell} | {_f(r['macro_f1'])} [{_f(r['macro_f1_ci'][0])}, {_f(r['macro_f1_ci'][1])}] | "
            f"{_f(r['accuracy'])} [{_f(r['accuracy_ci'][0])}, {_f(r['accuracy_ci'][1])}] | "
            + " | ".join(_f(r["per_class_f1"].get(lab)) for lab in labels)
            + " | " + ("/".join(_f(r["pred_share"].get(lab), 2) for lab in labels) if r.get("pred_share") else "-")
            + f" | {_f(r.get('step_accuracy'))} | {_f(r.get('format_valid_rate'))} | {r.get('generations', 0):,} | "
            + ("-" if r.get("train_pairs") is None else f"{r['train_pairs']:,}")
            + f" | {_f(r.get('wall_time_s'), 0)} |")
    return lines


def _label_only_line(d: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The label-only row's own training sample and its cost, when the ``label_only:`` section gave it one."""
    lo = d.get("label_only")
    if not lo:
        return []
    r = rows.get("label_only_sft", {})
    cost = "" if r.get("wall_time_s") is None else f", trained in {r['wall_time_s']:,.0f} s"
    score = "" if r.get("macro_f1") is None else f" (Macro F1 {r['macro_f1']:.3f}{cost})"
    shared = "" if d.get("train_n") is None else f" (the shared training sample holds {d['train_n']:,})"
    return [f"label_only_sft{score} trains on its own sample of the same training queries: {lo['train_n']:,} pairs "
            f"from {lo['train_query_groups']:,} queries{shared}, max_train {lo['max_train']}, balance_train "
            f"{lo['balance_train']}, labels {lo['train_labels']}; it is scored on the same evaluation pairs as "
            "every row.", ""]


def results_markdown(s: Mapping[str, Any]) -> str:
    """results.md: main table, ablation table, what each row is, budget, data, command, seed, plots."""
    rows = s["rows"]
    labels = s["labels"]
    b = s["budget"]
    d = s["data"]
    main = {k: v for k, v in rows.items() if v["kind"] == "main"}
    abl = {k: v for k, v in rows.items() if v["kind"] == "ablation"}
    seeds = {k: v for k, v in rows.items() if v["kind"] == "seed"}
    bs = s["bootstrap"]
    regrouped = [k for k in rows if k in ROWS and (ROWS[k].rl or {}).get("regroup_generations")]
    parts = [f"# she compare: {s['output_dir']}", "",
             f"Command: `{s['command']}`  ", f"Seed: {s['seed']} (every job); bootstrap: {bs['n']} replicates over "
             f"query groups, seed {bs['seed']}, {100 * (1 - bs['alpha']):.0f} % percentile intervals.", "",
             f"Data: {d['source']}, taxonomy {d['taxonomy']}, split seed {d['split_seed']}, balance_train "
             f"{d['balance_train']}; split sizes {d['split_sizes']}; evaluated on {d['eval_n']} {d['eval_split']} "
             f"pairs from {d['eval_query_groups']} queries, labels {d['eval_labels']}.", "",
             *_label_only_line(d, rows),
             f"Budget ({b['mode']}): every RL row gets {b['rl']['max_steps']} steps x {b['rl']['prompts_per_step']} "
             f"prompts x {b['rl']['num_generations']} generations = {b['rl_generations_per_row']:,} policy rollouts"
             + (f" ({', '.join(regrouped)}: the same rollouts a step in smaller groups over more prompts)."
                if regrouped else ".")]
    if "passn" in b:
        parts.append(f"DPO / reward model: pass@{b['passn']['n']} on {b['passn']['max_records']} training prompts "
                     "(the same rollouts for both).")
    if "difficulty" in b:
        parts.append(f"srpo_full: difficulty estimation on {b['difficulty']['pool']} prompts x k={b['difficulty']['k']} "
                     f"= {b['difficulty']['generations']:,} generations; RL steps per row {b['srpo_full_steps']}"
                     + (" (strict: the estimation is paid with RL steps)." if b["mode"] == "strict" else "."))
    if b.get("judge_labelling_generations"):
        parts.append(f"The judge's training labels cost {b['judge_labelling_generations']:,} policy generations "
                     "(shared by every row that uses the judge; not in the per-row column).")
    parts += ["", "`generations`: policy samples the method spent before evaluation (RL rollouts, pass@N, "
              "difficulty estimation). `train pairs`: labelled pairs the row's own supervised job trained on (`-` "
              "for rows whose budget is their generations, and for an SFT start trained elsewhere). `train wall "
              "(s)`: wall time of the row's own jobs (the shared SFT excluded; `-` when a job ran in an earlier "
              "invocation that did not record it).", "",
              "## Main results", "", *_table(main, labels), ""]
    if seeds:
        parts += ["## More seeds of the main rows", "", *_table(seeds, labels), ""]
    paired = s.get("paired") or []
    if paired:
        parts += ["## Paired differences (same pairs, seeds pooled)", "",
                  "Macro F1 of A minus Macro F1 of B on the same evaluation pairs; each replicate resamples query "
                  "groups once for both arms. An arm pools its row with the row's seed repeats.", "",
                  "| A - B | runs A | runs B | difference [95% CI] | share of replicates <= 0 |", "|---|---|---|---|---|"]
        parts += [f"| {p['a']} - {p['b']} | {len(p['runs_a'])} | {len(p['runs_b'])} | {p['diff']:+.3f} "
                  f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {p['p_le_0']:.3f} |" for p in paired] + [""]
    if abl:
        parts += ["## Ablations", "", *_table(abl, labels), ""]
    cal = {k: v["calibrated"] for k, v in rows.items() if v.get("calibrated")}
    if cal:
        parts += ["## Calibrated verdicts", "",
                  "The same generations, the label read from the verdict-token probabilities with per-class offsets "
                  "fitted on validation pairs (never the test pairs; docs/reasoning-format.md).", "",
                  f"| row | offsets ({'/'.join(lab[:3] for lab in labels)}) | Macro F1 raw | Macro F1 calibrated [95% CI] | "
                  f"predicted ({'/'.join(lab[:3] for lab in labels)}) |", "|---|---|---|---|---|"]
        parts += [f"| {k} | {_offsets(c['label_offsets'], labels)} | "
                  f"{_f(rows[k]['macro_f1'])} | {_f(c['macro_f1'])} [{_f(c['macro_f1_ci'][0])}, {_f(c['macro_f1_ci'][1])}] | "
                  + "/".join(_f(c["pred_share"].get(lab), 2) for lab in labels) + " |" for k, c in cal.items()] + [""]
    pc = s.get("paired_calibrated") or []
    if pc:
        parts += ["Paired differences of the calibrated Macro F1:", "",
                  "| A - B | difference [95% CI] | share of replicates <= 0 |", "|---|---|---|"]
        parts += [f"| {p['a']} - {p['b']} | {p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] | {p['p_le_0']:.3f} |"
                  for p in pc] + [""]
    checked = {k: v["step_checks"] for k, v in rows.items() if v.get("step_checks")}
    if checked:
        keys = list(dict.fromkeys(key for c in checked.values() for key in c))
        parts += ["## Steps the verifier could check", "",
                  "Share of generated steps the verifier marked correct, among those it could check on these "
                  "pairs (from the gold label, or from the strings for a coverage `Missing` step; `evaluate.step_checks`).",
                  "", "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        parts += [f"| {k} | " + " | ".join(_f(c[key]["accuracy"]) if key in c else "-" for key in keys) + " |"
                  for k, c in checked.items()] + [""]
    notes = [f"- **{k}** {v['note']}." for k, v in rows.items() if v.get("note")]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    parts += ["## Rows", ""] + [f"- **{k}**: {v['description']}" for k, v in rows.items()] + [""]
    plots = s.get("plots", {})
    if plots:
        parts += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(parts)


__all__ = ["paired_results", "plot_macro_f1_bars", "results_markdown", "row_metrics", "write_plots"]
