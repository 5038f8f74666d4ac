"""Query-disjoint train/validation/test splits.

Why by query: the rows of one query share the query text and usually near-duplicate products, so a
row-level split leaks the query into the test set and overstates accuracy. Every record of a group
(``Record.group``: the query id, else the normalised query) goes to exactly one split.

How: each group gets a key ``sha256(f"{seed}\\x00{group}")``; groups are ordered by that key and
cut into consecutive blocks whose sizes are the fractions times the number of groups (largest
remainder rounding, so the sizes add up exactly). This is

* deterministic across runs and machines (no dependence on Python's salted ``hash``),
* independent of the input order (the key depends only on the seed and the group),
* mostly stable when data is added: a group's position in the key order never changes, only the
  block boundaries move a little.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

from she.data.schema import Record
from she.errors import UserError

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
# query_meta key of a record written by `she data split`: its part (train | validation | test)
SPLIT_KEY = "split"


def split_by_query(
    records: Sequence[Record],
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split ``records`` by query group into the named parts of ``fractions`` (by number of groups).

    Returns ``{name: records}`` with the names in the order of ``fractions``; inside each part the
    records keep their input order. Fractions must be >= 0 and sum to 1.
    """
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    _check_fractions(fr)
    groups = sorted({r.group for r in records}, key=lambda g: _group_key(g, seed))
    sizes = _block_sizes(len(groups), list(fr.values()))
    part_of: dict[str, str] = {}
    start = 0
    for name, size in zip(fr, sizes):
        for g in groups[start:start + size]:
            part_of[g] = name
        start += size
    out: dict[str, list[Record]] = {name: [] for name in fr}
    for r in records:
        out[part_of[r.group]].append(r)
    return out


def _group_key(group: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{group}".encode("utf-8")).digest()


def _check_fractions(fr: Mapping[str, float]) -> None:
    if not fr:
        raise UserError("fractions must name at least one split")
    for name, f in fr.items():
        if not isinstance(f, (int, float)) or math.isnan(f) or f < 0:
            raise UserError(f"fraction for {name!r} must be a number >= 0, got {f!r}")
    total = sum(fr.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"fractions must sum to 1, got {total:g} ({dict(fr)})")


def _block_sizes(n: int, fractions: list[float]) -> list[int]:
    """Integer sizes summing to ``n``, proportional to ``fractions`` (largest remainder method;
    ties go to the earlier split)."""
    exact = [n * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    left = n - sum(sizes)
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[:left]:
        sizes[i] += 1
    return sizes
