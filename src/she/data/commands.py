"""The data commands behind the CLI (``she data validate | stats | split``), as plain functions.

They print nothing: the CLI prints what they return, and tests call them directly. Bad data raises
:class:`~she.data.validation.DataError`, whose ``str()`` is a one-line message for the user.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from she.data.labels import TAXONOMIES
from she.data.loaders import load_records, save_jsonl
from she.data.schema import Record, StepFacts
from she.data.split import SPLIT_KEY, split_by_query
from she.data.validation import LoadReport

PathLike = str | os.PathLike


def validate(path: PathLike, format: str = "auto", on_error: str = "fail",
             rejects_path: PathLike | None = None, *, encoding: str = "auto") -> LoadReport:
    """Load ``path`` only to check it. In "fail" mode the first bad row raises ``DataError``; in
    "skip" mode every bad row lands in the rejects file and the report counts them."""
    _records, report = load_records(path, format, on_error=on_error, rejects_path=rejects_path, encoding=encoding)
    return report


def stats(records: Sequence[Record]) -> dict[str, Any]:
    """Summary numbers of a record list (JSON-serialisable).

    Keys: ``n``, ``n_queries`` (distinct split groups), ``mean_records_per_query``, ``labels``
    (``{taxonomy: {label: count}}`` in the taxonomy's order, plus ``"unlabelled"``), ``sources``,
    ``query_types`` (from ``query_meta["query_type"]``, only if any record has one), ``facts_known``
    (share of records with each step fact set), ``title_chars`` (min/mean/median/max).
    """
    n = len(records)
    groups = {r.group for r in records}
    labels: dict[str, dict[str, int]] = {}
    by_tax = Counter((r.taxonomy, r.label) for r in records if r.label is not None)
    for tax in sorted({t for t, _ in by_tax}):
        order = TAXONOMIES[tax].labels if tax in TAXONOMIES else sorted(l for t, l in by_tax if t == tax)
        labels[tax] = {lab: by_tax[(tax, lab)] for lab in order}
    unlabelled = sum(1 for r in records if r.label is None)
    facts_known = {f.name: (sum(1 for r in records if getattr(r.facts, f.name) is not None) / n if n else 0.0)
                   for f in fields(StepFacts)}
    title_len = [len(r.product.title) for r in records]
    out: dict[str, Any] = {
        "n": n,
        "n_queries": len(groups),
        "mean_records_per_query": (n / len(groups)) if groups else 0.0,
        "labels": labels,
        "unlabelled": unlabelled,
        "sources": dict(Counter(r.source for r in records).most_common()),
        "facts_known": facts_known,
        "title_chars": ({"min": min(title_len), "mean": statistics.fmean(title_len),
                         "median": statistics.median(title_len), "max": max(title_len)} if title_len else {}),
    }
    qtypes = Counter(r.query_meta["query_type"] for r in records if "query_type" in r.query_meta)
    if qtypes:
        out["query_types"] = dict(qtypes.most_common())
    return out


def format_stats(d: Mapping[str, Any]) -> str:
    """Human-readable rendering of :func:`stats` output."""
    lines = [f"records: {d['n']}", f"queries: {d['n_queries']} (mean {d['mean_records_per_query']:.2f} records/query)"]
    for tax, counts in d.get("labels", {}).items():
        total = sum(counts.values()) or 1
        parts = ", ".join(f"{lab} {c} ({100 * c / total:.1f}%)" for lab, c in counts.items())
        lines.append(f"labels [{tax}]: {parts}")
    if d.get("unlabelled"):
        lines.append(f"unlabelled: {d['unlabelled']}")
    if d.get("sources"):
        lines.append("sources: " + ", ".join(f"{k} {v}" for k, v in d["sources"].items()))
    if d.get("query_types"):
        lines.append("query types: " + ", ".join(f"{k} {v}" for k, v in d["query_types"].items()))
    known = {k: v for k, v in d.get("facts_known", {}).items() if v > 0}
    lines.append("step facts known: " + (", ".join(f"{k} {100 * v:.1f}%" for k, v in known.items()) or "none"))
    t = d.get("title_chars") or {}
    if t:
        lines.append(f"title chars: min {t['min']}, mean {t['mean']:.1f}, median {t['median']:g}, max {t['max']}")
    return "\n".join(lines)


def split(path: PathLike, format: str, out_dir: PathLike, fractions: Mapping[str, float] | None = None,
          seed: int = 0, *, on_error: str = "fail", rejects_path: PathLike | None = None,
          taxonomy: str | None = None, encoding: str = "auto") -> dict[str, Path]:
    """Load ``path``, split it by query and write ``<out_dir>/<name>.jsonl`` per split (atomically).
    Returns ``{name: path}``. See :func:`split_file`."""
    paths, _report = split_file(path, format, out_dir, fractions, seed, on_error=on_error, rejects_path=rejects_path,
                                taxonomy=taxonomy, encoding=encoding)
    return paths


def split_file(path: PathLike, format: str, out_dir: PathLike, fractions: Mapping[str, float] | None = None,
               seed: int = 0, *, on_error: str = "fail", rejects_path: PathLike | None = None,
               taxonomy: str | None = None, encoding: str = "auto") -> tuple[dict[str, Path], LoadReport]:
    """:func:`split` that also returns the load report. Every written record carries its part in
    ``query_meta["split"]``, so a job given one of the files (or several, concatenated) uses that split as
    it is instead of splitting it again (:func:`she.data.sources.load_splits`)."""
    records, report = load_records(path, format, on_error=on_error, rejects_path=rejects_path, taxonomy=taxonomy,
                                   encoding=encoding)
    parts = split_by_query(records, fractions, seed)
    out = Path(out_dir)
    paths = {name: save_jsonl((replace(r, query_meta={**r.query_meta, SPLIT_KEY: name}) for r in recs),
                              out / f"{name}.jsonl")
             for name, recs in parts.items()}
    return paths, report
