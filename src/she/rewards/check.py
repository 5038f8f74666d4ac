"""Check the examiner before paying it: would a constant trace out-earn the truth?

SRPO collapsed to *Exact* while its step rewards rose (docs/results.md): the examiner paid the majority path.
That is visible before any RL: write, for held-out labelled records, the trace that explains the gold label
(:func:`she.reasoning.rationale.write_rationale`) and, for every label L, the *constant* trace that explains
L whatever the pair (the same writer on the record relabelled L: right Query/Product/Missing lines, the
L path through Type and Attributes), and let the examiner score both. Per gold class, the gold trace must
earn at least as much as every constant trace; where a constant trace earns more, a policy that always
says L is paid by the step reward for being wrong, and RL will drift there.

Two totals per trace, over the examined steps (the verdict step excluded, as in training):
``reward`` -- the sum of step scores, a step nobody scores counting as ``neutral`` (0.5): what a centred
estimator pays; ``flaw`` -- the sum of step flaws ``clip((tau - q) / tau, 0, 1)``: what a gated estimator
charges. The check compares the total that the run's estimator uses (``criterion``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.parse import parse_trace
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import StepSchema
from she.rewards.hybrid import examine_batch

CRITERIA = ("reward", "flaw")


def trace_totals(scores: Sequence[float | None], kinds: Sequence[str], *, neutral: float = 0.5,
                 incorrect_below: float = 0.5) -> dict[str, float]:
    """``reward`` and ``flaw`` totals of one trace's step scores (label steps left out; pure)."""
    reward = flaw = 0.0
    for s, kind in zip(scores, kinds):
        if kind == "label":
            continue
        q = neutral if s is None else float(s)
        reward += q
        if s is not None:
            flaw += min(1.0, max(0.0, (incorrect_below - q) / incorrect_below))
    return {"reward": reward, "flaw": flaw}


def constant_trace(record: Record, label: str, schema: StepSchema) -> str:
    """The trace a policy that always says ``label`` writes for ``record`` (right evidence lines, L's path)."""
    return write_rationale(dataclasses.replace(record, label=label), schema)


def check_examiner(examiner: Any, records: Sequence[Record], schema: StepSchema, *, criterion: str = "flaw",
                   tolerance: float = 1e-6) -> dict[str, Any]:
    """Score gold and constant traces of ``records`` with ``examiner``; per gold class, mean totals.

    Returns ``{"criterion", "classes": {gold: {"n", "gold": {reward, flaw}, "constant": {L: {reward, flaw}}}},
    "failures": [(gold, L, gold_value, constant_value)], "ok"}``: a failure is a class on which a constant
    trace beats the gold trace by more than ``tolerance`` under ``criterion`` (higher reward / lower flaw).
    """
    if criterion not in CRITERIA:
        raise UserError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise UserError("the examiner check needs labelled records")
    labels = schema.labels
    items, owners = [], []
    for r in labelled:
        for which in ("gold", *labels):
            text = write_rationale(r, schema) if which == "gold" else constant_trace(r, which, schema)
            items.append((parse_trace(text, schema), r))
            owners.append((r.label, which))
    scored = examine_batch(examiner, items)
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"reward": 0.0, "flaw": 0.0})
    counts: dict[str, int] = defaultdict(int)
    for (gold, which), (parsed, _), sc in zip(owners, items, scored):
        t = trace_totals(sc.scores, [s.kind for s in parsed.steps])
        for k in CRITERIA:
            sums[(gold, which)][k] += t[k]
        if which == "gold":
            counts[gold] += 1
    classes: dict[str, Any] = {}
    failures = []
    for gold in labels:
        n = counts.get(gold, 0)
        if not n:
            continue
        mean = {w: {k: round(v / n, 6) for k, v in sums[(gold, w)].items()} for w in ("gold", *labels)}
        classes[gold] = {"n": n, "gold": mean["gold"], "constant": {lab: mean[lab] for lab in labels}}
        g = mean["gold"][criterion]
        for lab in labels:
            c = mean[lab][criterion]
            beats = c > g + tolerance if criterion == "reward" else c < g - tolerance
            if beats:
                failures.append((gold, lab, g, c))
    return {"criterion": criterion, "classes": classes, "failures": failures, "ok": not failures}


def format_check(report: dict[str, Any]) -> str:
    """A small table of :func:`check_examiner`'s report for logs and the CLI."""
    crit = report["criterion"]
    lines = [f"examiner check ({crit}: {'higher' if crit == 'reward' else 'lower'} is better), mean per trace"]
    for gold, c in report["classes"].items():
        consts = ", ".join(f"always {lab} {v[crit]:.3f}" for lab, v in c["constant"].items())
        lines.append(f"  gold {gold} (n={c['n']}): gold trace {c['gold'][crit]:.3f}; {consts}")
    for gold, lab, g, c in report["failures"]:
        lines.append(f"  FAIL: on {gold} pairs the constant '{lab}' trace ({c:.3f}) beats the gold trace ({g:.3f})")
    return "\n".join(lines)


__all__ = ["CRITERIA", "check_examiner", "constant_trace", "format_check", "trace_totals"]
