"""The project's relevance guideline as a pure function of the step conclusions.

The Home Depot raters' guideline says brand, material and function matter; the same product type in
another brand/size/colour/spec is *Partial*; an accessory, part, cover or tool *for* the thing searched
is *Irrelevant*. Written over the step facts of :mod:`she.data.schema` it becomes:

hd3
    type ``accessory`` or ``different`` -> Irrelevant; type ``related`` -> Partial;
    type ``same`` and any attribute ``mismatch`` -> Partial; type ``same`` and no mismatch -> Exact.
esci4
    ``different`` -> Irrelevant; ``accessory`` -> Complement; ``related``, or ``same`` with any
    mismatch -> Substitute; ``same`` and no mismatch -> Exact.

Keeping this in one tiny module matters because three places must agree on it: the synthetic data
generator (labels *are* this function of the true facts), the step verifier (a reasoning chain whose
steps are right must reach this label) and the docs. ``unspecified`` never counts as a mismatch: a
query that names no colour cannot be failed on colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from she.data.schema import ATTRIBUTES, MATCH_VALUES, TYPE_RELATIONS, Record, StepFacts
from she.errors import UserError

GUIDELINE_TAXONOMIES = ("hd3", "esci4")


def guideline_label(type_relation: str, attribute_results: Mapping[str, str], taxonomy: str = "hd3") -> str:
    """Return the guideline label for a type relation and per-attribute match results.

    ``attribute_results`` maps a subset of ``ATTRIBUTES`` (brand, color, material, size, function) to
    ``match`` / ``mismatch`` / ``unspecified``; attributes left out count as ``unspecified``.
    Raises ``ValueError`` naming the offending argument for anything outside the vocabulary, so a
    typo in a caller can never silently turn into an "Exact".
    """
    if taxonomy not in GUIDELINE_TAXONOMIES:
        raise UserError(f"no guideline rule for taxonomy {taxonomy!r}; known: {list(GUIDELINE_TAXONOMIES)}")
    if type_relation not in TYPE_RELATIONS:
        raise ValueError(f"type_relation must be one of {TYPE_RELATIONS}, got {type_relation!r}")
    for name, value in attribute_results.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r} in attribute_results; expected one of {ATTRIBUTES}")
        if value not in MATCH_VALUES:
            raise ValueError(f"attribute_results[{name!r}] must be one of {MATCH_VALUES}, got {value!r}")
    any_mismatch = any(v == "mismatch" for v in attribute_results.values())

    if taxonomy == "hd3":
        if type_relation in ("accessory", "different"):
            return "Irrelevant"
        if type_relation == "related" or any_mismatch:
            return "Partial"
        return "Exact"
    # esci4
    if type_relation == "different":
        return "Irrelevant"
    if type_relation == "accessory":
        return "Complement"
    if type_relation == "related" or any_mismatch:
        return "Substitute"
    return "Exact"


def label_from_facts(facts: StepFacts, taxonomy: str = "hd3") -> str:
    """Apply :func:`guideline_label` to a :class:`StepFacts`.

    Attributes that are ``None`` (no human fact known) are treated as ``unspecified``; a missing
    ``type_relation`` is an error because the rule cannot be applied without it.
    """
    if facts.type_relation is None:
        raise UserError("facts.type_relation is missing; the guideline label needs it")
    results = {a: getattr(facts, a) for a in ATTRIBUTES if getattr(facts, a) is not None}
    return guideline_label(facts.type_relation, results, taxonomy)


def labels_from_facts(records: Sequence[Record]) -> list[Record]:
    """``records`` with each label replaced by the one its step facts imply (:func:`label_from_facts` in the
    record's taxonomy): the same pairs with clean labels, where the data's labels are noisy and its facts are
    true (``rl.outcome_labels: facts``; the synthetic generator's ``label_noise``). A record without a
    ``type_relation`` fact is an error naming it: a control that relabels only some pairs is not one."""
    out = []
    for r in records:
        if r.facts.type_relation is None:
            raise UserError(f"outcome_labels: facts needs a type_relation fact on every RL record; record {r.id!r} has "
                            f"none (set rl.outcome_labels: data, or annotate it)")
        out.append(replace(r, label=label_from_facts(r.facts, r.taxonomy)))
    return out


def consistent_type_relations(label: str, taxonomy: str = "hd3") -> tuple[str, ...]:
    """Type relations from which the guideline can reach ``label`` (with some attribute outcome).

    The inverse of :func:`guideline_label` over the type step, computed by enumeration so that it can
    never drift from the rule. hd3: Exact -> (same,); Partial -> (same, related); Irrelevant ->
    (accessory, different). A human label therefore *is* a human fact about the type step whenever this
    set excludes what a rollout concluded: the verifier uses it on data that has labels but no step facts.
    """
    return tuple(
        t for t in TYPE_RELATIONS
        if any(guideline_label(t, {"brand": m}, taxonomy) == label for m in ("match", "mismatch"))
    )


def label_allows_mismatch(label: str, taxonomy: str = "hd3") -> bool:
    """Whether any attribute mismatch is compatible with ``label`` (False only for Exact)."""
    return any(guideline_label(t, {"brand": "mismatch"}, taxonomy) == label for t in TYPE_RELATIONS)
