"""Hot reload of human facts for a running RL job: an examiner that reads the fact store at every batch.

A job attaches the store's facts to its records once, at start (:func:`she.data.factstore.attach_from_path`).
Annotators keep answering while it trains (``she annotate serve`` writes into the same SQLite file), so
:class:`LiveFactsExaminer` wraps the job's examiner and, before each batch, asks the store whether it changed
(:meth:`FactStore.refresh`: in-place writes and rebuilds) and merges the current store facts onto the
batch's records (:func:`merge_facts`: the store wins) before the wrapped examiner scores them.

It counts the steps whose verifier verdict the new facts changed (a step the verifier could not decide with
the facts the job started with, now decided; or decided the other way after a correction):
``new_fact_decisions`` (whole run) and ``last_new_fact_decisions`` (last batch), and :meth:`metrics` gives
them as log entries. No restart, no change to the trainer's records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from she.data.factstore import FactStore, PathLike, merge_facts
from she.rewards.hybrid import StepExaminer, StepScores, VerifierExaminer, examine_batch

log = logging.getLogger(__name__)


def count_changed(before: Sequence[float | None], after: Sequence[float | None]) -> int:
    """Steps whose verifier score differs between two scorings of the same trace (None = undecided)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} vs {len(after)} step scores for the same trace")
    return sum(1 for a, b in zip(before, after) if a != b)


class LiveFactsExaminer:
    """``inner`` (any :class:`StepExaminer`), scoring records with the fact store's current facts."""

    def __init__(self, inner: StepExaminer, store: FactStore | PathLike) -> None:
        self.inner = inner
        self.store = store if isinstance(store, FactStore) else FactStore.open(store)
        self.store.refresh()  # records the state the job starts from
        self._cache: dict[str, Any] = {}
        self._verifier = getattr(inner, "verifier", None) or VerifierExaminer()
        self.new_fact_decisions = 0
        self.last_new_fact_decisions = 0
        self.reloads = 0

    @property
    def judge(self) -> Any:  # so that hybrid.fault_counts still finds a wrapped hybrid examiner's judge
        return getattr(self.inner, "judge", None)

    @property
    def fault_counts(self) -> Any:
        return getattr(self.inner, "fault_counts", None)

    def _fresh(self, records: Sequence[Any]) -> list[Any]:
        if self.store.refresh():
            self.reloads += 1
            self._cache.clear()
            log.info("fact store %s changed (generation %d): new facts apply from this step",
                     self.store.path, self.store.generation)
        missing = [r.id for r in records if r.id not in self._cache]
        if missing:
            found = self.store.get_many(missing)
            for rid in missing:
                self._cache[rid] = found.get(rid)
        out = []
        for r in records:
            stored = self._cache[r.id]
            out.append(r if stored is None else replace(r, facts=merge_facts(r.facts, stored)[0]))
        return out

    def examine_batch(self, items: Sequence[tuple[Any, Any]]) -> list[StepScores]:
        fresh = self._fresh([r for _, r in items])
        changed = 0
        for (parsed, old), new in zip(items, fresh):
            if new.facts != old.facts:
                changed += count_changed(self._verifier.score_steps(parsed, old), self._verifier.score_steps(parsed, new))
        self.last_new_fact_decisions = changed
        self.new_fact_decisions += changed
        return examine_batch(self.inner, [(p, r) for (p, _), r in zip(items, fresh)])

    def score_steps(self, parsed: Any, record: Any) -> list[float | None]:
        return self.examine_batch([(parsed, record)])[0].scores

    def metrics(self) -> dict[str, float]:
        """Log entries for the trainer: steps the new facts decided in the last batch and in the whole run,
        and how often the store changed."""
        return {"facts/new_fact_decisions": float(self.last_new_fact_decisions),
                "facts/new_fact_decisions_total": float(self.new_fact_decisions),
                "facts/store_reloads": float(self.reloads)}


def live_facts_examiner(examiner: StepExaminer, store_path: PathLike | None) -> StepExaminer:
    """The job hook: ``examiner`` wrapped in a :class:`LiveFactsExaminer` when a store is set, else itself."""
    return examiner if store_path is None else LiveFactsExaminer(examiner, store_path)


__all__ = ["LiveFactsExaminer", "count_changed", "live_facts_examiner"]
