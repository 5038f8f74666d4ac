"""The one canonical record every loader produces and every other part of she consumes.

A :class:`Record` is a (query, product) pair with a relevance label, optional query metadata and
optional **human step facts** -- the facts an offline verifier can check reasoning steps against.

Step-fact vocabulary (every field optional; ``None`` means "no human fact known"):

=================  ==========================================================================
``type_relation``  ``same`` (the product is the kind of thing asked for), ``related`` (a usable
                   alternative / substitute type), ``accessory`` (a part, accessory, tool or
                   cover *for* the thing asked for) or ``different`` (unrelated type).
``brand``          ``match`` / ``mismatch`` / ``unspecified`` (the query names no brand).
``color``          same three values, for colour.
``material``       same three values.
``size``           same three values (dimensions, capacity, count).
``function``       same three values (what it does: cordless, outdoor, waterproof, ...).
``specs_met``      ``yes`` / ``no``: all specifications of the query are met (ESCI E vs S).
``negation``       ``yes`` / ``no``: the query excludes something ("without", "no", "not").
``query_class``    free text: the human product category of the query intent (WANDS).
``product_class``  free text: the human product category of the product (WANDS).
=================  ==========================================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from she.errors import UserError

TYPE_RELATIONS = ("same", "related", "accessory", "different")
MATCH_VALUES = ("match", "mismatch", "unspecified")
ATTRIBUTES = ("brand", "color", "material", "size", "function")
YES_NO = ("yes", "no")


@dataclass
class Product:
    title: str
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Product":
        if not isinstance(d, dict):
            raise UserError("product must be an object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown product field(s): {sorted(unknown)}")
        title = d.get("title")
        if not isinstance(title, str) or not title.strip():
            raise UserError("product.title must be a non-empty string")
        attrs = d.get("attributes") or {}
        if not isinstance(attrs, dict):
            raise UserError("product.attributes must be an object of strings")
        return cls(
            title=title,
            brand=_opt_str(d.get("brand"), "product.brand"),
            color=_opt_str(d.get("color"), "product.color"),
            description=_opt_str(d.get("description"), "product.description"),
            attributes={str(k): str(v) for k, v in attrs.items()},
        )


@dataclass
class StepFacts:
    type_relation: str | None = None
    brand: str | None = None
    color: str | None = None
    material: str | None = None
    size: str | None = None
    function: str | None = None
    specs_met: str | None = None
    negation: str | None = None
    query_class: str | None = None
    product_class: str | None = None

    def __post_init__(self) -> None:
        if self.type_relation is not None and self.type_relation not in TYPE_RELATIONS:
            raise UserError(f"facts.type_relation must be one of {TYPE_RELATIONS}, got {self.type_relation!r}")
        for a in ATTRIBUTES:
            v = getattr(self, a)
            if v is not None and v not in MATCH_VALUES:
                raise UserError(f"facts.{a} must be one of {MATCH_VALUES}, got {v!r}")
        for a in ("specs_met", "negation"):
            v = getattr(self, a)
            if v is not None and v not in YES_NO:
                raise UserError(f"facts.{a} must be one of {YES_NO}, got {v!r}")

    def known(self) -> dict[str, str]:
        """The facts that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def is_empty(self) -> bool:
        return not self.known()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StepFacts":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise UserError("facts must be an object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown fact(s): {sorted(unknown)}")
        return cls(**{k: (None if v is None else str(v)) for k, v in d.items()})


@dataclass
class Record:
    id: str
    query: str
    product: Product
    label: str | None = None  # canonical label name in ``taxonomy``; None for unlabelled (predict) input
    taxonomy: str = "hd3"
    score: float | None = None  # raw human rating where the source has one (Home Depot mean rating)
    query_id: str | None = None
    query_meta: dict[str, str] = field(default_factory=dict)  # e.g. {"query_type": "negation"}
    facts: StepFacts = field(default_factory=StepFacts)
    source: str = "jsonl"

    @property
    def group(self) -> str:
        """Key used for query-disjoint splits."""
        return self.query_id if self.query_id is not None else normalize_query(self.query)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["facts"] = self.facts.known()
        d["product"] = {k: v for k, v in d["product"].items() if v not in (None, {})}
        return {k: v for k, v in d.items() if v is not None and v != {}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        """Build a record from the generic JSONL schema (see docs/data.md). Raises ValueError naming the field."""
        if not isinstance(d, dict):
            raise UserError("a record must be a JSON object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown field(s): {sorted(unknown)}")
        for req in ("id", "query", "product"):
            if req not in d:
                raise UserError(f"missing field {req!r}")
        rid = d["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            raise UserError("field 'id' must be a non-empty string or integer")
        query = d["query"]
        if not isinstance(query, str) or not query.strip():
            raise UserError("field 'query' must be a non-empty string")
        product = Product.from_dict(d["product"])
        taxonomy = d.get("taxonomy", "hd3")
        if not isinstance(taxonomy, str):
            raise UserError("field 'taxonomy' must be a string")
        from she.data.labels import get_taxonomy

        tax = get_taxonomy(taxonomy)
        label = d.get("label")
        if label is not None:
            label = tax.normalize(str(label))
        score = d.get("score")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise UserError("field 'score' must be a number")
            # JSON allows NaN/Infinity and huge integers; a non-finite score would poison every average
            try:
                finite = math.isfinite(score)
            except OverflowError:  # an integer beyond the float range
                finite = False
            if not finite:
                raise UserError("field 'score' must be a finite number")
        meta = d.get("query_meta") or {}
        if not isinstance(meta, dict):
            raise UserError("field 'query_meta' must be an object")
        qid = d.get("query_id")
        if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int))):
            raise UserError("field 'query_id' must be a string or integer")
        return cls(
            id=str(rid),
            query=query,
            product=product,
            label=label,
            taxonomy=taxonomy,
            score=None if score is None else float(score),
            query_id=None if qid is None else str(qid),
            query_meta={str(k): str(v) for k, v in meta.items()},
            facts=StepFacts.from_dict(d.get("facts")),
            source=str(d.get("source", "jsonl")),
        )


def normalize_query(q: str) -> str:
    return " ".join(q.lower().split())


def _opt_str(v: Any, name: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise UserError(f"{name} must be a string")
    return v
