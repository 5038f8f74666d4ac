"""Markdown reports and PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = labels + (["invalid"] if confusion and len(confusion[0]) > len(labels) else [])
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("human label")
    vmax = max((max(r) for r in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > vmax / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_average(pts: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing mean of the last ``window`` values at each point (pure; ``window <= 1`` returns ``pts``)."""
    if window <= 1:
        return list(pts)
    out, acc = [], []
    for x, y in pts:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append((x, sum(acc) / len(acc)))
    return out


def plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str = "step",
                smooth: int = 1) -> None:
    """One line per series; ``smooth`` > 1 draws the trailing mean over that many points (noisy per-batch logs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*moving_average(pts, smooth))
            ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_title(title + (f" (mean of the last {smooth} steps)" if smooth > 1 else ""), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predicted_shares(m: dict, labels: list[str]) -> list[float] | None:
    """Share of test pairs predicted as each label (confusion column sums; None without a confusion matrix)."""
    conf = m.get("confusion")
    if not conf:
        return None
    n = sum(sum(row) for row in conf)
    return [sum(row[j] for row in conf) / n if n else 0.0 for j in range(len(labels))]


def metrics_table(rows: dict[str, dict], labels: list[str]) -> str:
    """Markdown table: Macro F1, accuracy, F1 per class, predicted-class shares (a collapsed model predicts
    one class for most pairs), format validity, step accuracy."""
    head = ("| model | Macro F1 | accuracy | " + " | ".join(f"F1 {l}" for l in labels)
            + f" | predicted ({'/'.join(l[:3] for l in labels)}) | format valid | step acc. | n |")
    sep = "|" + "---|" * (7 + len(labels))
    lines = [head, sep]
    for name, m in rows.items():
        pc = m.get("per_class", {})
        sa = m.get("step_accuracy", {}).get("accuracy") if isinstance(m.get("step_accuracy"), dict) else None
        shares = predicted_shares(m, labels)
        sh = "-" if shares is None else "/".join(f"{x:.2f}" for x in shares)
        lines.append(
            f"| {name} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | "
            + " | ".join(f"{pc.get(l, {}).get('f1', 0.0):.3f}" for l in labels)
            + f" | {sh} | {m.get('format_valid_rate', float('nan')):.3f} | {'-' if sa is None else f'{sa:.3f}'} | {m['n']} |"
        )
    return "\n".join(lines)


def write_report(m: dict, out: Path, *, labels: list[str], title: str, examples=None) -> Path:
    plot_confusion(m["confusion"], labels, out / "confusion.png", title)
    parts = [f"# {title}", "", f"Model: `{m.get('model', '?')}`", "", metrics_table({"model": m}, labels), ""]
    g = m.get("generation")
    if g:
        parts += [f"Generation: {g['pairs_per_s']:.2f} pairs/s, {g['tokens_per_s']:.1f} new tokens/s "
                  f"({g['seconds']:.0f} s).", ""]
    checks = m.get("step_checks")
    if checks:
        parts += ["Steps the verifier could check (from the gold label or the strings; docs/srpo.md): "
                  + "; ".join(f"{k} {c['accuracy']:.3f} of {c['correct'] + c['incorrect']}" for k, c in checks.items())
                  + ".", ""]
    parts += ["![confusion matrix](confusion.png)", ""]
    if examples:
        parts += ["## Examples", ""]
        for r, j in examples:
            parts += [f"**{r.query}** -> {r.product.title} (human: {r.label}, model: {j.label})", "", "```",
                      j.text.strip() or "(empty)", "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def rl_curves(log_history: list[dict], out_dir: Path) -> dict[str, Path]:
    """PNG curves of an RL run from the trainer's ``log_history``: outcome reward and label accuracy,
    per-step-type step reward, and the policy's entropy / KL / clip fraction (what shows collapse).

    Keys that a run did not log are left out of a plot; a plot with nothing to show is not written.
    Returns the written paths by name.
    """
    out_dir = Path(out_dir)
    rows = [r for r in log_history if "step" in r]

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["step"], float(r[key])) for r in rows if key in r and r[key] is not None]

    keys = sorted({k for r in rows for k in r})
    groups = {
        "reward": ("rewards and accuracy", ["reward", "srpo/outcome_reward", "srpo/label_accuracy", "srpo/format_ok"]),
        "step_reward": ("mean step reward by step type", [k for k in keys if k.startswith("srpo/step_reward/")]),
        "policy": ("policy entropy, KL, clip fraction, path diversity",
                   ["entropy", "kl", "clip_ratio/region_mean", "srpo/path_diversity"]),
        "collapse": ("predicted-class shares and Macro F1 of the training rollouts",
                     [k for k in keys if k.startswith("srpo/pred_share/")] + ["srpo/train_macro_f1"]),
        "shares": ("verdict share minus gold share, per label (0: no drift), and the share pin's mean |term|",
                   [k for k in keys if k.startswith("srpo/share_gap/")] + ["srpo/share_pin_abs"]),
        "advantage": ("advantage make-up and signal",
                      ["srpo/step_share", "srpo/pos_adv_mass_wrong", "srpo/zero_var_groups", "srpo/verdict_entropy",
                       "srpo/truncated"]),
    }
    # per-batch values are noisy
    smooth = {"reward": 10, "step_reward": 10, "collapse": 10, "shares": 10, "advantage": 10}
    written: dict[str, Path] = {}
    for name, (title, ks) in groups.items():
        data = {k.split("/")[-1] if name == "step_reward" else k.removeprefix("srpo/"): series(k) for k in ks}
        data = {k: v for k, v in data.items() if v}
        if data:
            path = out_dir / f"{name}.png"
            plot_curves(data, path, title, smooth=smooth.get(name, 1))
            written[name] = path
    return written
