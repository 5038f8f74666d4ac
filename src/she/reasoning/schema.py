"""The step schema: which reasoning steps a trace has, in which order, and what each one concludes.

A trace is one step per line, ``Key: content``, and ends with the label::

    Query: cordless drill; brand=dewalt; size=20v
    Product: drill/driver kit; brand=DeWalt; size=20V; color=yellow
    Type: same
    Attributes: brand=match; size=match
    Verdict: Exact

Each step has a *kind* that says how its content is read:

``free``        free text (the query / product analysis). Only required to be non-empty.
``choice``      one word (or phrase) out of ``choices`` -- e.g. the type relation.
``attributes``  ``attr=value`` pairs separated by ``;`` where ``value`` is match / mismatch /
                unspecified, or ``none`` when nothing was checked. For this kind ``choices`` is the
                tuple of attribute names that may be checked, in the fixed order they are rendered.
                Attributes a trace does not mention are "not checked" (they imply no mismatch).
``label``       the relevance label of the schema's taxonomy; always the last step, so the label is
                generated *after* (and conditioned on) the reasoning.

Why a schema object rather than a hard-coded format: the verifier, the renderer, the parser and the
rationale writer must agree on the same steps, and users may add steps (e.g. a ``Negation`` step
for queries such as "sink without faucet") from YAML without touching code.

The step *names* ``query``, ``product``, ``type``, ``attributes``, ``negation``, ``specs`` and
``verdict`` have a meaning the rest of she relies on (the type step feeds the guideline rule, see
:func:`she.reasoning.parse.consistent_label`); the *keys* are just what is printed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from she.data.labels import get_taxonomy
from she.data.schema import ATTRIBUTES, MATCH_VALUES, TYPE_RELATIONS
from she.errors import UserError

STEP_KINDS = ("free", "choice", "attributes", "label")
_KEY_RE = re.compile(r"^[^\W\d_][^\W_]*(?:[ _-][^\W_]+){0,3}$")


def normalize_key(key: str) -> str:
    """Case/spacing-insensitive form of a step key: ``"Type_relation"`` -> ``"type relation"``."""
    return " ".join(re.split(r"[\s_-]+", key.strip().lower())).strip()


@dataclass(frozen=True)
class StepSpec:
    """One step of the trace.

    ``name`` is the stable identifier code refers to (``"type"``); ``key`` is the word printed at
    the start of the line (``"Type"``); ``aliases`` are other keys the tolerant parser accepts
    (e.g. ``"Label"`` for the verdict) -- they never appear in rendered traces.
    """

    name: str
    key: str
    kind: str
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise UserError(f"step name must be lowercase identifier-like (e.g. 'type'), got {self.name!r}")
        if not isinstance(self.key, str) or not _KEY_RE.match(self.key):
            raise UserError(
                f"step {self.name!r}: key must be 1-4 words of letters/digits starting with a letter, got {self.key!r}"
            )
        for a in self.aliases:
            if not isinstance(a, str) or not _KEY_RE.match(a):
                raise UserError(f"step {self.name!r}: bad alias {a!r}")
        if self.kind not in STEP_KINDS:
            raise UserError(f"step {self.name!r}: kind must be one of {STEP_KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise UserError(f"step {self.name!r}: a choice step needs a non-empty 'choices' list")
        elif self.kind == "attributes":
            if self.choices is None:
                object.__setattr__(self, "choices", ATTRIBUTES)
            bad = [c for c in self.choices if c not in ATTRIBUTES]
            if bad:
                raise UserError(f"step {self.name!r}: unknown attribute(s) {bad}; known: {list(ATTRIBUTES)}")
        elif self.choices is not None:
            raise UserError(f"step {self.name!r}: 'choices' is only allowed for choice/attributes steps")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
            lowered = [c.lower() for c in self.choices]
            if len(set(lowered)) != len(lowered) or any(not c.strip() for c in self.choices):
                raise UserError(f"step {self.name!r}: choices must be distinct non-empty strings")
        object.__setattr__(self, "aliases", tuple(self.aliases))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "key": self.key, "kind": self.kind}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.aliases:
            d["aliases"] = list(self.aliases)
        return d


@dataclass
class StepSchema:
    """An ordered list of steps plus the label taxonomy of the final (label) step."""

    steps: list[StepSpec]
    taxonomy: str = "hd3"
    _by_key: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        get_taxonomy(self.taxonomy)  # raises on an unknown taxonomy
        self.steps = list(self.steps)
        if not self.steps:
            raise UserError("a step schema needs at least one step")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise UserError(f"duplicate step names in schema: {names}")
        label_steps = [i for i, s in enumerate(self.steps) if s.kind == "label"]
        if label_steps != [len(self.steps) - 1]:
            raise UserError("a step schema needs exactly one 'label' step and it must be the last one")
        self._by_key = {}
        for i, s in enumerate(self.steps):
            for k in (s.key, s.name, *s.aliases):
                nk = normalize_key(k)
                if nk in self._by_key and self._by_key[nk] != i:
                    raise UserError(f"key/alias {k!r} is used by two steps")
                self._by_key[nk] = i

    # -- lookups ---------------------------------------------------------------------------
    def index_of_key(self, key: str) -> int | None:
        """Index of the step whose key, name or alias is ``key`` (case/spacing-insensitive)."""
        return self._by_key.get(normalize_key(key))

    def step(self, name: str) -> StepSpec | None:
        for s in self.steps:
            if s.name == name:
                return s
        return None

    @property
    def label_step(self) -> StepSpec:
        return self.steps[-1]

    @property
    def labels(self) -> tuple[str, ...]:
        return get_taxonomy(self.taxonomy).labels

    def for_taxonomy(self, taxonomy: str) -> "StepSchema":
        """The same steps with ``taxonomy``'s labels (``self`` when it already has them). Steps do not depend on
        the taxonomy, so this equals ``resolve_schema(spec, taxonomy)`` for the spec ``self`` came from."""
        return self if taxonomy == self.taxonomy else StepSchema(list(self.steps), taxonomy)

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"taxonomy": self.taxonomy, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | list[Any], *, taxonomy: str | None = None, where: str = "schema") -> "StepSchema":
        """Build a schema from ``{"taxonomy": ..., "steps": [...]}`` or a bare list of step dicts.

        Each step dict has ``name``, ``key``, ``kind`` and optionally ``choices`` and ``aliases``.
        ``where`` names the source (file) in error messages.
        """
        if isinstance(d, list):
            raw_steps, tax = d, taxonomy or "hd3"
        elif isinstance(d, dict):
            unknown = set(d) - {"taxonomy", "steps"}
            if unknown:
                raise UserError(f"{where}: unknown field(s) {sorted(unknown)}; expected 'taxonomy' and 'steps'")
            if "steps" not in d:
                raise UserError(f"{where}: missing field 'steps'")
            raw_steps, tax = d["steps"], taxonomy or d.get("taxonomy", "hd3")
        else:
            raise UserError(f"{where}: a step schema must be a list of steps or an object with 'steps'")
        if not isinstance(raw_steps, list):
            raise UserError(f"{where}: 'steps' must be a list")
        steps = []
        for i, s in enumerate(raw_steps):
            if not isinstance(s, dict):
                raise UserError(f"{where}: steps[{i}] must be an object")
            unknown = set(s) - {"name", "key", "kind", "choices", "aliases"}
            if unknown:
                raise UserError(f"{where}: steps[{i}]: unknown field(s) {sorted(unknown)}")
            for req in ("name", "key", "kind"):
                if req not in s:
                    raise UserError(f"{where}: steps[{i}]: missing field {req!r}")
            choices = s.get("choices")
            if choices is not None and not isinstance(choices, (list, tuple)):
                raise UserError(f"{where}: steps[{i}].choices must be a list")
            aliases = s.get("aliases") or ()
            if not isinstance(aliases, (list, tuple)):
                raise UserError(f"{where}: steps[{i}].aliases must be a list")
            try:
                steps.append(StepSpec(str(s["name"]), str(s["key"]), str(s["kind"]),
                                      None if choices is None else tuple(choices), tuple(aliases)))
            except ValueError as e:
                raise UserError(f"{where}: steps[{i}]: {e}") from None
        try:
            return cls(steps, str(tax))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None


def load_schema(path: str | Path, *, taxonomy: str | None = None) -> StepSchema:
    """Load a step schema from a YAML or JSON file (see :meth:`StepSchema.from_dict`)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: line {e.lineno}: invalid JSON: {e.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f"line {mark.line + 1}: " if mark is not None else ""
            raise UserError(f"{p}: {line}invalid YAML: {e}") from None
    return StepSchema.from_dict(data, taxonomy=taxonomy, where=str(p))


def builtin_schema(taxonomy: str = "hd3") -> StepSchema:
    """Query analysis, product analysis, type relation, attribute checks, verdict."""
    return StepSchema(
        [
            StepSpec("query", "Query", "free"),
            StepSpec("product", "Product", "free"),
            StepSpec("type", "Type", "choice", TYPE_RELATIONS, aliases=("Type relation", "Relation")),
            StepSpec("attributes", "Attributes", "attributes", ATTRIBUTES, aliases=("Attribute checks", "Attribute")),
            StepSpec("verdict", "Verdict", "label", aliases=("Label", "Relevance", "Final verdict")),
        ],
        taxonomy,
    )


# ---------------------------------------------------------------------------------------------
# schema variants: which schema a model writes is a property of the model (she.json "schema")
# ---------------------------------------------------------------------------------------------
COVERAGE_STEP = StepSpec("coverage", "Missing", "free", aliases=("Missing words", "Coverage"))


def coverage_schema(taxonomy: str = "hd3") -> StepSchema:
    """The built-in steps plus ``Missing`` after ``Product``: the query words the product text lacks.

    Why (docs/reasoning-format.md, "The coverage step"): on Home Depot, every model trained on the
    built-in schema had label AUC ~0.5 -- its Type line said ``same`` for 97 % of pairs, so the verdict
    conditioned on nothing. The share of query words found in the title alone reaches Macro F1 0.46
    with two thresholds. ``Missing`` makes that evidence an explicit, *computable* step: the rationale
    writer fills it label-free (:func:`she.reasoning.rationale.missing_query_words`) and the verifier
    checks every rollout's ``Missing`` line exactly, so SRPO has a dense, correct step reward there.
    """
    steps = list(builtin_schema(taxonomy).steps)
    at = next((i + 1 for i, s in enumerate(steps) if s.name == "product"), 0)
    steps.insert(at, COVERAGE_STEP)
    return StepSchema(steps, taxonomy)


NUMBERS_STEP = StepSpec("numbers", "Numbers", "free", aliases=("Quantities",))
HEAD_STEP = StepSpec("head", "Head", "free", aliases=("Head noun",))


def grounded_schema(taxonomy: str = "hd3") -> StepSchema:
    """The coverage schema plus ``Numbers`` and ``Head`` after ``Missing``, before the Type/label conclusions.

    Every evidence step between ``Product`` and ``Type`` is computed from the pair's strings, label-free, and
    checked exactly by the verifier (docs/reasoning-format.md, "The grounded schema"): ``Missing`` (query words
    the product lacks), ``Numbers`` (each query quantity: match/mismatch/missing in the product,
    :func:`she.reasoning.rationale.number_checks`) and ``Head`` (the query's head noun found in the title or not,
    :func:`she.reasoning.rationale.head_check`). Why: the Type line is derived from the gold label and the policy
    cannot check it; computed evidence it can, and the verifier can reward it on every rollout.
    """
    steps = list(coverage_schema(taxonomy).steps)
    at = next(i + 1 for i, s in enumerate(steps) if s.name == "coverage")
    steps[at:at] = [NUMBERS_STEP, HEAD_STEP]
    return StepSchema(steps, taxonomy)


def evidence_schema(taxonomy: str = "hd3") -> StepSchema:
    """The grounded schema without its label-derived conclusions: ``Query``, ``Product``, the computed evidence
    (``Missing``, ``Numbers``, ``Head``), then ``Verdict`` -- no ``Type`` and no ``Attributes`` line.

    Why (docs/reasoning-format.md, "The evidence schema"): in the other schemas the SFT traces state a Type and
    Attributes chosen *from the gold label*, so the policy learns to guess a conclusion the pair does not show
    and copies the verdict from that guess (verdict p ~ 0.9999 given Type). Here every step before the verdict is
    computed from the pair and checked exactly by the verifier, and the verdict is the policy's own reading of that
    evidence: a gradient-boosting classifier on the same evidence (query length, words missing, numbers
    matched/contradicted/missing, head found) reaches Macro F1 0.47 on the held-out Home Depot pairs from 1,500
    training pairs -- the headroom the reasoning judge was missing.
    """
    return StepSchema([s for s in grounded_schema(taxonomy).steps if s.name not in ("type", "attributes")], taxonomy)


SIMILARITY_STEP = StepSpec("similarity", "Similarity", "choice", choices=("low", "medium", "high"))


def semantic_schema(taxonomy: str = "hd3") -> StepSchema:
    """The evidence schema plus ``Similarity`` (``low`` / ``medium`` / ``high``) after ``Head``: the bucket of the
    MiniLM cosine between query and product (:mod:`she.reasoning.similarity`), computed label-free and checked
    exactly by the verifier like the lexical evidence.

    Why (docs/reasoning-format.md, "The semantic schema"): on the evidence schema all steps right are worth ~2.5
    points to the verdict -- the lexical evidence carries little the policy does not read from the pair itself, so
    a step reward there cannot beat the outcome reward by much. A semantic step is one the policy cannot copy from
    the strings and that carries what the label needs: the hypothesis for a step with head-room.
    """
    steps = list(evidence_schema(taxonomy).steps)
    at = next(i + 1 for i, s in enumerate(steps) if s.name == "head")
    steps.insert(at, SIMILARITY_STEP)
    return StepSchema(steps, taxonomy)


RELEVANT_STEP = StepSpec("relevant", "Relevant", "choice", choices=("yes", "no"))


def decision_schema(taxonomy: str = "hd3") -> StepSchema:
    """The semantic schema plus ``Relevant`` (``yes`` / ``no``) before ``Verdict``: the first decision of the label
    hierarchy (any relevance at all), stated as its own step; the verdict then places a relevant pair on the rest of
    the scale (Partial or Exact on hd3).

    Why (docs/srpo.md, "A decision step"): every step of the semantic schema is computed from the pair, and the
    judge's errors are in the verdict it reads from right evidence (the same SFT reading exactly right steps gains
    only ~4 points), so a step reward on the evidence has less head-room than the seed noise. ``Relevant`` is a
    step whose truth is the human label's (the offline verifier checks it exactly: ``no`` iff the gold label is the
    taxonomy's least relevant one), which the pair does not show, and which fixes a third of the verdict. A
    rollout that says ``Relevant: yes`` on a Partial pair and then ``Exact`` made one right decision and one wrong
    one; the outcome reward blames both, a step reward can tell them apart. It is label-derived, so the schema has
    no computed-evidence mode.
    """
    steps = list(semantic_schema(taxonomy).steps)
    steps.insert(len(steps) - 1, RELEVANT_STEP)
    return StepSchema(steps, taxonomy)


SCHEMAS: dict[str, Callable[[str], StepSchema]] = {"default": builtin_schema, "coverage": coverage_schema,
                                                   "grounded": grounded_schema, "evidence": evidence_schema,
                                                   "semantic": semantic_schema, "decision": decision_schema}


@functools.lru_cache(maxsize=64)
def _resolve(spec: str, taxonomy: str) -> StepSchema:
    if spec in SCHEMAS:
        return SCHEMAS[spec](taxonomy)
    if Path(spec).suffix.lower() in (".yaml", ".yml", ".json"):
        if not Path(spec).is_file():
            raise UserError(f"schema file {spec} does not exist")
        return load_schema(spec, taxonomy=taxonomy)
    raise UserError(f"unknown schema {spec!r}: use one of {sorted(SCHEMAS)} or a .yaml/.json schema file")


def resolve_schema(spec: str | None, taxonomy: str = "hd3") -> StepSchema:
    """The schema named ``spec`` (a key of :data:`SCHEMAS`, or a YAML/JSON file) for ``taxonomy``.

    The one way to turn a spec -- ``schema:`` of an SFT config, ``schema`` of a model's ``she.json`` -- into a
    :class:`StepSchema`. There is no schema "in effect": entry points (``she train sft|srpo|grpo|dpo|rm|prm``,
    ``she eval``/``predict``/``calibrate``, ``she data filter``, ``she compare``, the service) resolve the spec
    of the config or of the model they read and pass the schema down as an argument to the prompts, the
    rationale writer, the parser and whatever else reads traces."""
    return _resolve(str(spec or "default"), taxonomy)


def default_schema(taxonomy: str = "hd3") -> StepSchema:
    """The built-in schema of ``taxonomy`` (spec ``default``): what a function uses when it is given no schema."""
    return builtin_schema(taxonomy)


def schema_for(schema: StepSchema | None, taxonomy: str) -> StepSchema:
    """``schema`` with ``taxonomy``'s labels (:meth:`StepSchema.for_taxonomy`), or the built-in schema of
    ``taxonomy`` when ``schema`` is None: the schema of one record, from the schema of its job."""
    return default_schema(taxonomy) if schema is None else schema.for_taxonomy(taxonomy)


def marginal_step(schema: StepSchema) -> StepSpec:
    """The step ``evidence: marginal`` reads as a probability: the choice step right before the verdict (``Relevant``
    of the decision schema, ``Similarity`` of the semantic one). ``UserError`` when the schema has none."""
    steps = schema.steps
    if len(steps) < 2 or steps[-2].kind != "choice":
        last = steps[-2].key if len(steps) > 1 else None
        raise UserError(f"evidence: marginal reads the verdict over the values of the choice step right before it; "
                        f"this schema has {last!r} there ({'a ' + steps[-2].kind + ' step' if last else 'no step'})")
    return steps[-2]


__all__ = [
    "COVERAGE_STEP",
    "HEAD_STEP",
    "NUMBERS_STEP",
    "RELEVANT_STEP",
    "SIMILARITY_STEP",
    "SCHEMAS",
    "builtin_schema",
    "coverage_schema",
    "grounded_schema",
    "evidence_schema",
    "semantic_schema",
    "decision_schema",
    "resolve_schema",
    "schema_for",
    "ATTRIBUTES",
    "MATCH_VALUES",
    "STEP_KINDS",
    "TYPE_RELATIONS",
    "StepSchema",
    "StepSpec",
    "default_schema",
    "load_schema",
    "marginal_step",
    "normalize_key",
]
