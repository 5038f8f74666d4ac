"""Which (pair, trace) an annotator should see first: pure ranking, no I/O.

An answer is worth most where the examiner is weakest. Per candidate (one record and one policy trace, with
per-step verifier and judge scores in [0, 1] or None) three signals, each in [0, 1]:

* ``unsure``      -- the judge's doubt on the steps the verifier cannot check: ``max(1 - |2p - 1|)`` over
  those steps (1 at p = 0.5, 0 at p in {0, 1}); 0 when the judge scored none of them.
* ``undecidable`` -- the share of steps nobody can score (verifier and judge both None).
* ``disagree``    -- 1 when the examiner and the gold label disagree about the trace: the examiner calls it
  right (every scored step >= 0.5; the verifier's score where it has one, else the judge's) while the
  trace's label differs from the gold label, or the other way round; 0 when either side is unknown.

``priority = w_unsure * unsure + w_undecidable * undecidable + w_disagree * disagree`` (default weights
1, 0.5, 1); ties are broken by item id, so the order is reproducible. ``reason`` names the largest
weighted term. A share ``qc_share`` of the queue is quality control: items drawn at random (``seed``)
from the whole pool, interleaved at every ``1 / qc_share``-th place and needing two annotators, so that
agreement (Cohen's kappa) can be measured on them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from she.errors import UserError

DEFAULT_WEIGHTS: Mapping[str, float] = {"unsure": 1.0, "undecidable": 0.5, "disagree": 1.0}
REASONS = {"unsure": "judge unsure", "undecidable": "verifier cannot decide", "disagree": "examiner vs gold"}
QC_REASON = "quality control"
LOW_REASON = "low priority"


@dataclass(frozen=True)
class Candidate:
    item_id: str
    verifier: tuple[float | None, ...]  # per step
    judge: tuple[float | None, ...]  # per step (all None without a judge)
    label: str | None = None  # the trace's label
    gold: str | None = None


@dataclass(frozen=True)
class Ranked:
    item_id: str
    priority: float
    reason: str
    need: int  # annotators wanted: 2 for quality control, else 1


def uncertainty(p: float) -> float:
    """1 at p = 0.5, 0 at p = 0 or 1, linear in between."""
    return 1.0 - abs(2.0 * p - 1.0)


def signals(c: Candidate) -> dict[str, float]:
    """The three signals of the module docstring for one candidate."""
    if len(c.verifier) != len(c.judge):
        raise ValueError(f"item {c.item_id}: {len(c.verifier)} verifier scores but {len(c.judge)} judge scores")
    open_steps = [j for v, j in zip(c.verifier, c.judge) if v is None]
    unsure = max((uncertainty(j) for j in open_steps if j is not None), default=0.0)
    n = len(c.verifier)
    undecidable = sum(1 for j in open_steps if j is None) / n if n else 0.0
    scored = [v if v is not None else j for v, j in zip(c.verifier, c.judge)]
    scored = [s for s in scored if s is not None]
    disagree = 0.0
    if scored and c.label is not None and c.gold is not None:
        examiner_right = all(s >= 0.5 for s in scored)
        disagree = float(examiner_right != (c.label == c.gold))
    return {"unsure": unsure, "undecidable": undecidable, "disagree": disagree}


def priority(c: Candidate, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> tuple[float, str]:
    """``(priority, reason)`` of one candidate."""
    parts = {k: weights.get(k, 0.0) * v for k, v in signals(c).items()}
    total = sum(parts.values())
    if total <= 0:
        return 0.0, LOW_REASON
    best = max(parts, key=lambda k: (parts[k], -list(parts).index(k)))  # first of equal terms
    return total, REASONS[best]


def qc_positions(n_total: int, n_qc: int) -> list[int]:
    """Where ``n_qc`` quality-control items go in a queue of ``n_total``: evenly spread, the j-th (0-based)
    at ``ceil((j + 1) * n_total / n_qc) - 1``, so the first one comes after the first stretch of ranked work."""
    if n_qc <= 0:
        return []
    return [math.ceil((j + 1) * n_total / n_qc) - 1 for j in range(n_qc)]


def rank_queue(candidates: Sequence[Candidate], *, qc_share: float = 0.1, seed: int = 0,
               weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> list[Ranked]:
    """The whole queue, most valuable first, with ``round(qc_share * n)`` quality-control items placed by
    :func:`qc_positions`."""
    if not 0.0 <= qc_share <= 1.0:
        raise UserError(f"qc_share must be in [0, 1], got {qc_share}")
    ids = [c.item_id for c in candidates]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"item id {dup!r} appears twice in the queue")
    n_qc = round(qc_share * len(candidates))
    qc_ids = set(random.Random(seed).sample(sorted(ids), n_qc))
    scored = [(c, *priority(c, weights)) for c in candidates if c.item_id not in qc_ids]
    scored.sort(key=lambda t: (-t[1], t[0].item_id))
    ranked = [Ranked(c.item_id, p, r, 1) for c, p, r in scored]
    qc = [Ranked(c.item_id, priority(c, weights)[0], QC_REASON, 2)
          for c in sorted(candidates, key=lambda c: c.item_id) if c.item_id in qc_ids]
    random.Random(seed + 1).shuffle(qc)
    out: list[Ranked] = list(ranked)
    for pos, item in zip(qc_positions(len(candidates), n_qc), qc):
        out.insert(pos, item)
    return out


__all__ = ["Candidate", "DEFAULT_WEIGHTS", "QC_REASON", "Ranked", "priority", "qc_positions", "rank_queue",
           "signals", "uncertainty"]
