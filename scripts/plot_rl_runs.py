"""Plot one logged metric of several RL runs over their steps (a rolling mean), for docs figures.

Each run is a folder with ``log_history.json`` (every ``she train srpo|grpo`` job and every RL row of
``she compare`` writes one). Runs that share a label (``LABEL=FOLDER``) are drawn in one colour, so seed
repeats of one arm read as a band of lines.

Usage:
  python scripts/plot_rl_runs.py --metric srpo/label_accuracy --out docs/img/x.png \
      grpo=runs/compare-hd-srpo-kl/grpo grpo=runs/compare-hd-srpo-kl/grpo_seed1 \
      srpo=runs/compare-hd-srpo-kl/srpo_gated_graded_missing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def metric_series(folder: Path, metric: str) -> tuple[list[int], list[float]]:
    """(step, value) of every log entry of ``folder/log_history.json`` that has ``metric``."""
    hist = json.loads((folder / "log_history.json").read_text())
    rows = [(int(h["step"]), float(h[metric])) for h in hist if metric in h and "step" in h]
    return [s for s, _ in rows], [v for _, v in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--metric", required=True)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours: dict[str, str] = {}
    for spec in a.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            p.error(f"{spec!r}: expected LABEL=FOLDER")
        steps, values = metric_series(Path(folder), a.metric)
        if not steps:
            p.error(f"{folder}/log_history.json: no {a.metric!r} entries")
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours)}")
        ax.plot(steps, rolling_mean(values, a.window), color=colour, alpha=0.8, label=label if first else None)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"{a.metric} (rolling mean of {a.window})")
    ax.set_title(a.title or a.metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
