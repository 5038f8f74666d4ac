"""Render step conclusions to trace text -- the one canonical spelling the policy is trained on.

Rendering is deterministic (same input, same bytes) so SFT targets, teacher traces and rationales
all share one surface form, and strict: an unknown step, a choice outside the schema or a bad label
is a ``ValueError`` naming the step, never silently dropped or "fixed".
"""

from __future__ import annotations

from collections.abc import Mapping

from she.data.labels import get_taxonomy
from she.data.schema import MATCH_VALUES
from she.reasoning.schema import StepSchema, StepSpec

NO_ATTRIBUTES = "none"  # what an attributes step says when nothing was checked


def format_attributes(results: Mapping[str, str], order: tuple[str, ...]) -> str:
    """``{"size": "match", "brand": "mismatch"}`` -> ``"brand=mismatch; size=match"`` (fixed ``order``)."""
    unknown = [a for a in results if a not in order]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; allowed: {list(order)}")
    parts = []
    for a in order:
        if a in results:
            v = str(results[a]).strip().lower()
            if v not in MATCH_VALUES:
                raise ValueError(f"attribute {a!r}: value must be one of {MATCH_VALUES}, got {results[a]!r}")
            parts.append(f"{a}={v}")
    return "; ".join(parts) if parts else NO_ATTRIBUTES


def one_line(text: str) -> str:
    """Collapse all whitespace (including newlines) so a free-text step stays on its own line."""
    return " ".join(str(text).split())


def render_step(spec: StepSpec, value: str | Mapping[str, str], taxonomy: str) -> str:
    """The text after ``Key: `` for one step."""
    if spec.kind == "attributes":
        if isinstance(value, str):
            from she.reasoning.parse import parse_attributes

            parsed, errors = parse_attributes(value, spec.choices or ())
            if errors or parsed is None:
                raise ValueError(f"step {spec.name!r}: cannot read attributes {value!r}: {'; '.join(errors)}")
            value = parsed
        if not isinstance(value, Mapping):
            raise ValueError(f"step {spec.name!r}: attributes must be a dict attr->match/mismatch/unspecified")
        try:
            return format_attributes(value, spec.choices or ())
        except ValueError as e:
            raise ValueError(f"step {spec.name!r}: {e}") from None
    if not isinstance(value, str):
        raise ValueError(f"step {spec.name!r}: expected a string, got {type(value).__name__}")
    if spec.kind == "free":
        text = one_line(value)
        if not text:
            raise ValueError(f"step {spec.name!r}: free-text step must not be empty")
        return text
    if spec.kind == "choice":
        key = one_line(value).lower()
        for c in spec.choices or ():
            if c.lower() == key:
                return c
        raise ValueError(f"step {spec.name!r}: {value!r} is not one of {list(spec.choices or ())}")
    # label
    try:
        return get_taxonomy(taxonomy).normalize(value)
    except ValueError as e:
        raise ValueError(f"step {spec.name!r}: {e}") from None


def render_trace(steps: Mapping[str, str | Mapping[str, str]], schema: StepSchema) -> str:
    """Render ``{step name (or key): value}`` in schema order, one ``Key: value`` line per step.

    Every schema step must be given and nothing else; the result has no trailing newline (the
    label is the last thing the policy generates before end-of-sequence).
    """
    by_index: dict[int, str | Mapping[str, str]] = {}
    for k, v in steps.items():
        i = None
        for j, s in enumerate(schema.steps):
            if k == s.name or k == s.key:
                i = j
                break
        if i is None:
            raise ValueError(f"unknown step {k!r}; schema steps: {[s.name for s in schema.steps]}")
        if i in by_index:
            raise ValueError(f"step {schema.steps[i].name!r} given twice (by name and by key)")
        by_index[i] = v
    missing = [s.name for j, s in enumerate(schema.steps) if j not in by_index]
    if missing:
        raise ValueError(f"missing step(s) {missing}")
    return "\n".join(
        f"{s.key}: {render_step(s, by_index[j], schema.taxonomy)}" for j, s in enumerate(schema.steps)
    )


__all__ = ["NO_ATTRIBUTES", "format_attributes", "one_line", "render_step", "render_trace"]
