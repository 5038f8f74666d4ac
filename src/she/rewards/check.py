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

A second failure is a *hedge* (:func:`choice_hedges`): a constant answer to one choice step (``Similarity:
medium``) that the examiner does not charge where it differs from the truthful trace. A penalty-only step term
then teaches the policy to say it always, whatever the pair -- which SRPO did when the ``Similarity`` bucket was
graded by distance (the middle bucket is never more than one off; docs/results.md, session 11). The constant
trace above cannot see this: it changes the verdict path, not one evidence line.
"""

from __future__ import annotations

import dataclasses
import re
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


def _flaw(q: float, incorrect_below: float = 0.5) -> float:
    return min(1.0, max(0.0, (incorrect_below - q) / incorrect_below))


def trace_totals(scores: Sequence[float | None], kinds: Sequence[str], *, neutral: float = 0.5,
                 incorrect_below: float = 0.5, include_label_step: bool = False,
                 paid: Sequence[bool] | None = None) -> dict[str, float]:
    """``reward`` and ``flaw`` totals of one trace's step scores (pure). Label steps are left out unless
    ``include_label_step`` (the trainer's: the verdict step is then paid too, e.g. under ``rl.rated_verdict``);
    ``paid`` (one flag a step): only the flagged steps count, as the trainer's ``reward_steps``."""
    reward = flaw = 0.0
    for k, (s, kind) in enumerate(zip(scores, kinds)):
        if (kind == "label" and not include_label_step) or (paid is not None and not paid[k]):
            continue
        q = neutral if s is None else float(s)
        reward += q
        if s is not None:
            flaw += _flaw(q, incorrect_below)
    return {"reward": reward, "flaw": flaw}


def constant_trace(record: Record, label: str, schema: StepSchema) -> str:
    """The trace a policy that always says ``label`` writes for ``record`` (right evidence lines, L's path)."""
    return write_rationale(dataclasses.replace(record, label=label), schema)


def with_step(text: str, key: str, value: str) -> str:
    """``text`` with its ``key:`` line(s) saying ``value`` (pure; a trace without the line is returned as is)."""
    return re.sub(rf"(?m)^{re.escape(key)}:[^\n]*$", lambda _: f"{key}: {value}", text)


def choice_hedges(examiner: Any, records: Sequence[Record], schema: StepSchema, *, criterion: str = "flaw",
                  tolerance: float = 1e-6) -> list[dict[str, Any]]:
    """For every choice step but the label and every value it allows: the examiner's mean score and flaw of that
    one step, on the records whose truthful trace says something else, against the truthful step's on the same
    records. ``hedge`` is true where the wrong constant is not worse under ``criterion`` (lower reward / higher
    flaw): a free answer. Steps the examiner leaves unscored (None) on a record do not count there."""
    if criterion not in CRITERIA:
        raise UserError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    items, owners = [], []  # owners: (step key, value, index of the truthful trace in items, of the wrong one)
    for r in records:
        gold = write_rationale(r, schema)
        parsed = parse_trace(gold, schema)
        g = len(items)
        items.append((parsed, r))
        for spec in schema.steps:
            step = next((s for s in parsed.steps if s.key == spec.key), None)
            if spec.kind != "choice" or not spec.choices or step is None:
                continue
            for value in spec.choices:
                if value != step.conclusion:
                    owners.append((spec.key, value, g, len(items)))
                    items.append((parse_trace(with_step(gold, spec.key, value), schema), r))
    scored = examine_batch(examiner, items) if owners else []
    acc: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(
        ("n", "gold_reward", "gold_flaw", "reward", "flaw"), 0.0))
    for key, value, g, i in owners:
        q_gold = _step_score(items[g][0], scored[g].scores, key)
        q = _step_score(items[i][0], scored[i].scores, key)
        if q_gold is None or q is None:
            continue
        a = acc[(key, value)]
        a["n"] += 1
        a["gold_reward"] += q_gold
        a["gold_flaw"] += _flaw(q_gold)
        a["reward"] += q
        a["flaw"] += _flaw(q)
    out = []
    for (key, value), a in acc.items():
        n = int(a["n"])
        row = {"step": key, "value": value, "n": n, **{k: round(a[k] / n, 6) for k in a if k != "n"}}
        row["hedge"] = (row["reward"] >= row["gold_reward"] - tolerance if criterion == "reward"
                        else row["flaw"] <= row["gold_flaw"] + tolerance)
        out.append(row)
    return out


def _step_score(parsed: Any, scores: Sequence[float | None], key: str) -> float | None:
    for s, q in zip(parsed.steps, scores):
        if s.key == key:
            return None if q is None else float(q)
    return None


def check_examiner(examiner: Any, records: Sequence[Record], schema: StepSchema, *, criterion: str = "flaw",
                   tolerance: float = 1e-6, include_label_step: bool = False,
                   paid_steps: Sequence[str] | None = None) -> dict[str, Any]:
    """Score gold and constant traces of ``records`` with ``examiner``; per gold class, mean totals of the steps the
    trainer pays: the verdict step's score too with ``include_label_step``, only the keys in ``paid_steps`` when given
    (the trainer's ``reward_steps``; None: every step).

    Returns ``{"criterion", "classes": {gold: {"n", "gold": {reward, flaw}, "constant": {L: {reward, flaw}}}},
    "failures": [(gold, L, gold_value, constant_value)], "hedges": [...], "ok"}``: a failure is a class on which a
    constant trace beats the gold trace by more than ``tolerance`` under ``criterion`` (higher reward / lower flaw),
    or a :func:`choice_hedges` row whose ``hedge`` is true.
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
        t = trace_totals(sc.scores, [s.kind for s in parsed.steps], include_label_step=include_label_step,
                         paid=None if paid_steps is None else [s.key in paid_steps for s in parsed.steps])
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
    hedges = choice_hedges(examiner, labelled, schema, criterion=criterion, tolerance=tolerance)
    ok = not failures and not any(h["hedge"] for h in hedges)
    return {"criterion": criterion, "classes": classes, "failures": failures, "hedges": hedges, "ok": ok}


def format_check(report: dict[str, Any]) -> str:
    """A small table of :func:`check_examiner`'s report for logs and the CLI."""
    crit = report["criterion"]
    lines = [f"examiner check ({crit}: {'higher' if crit == 'reward' else 'lower'} is better), mean per trace"]
    for gold, c in report["classes"].items():
        consts = ", ".join(f"always {lab} {v[crit]:.3f}" for lab, v in c["constant"].items())
        lines.append(f"  gold {gold} (n={c['n']}): gold trace {c['gold'][crit]:.3f}; {consts}")
    for gold, lab, g, c in report["failures"]:
        lines.append(f"  FAIL: on {gold} pairs the constant '{lab}' trace ({c:.3f}) beats the gold trace ({g:.3f})")
    for h in report.get("hedges", []):
        if h["hedge"]:
            lines.append(f"  FAIL: '{h['step']}: {h['value']}' where it is wrong (n={h['n']}) costs {h[crit]:.3f}, "
                         f"the truthful line {h['gold_' + crit]:.3f}: a free hedge")
    return "\n".join(lines)


__all__ = ["CRITERIA", "check_examiner", "choice_hedges", "constant_trace", "format_check", "trace_totals",
           "with_step"]
