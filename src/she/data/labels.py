"""Label taxonomies and the mappings between them.

A taxonomy is an ordered tuple of label names, least relevant first, so the index of a label is its
ordinal grade (used for ordinal partial credit and for thresholds).

Built-in taxonomies
-------------------
``hd3``      Home Depot / WANDS style 3-level scale: Irrelevant < Partial < Exact.
``esci4``    Amazon ESCI: Irrelevant < Complement < Substitute < Exact.
``taobao4``  Taobao-style 4-level scale used by TaoSR papers: Irrelevant < Mismatch (same broad
             category, a key attribute is wrong) < Related (a usable alternative) < Excellent.

Mappings between them are explicit tables (``MAPPINGS``), not index arithmetic, because the scales
do not line up one-to-one (an ESCI Complement is *Irrelevant* for the Home Depot raters, who are told
that an accessory for the item searched is irrelevant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from she.errors import UserError


@dataclass(frozen=True)
class Taxonomy:
    name: str
    labels: tuple[str, ...]  # least relevant first
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, canonical), case-insensitive

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"taxonomy {self.name!r} has duplicate labels")

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str) -> int:
        return self.labels.index(self.normalize(label))

    def normalize(self, label: str) -> str:
        """Return the canonical spelling of ``label`` or raise ``ValueError``."""
        key = str(label).strip().lower()
        for name in self.labels:
            if name.lower() == key:
                return name
        for alias, canonical in self.aliases:
            if alias.lower() == key:
                return canonical
        raise UserError(f"unknown label {label!r} for taxonomy {self.name!r}; expected one of {list(self.labels)}")

    def is_valid(self, label: str) -> bool:
        try:
            self.normalize(label)
            return True
        except ValueError:
            return False


TAXONOMIES: dict[str, Taxonomy] = {
    "hd3": Taxonomy(
        "hd3",
        ("Irrelevant", "Partial", "Exact"),
        aliases=(("1", "Irrelevant"), ("2", "Partial"), ("3", "Exact"), ("perfect", "Exact"),
                 ("partially relevant", "Partial"), ("I", "Irrelevant"), ("P", "Partial"), ("E", "Exact")),
    ),
    "esci4": Taxonomy(
        "esci4",
        ("Irrelevant", "Complement", "Substitute", "Exact"),
        aliases=(("I", "Irrelevant"), ("C", "Complement"), ("S", "Substitute"), ("E", "Exact")),
    ),
    "taobao4": Taxonomy(
        "taobao4",
        ("Irrelevant", "Mismatch", "Related", "Excellent"),
        aliases=(("L1", "Irrelevant"), ("L2", "Mismatch"), ("L3", "Related"), ("L4", "Excellent")),
    ),
}

# (source, target) -> {source label: target label}
MAPPINGS: dict[tuple[str, str], dict[str, str]] = {
    ("esci4", "hd3"): {"Exact": "Exact", "Substitute": "Partial", "Complement": "Irrelevant", "Irrelevant": "Irrelevant"},
    ("hd3", "esci4"): {"Exact": "Exact", "Partial": "Substitute", "Irrelevant": "Irrelevant"},
    ("taobao4", "hd3"): {"Excellent": "Exact", "Related": "Partial", "Mismatch": "Partial", "Irrelevant": "Irrelevant"},
    ("hd3", "taobao4"): {"Exact": "Excellent", "Partial": "Related", "Irrelevant": "Irrelevant"},
    ("esci4", "taobao4"): {"Exact": "Excellent", "Substitute": "Related", "Complement": "Mismatch", "Irrelevant": "Irrelevant"},
    ("taobao4", "esci4"): {"Excellent": "Exact", "Related": "Substitute", "Mismatch": "Complement", "Irrelevant": "Irrelevant"},
}


def get_taxonomy(name: str) -> Taxonomy:
    try:
        return TAXONOMIES[name]
    except KeyError:
        raise UserError(f"unknown taxonomy {name!r}; known: {sorted(TAXONOMIES)}") from None


def map_label(label: str, source: str, target: str) -> str:
    """Map ``label`` from taxonomy ``source`` to taxonomy ``target``."""
    src = get_taxonomy(source)
    canonical = src.normalize(label)
    if source == target:
        return canonical
    try:
        table = MAPPINGS[(source, target)]
    except KeyError:
        raise UserError(f"no label mapping from {source!r} to {target!r}") from None
    return table[canonical]


# the raters' scale behind a taxonomy whose labels are cuts of a mean rating: (lowest, highest) rating
RATING_SCALES: dict[str, tuple[float, float]] = {"hd3": (1.0, 3.0)}


def rating_scale(rating: float, taxonomy: str) -> tuple[float, float] | None:
    """The raters' scale (lo, hi) of ``taxonomy``, None without one; ``ValueError`` if ``rating`` lies outside it."""
    if taxonomy not in RATING_SCALES:
        return None
    lo, hi = RATING_SCALES[taxonomy]
    if not (math.isfinite(rating) and lo <= rating <= hi):
        raise ValueError(f"rating {rating} is outside the {taxonomy} raters' scale [{lo}, {hi}]")
    return lo, hi


def rating_agreement(label: str, rating: float, taxonomy: str) -> float | None:
    """How well ``label`` agrees with a pair's mean human rating, in [0, 1]: ``1 - |rating - r(label)| / (hi - lo)``,
    ``r(label)`` the rating the label's grade stands for on the raters' scale (hd3: Irrelevant 1, Partial 2, Exact 3).
    None for a taxonomy without a rating scale. A label outside the taxonomy is ``ValueError``.

    Why: the gold label is a cut of the mean rating (:func:`rating_to_label`) and keeps only its side of the cut; the
    mean also says how far from it the raters were. Exact on a pair rated 2.33 (gold Partial) agrees 0.67, on one
    rated 1.33 (gold Irrelevant) 0.17 (docs/srpo.md, "Rated verdicts")."""
    scale = rating_scale(rating, taxonomy)
    if scale is None:
        return None
    lo, hi = scale
    tax = get_taxonomy(taxonomy)
    grade = lo + tax.index(label) * (hi - lo) / (len(tax.labels) - 1)
    return 1.0 - abs(rating - grade) / (hi - lo)


def check_rating_scale(records, what: str) -> None:
    """``UserError`` naming the first record whose ``score`` lies outside its taxonomy's raters' scale: ``what`` (the
    setting that reads the ratings) would fail on it mid-run. Records without a score, or of a taxonomy without a
    rating scale, pass (they keep the gold label's 0/1)."""
    for r in records:
        if r.score is None:
            continue
        try:
            rating_scale(r.score, r.taxonomy)
        except ValueError as e:
            raise UserError(f"{what} reads each pair's mean rating, but record {r.id!r} has score {r.score}: {e}; "
                            "fix its 'score' field or drop the setting") from None


def rating_distribution(rating: float, taxonomy: str) -> dict[str, float] | None:
    """The rating spread over the two grades around it, linearly: on hd3 2.33 -> Partial 0.67, Exact 0.33; 3.0 ->
    Exact 1. The distribution over labels whose expected grade is the rating with the least spread. None for a
    taxonomy without a rating scale; a rating outside the scale is ``ValueError``."""
    scale = rating_scale(rating, taxonomy)
    if scale is None:
        return None
    lo, hi = scale
    labels = get_taxonomy(taxonomy).labels
    x = (rating - lo) / (hi - lo) * (len(labels) - 1)  # the rating in grade units, 0 .. K-1
    k = min(int(math.floor(x)), len(labels) - 2)
    out = {lab: 0.0 for lab in labels}
    out[labels[k]] += k + 1 - x
    out[labels[k + 1]] += x - k
    return out


def rated_targets(label: str, rating: float, taxonomy: str, mix: float) -> dict[str, float] | None:
    """Soft SFT targets of a pair: ``(1 - mix) x onehot(label) + mix x rating_distribution(rating)``. On hd3 with mix
    0.5 a Partial pair rated 2.33 gives Partial 0.83, Exact 0.17; one rated 2.0 stays Partial 1. The gold label keeps
    the largest share while ``mix`` < 0.75 at the 1.75 / 2.5 cuts (a pair rated 1.67 gives Irrelevant 1 - 2 mix / 3).
    None for a taxonomy without a rating scale (docs/reasoning-format.md, "Rated targets")."""
    if not 0.0 <= mix < 1.0:
        raise UserError(f"rating_targets (the mix) must be in [0, 1), got {mix}")
    spread = rating_distribution(rating, taxonomy)
    if spread is None:
        return None
    gold = get_taxonomy(taxonomy).normalize(label)
    return {lab: (1.0 - mix) * (lab == gold) + mix * p for lab, p in spread.items()}


def rating_to_label(rating: float, cuts: tuple[float, float] = (1.75, 2.5)) -> str:
    """Home Depot mean rating (1..3) to an ``hd3`` label: Irrelevant < cuts[0] <= Partial < cuts[1] <= Exact."""
    lo, hi = cuts
    if not lo <= hi:
        raise UserError(f"rating cuts must be ascending, got {cuts}")
    if rating < lo:
        return "Irrelevant"
    if rating < hi:
        return "Partial"
    return "Exact"
