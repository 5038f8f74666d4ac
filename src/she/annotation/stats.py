"""Agreement between annotators (pure): Cohen's kappa on doubly annotated units.

A *unit* is one question on one item (``(item_id, "step:2")`` or ``(item_id, "fact:brand")``); each
annotator's last answer to it counts (:func:`she.data.annotations.latest_by_annotator`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over ``pairs`` of (rater A's value, rater B's value).

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the agreement
    expected from each rater's own value frequencies. None for no pairs; 1.0 when both raters always give
    one and the same value (``p_e = 1``: perfect, if uninformative, agreement); for one single shared
    value but disagreements, ``p_e < 1`` and the formula applies.
    """
    n = len(pairs)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in pairs) / n
    ca = Counter(a for a, _ in pairs)
    cb = Counter(b for _, b in pairs)
    p_e = sum(ca[v] * cb[v] for v in ca) / (n * n)
    if p_e >= 1.0:
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def agreement(units: Mapping[tuple[str, str], Mapping[str, str]]) -> dict:
    """Kappa per annotator pair (on the units both answered) and overall.

    Overall: every pair of annotators on every doubly annotated unit is one (A, B) pair, A before B in name
    order (pooled Cohen's kappa). Returns ``{"units": n doubly annotated, "overall": kappa or None,
    "pairs": {"alice|bob": {"n": .., "kappa": ..}}}``.
    """
    by_pair: dict[tuple[str, str], list[tuple[str, str]]] = {}
    n_units = 0
    for answers in units.values():
        if len(answers) < 2:
            continue
        n_units += 1
        for a, b in combinations(sorted(answers), 2):
            by_pair.setdefault((a, b), []).append((answers[a], answers[b]))
    pooled = [p for ps in by_pair.values() for p in ps]
    return {"units": n_units, "overall": cohen_kappa(pooled),
            "pairs": {f"{a}|{b}": {"n": len(ps), "kappa": cohen_kappa(ps)} for (a, b), ps in sorted(by_pair.items())}}


def split_units(units: Mapping[tuple[str, str], Mapping[str, str]], kinds: Iterable[str] = ("step", "fact")) -> dict:
    """:func:`agreement` separately for step marks and fact values (their value sets differ)."""
    return {k: agreement({u: v for u, v in units.items() if u[1].split(":", 1)[0] == k}) for k in kinds}


__all__ = ["agreement", "cohen_kappa", "split_units"]
