"""Prompts for the policy (and the teacher): short, because the policy is trained and sampled on CPU.

The system prompt is *generated from the step schema*, so a schema with an extra step (e.g.
``Negation``) or another taxonomy gets a matching instruction without editing text by hand. The user
message carries only what a rater sees: the query and the product (title, brand, colour, a truncated
description). The gold label is never part of a prompt.
"""

from __future__ import annotations

from she.data.labels import get_taxonomy
from she.data.schema import MATCH_VALUES, Product, Record
from she.errors import UserError
from she.reasoning.parse import _RULES
from she.reasoning.render import one_line
from she.reasoning.schema import StepSchema, StepSpec, default_schema

DESCRIPTION_CHARS = 200

_FREE_HINTS = {
    "query": "<searched type; constraints>",
    "product": "<product type; brand=..; color=..; size=..>",
    "coverage": "<query words the product lacks, comma-separated, or none>",
    "numbers": "<each query number with unit =match|mismatch|missing in the product, ;-separated, or none>",
    "head": "<query head noun> found|absent in the title",
}
_OUTCOME_TEXT = {
    "different": "different type",
    "accessory": "accessory/part for it",
    "related": "related type",
    "same_mismatch": "same type with a mismatch",
    "same": "same type, no mismatch",
}


def rule_text(taxonomy: str) -> str:
    """One line stating the guideline rule, generated from the rule table (never out of sync)."""
    rules = _RULES.get(taxonomy)
    if rules is None:
        return ""
    parts = []
    for label in get_taxonomy(taxonomy).labels:
        outcomes = [_OUTCOME_TEXT[o] for o in ("different", "accessory", "related", "same_mismatch", "same")
                    if rules[o] == label]
        if outcomes:
            parts.append(f"{label} = {' or '.join(outcomes)}")
    return "Rule: " + "; ".join(parts) + "."


def _step_hint(spec: StepSpec, taxonomy: str) -> str:
    if spec.kind == "free":
        return _FREE_HINTS.get(spec.name, f"<{spec.name} in a few words>")
    if spec.kind == "choice":
        return "|".join(spec.choices or ())
    if spec.kind == "attributes":
        return f"attr={'|'.join(MATCH_VALUES)}; ... for {', '.join(spec.choices or ())} as the query states, or none"
    return "|".join(get_taxonomy(taxonomy).labels)


def system_prompt(schema: StepSchema | None = None) -> str:
    """Instruction for the policy: the step lines to write and the label rule."""
    schema = schema or default_schema()
    lines = ["Judge how relevant the product is to the search query. Reply with exactly these lines:"]
    lines += [f"{s.key}: {_step_hint(s, schema.taxonomy)}" for s in schema.steps]
    rule = rule_text(schema.taxonomy)
    if rule:
        lines.append(rule)
    return "\n".join(lines)


DEFAULT_SYSTEM = system_prompt(default_schema("hd3"))


def teacher_system_prompt(schema: StepSchema | None = None) -> str:
    """The policy instruction plus definitions and brevity rules for a large teacher model."""
    schema = schema or default_schema()
    return system_prompt(schema) + (
        "\nDefinitions: same = the kind of thing searched; related = a usable alternative type; "
        "accessory = a part, accessory, tool or cover for the thing searched; different = unrelated. "
        "Check only attributes the query states; mismatch = the product contradicts the query."
        "\nKeep every line under 15 words. Write nothing before the first line or after the last."
    )


def _truncate(text: str, limit: int) -> str:
    text = one_line(text)
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;.") + "..."


def format_product(product: Product, *, description_chars: int = DESCRIPTION_CHARS) -> str:
    """``Product: <title>`` plus ``Brand:``/``Color:``/``Description:`` lines when present."""
    lines = [f"Product: {one_line(product.title)}"]
    if product.brand and product.brand.strip():
        lines.append(f"Brand: {one_line(product.brand)}")
    if product.color and product.color.strip():
        lines.append(f"Color: {one_line(product.color)}")
    if product.description and product.description.strip() and description_chars > 0:
        lines.append(f"Description: {_truncate(product.description, description_chars)}")
    return "\n".join(lines)


def user_message(record: Record) -> str:
    return f"Query: {one_line(record.query)}\n{format_product(record.product)}"


PROMPT_STYLES = ("full", "compact")


def compact_system_prompt(schema: StepSchema | None = None) -> str:
    """A one-line instruction for a model already fine-tuned on the format.

    The full instruction (about 140 SmolLM2 tokens) is what a zero-shot model needs; after SFT it is
    redundant, and on a 2-core CPU the prompt dominates training cost (about 2.5x fewer tokens per
    example with this one). The style a model was trained with is saved next to it (``she.json``).
    """
    schema = schema or default_schema()
    return "Judge search relevance. Lines: " + ", ".join(s.key for s in schema.steps) + "."


def build_messages(record: Record, *, system: str | None = None, schema: StepSchema | None = None,
                   style: str = "full") -> list[dict[str, str]]:
    """Chat messages for ``record``: a system instruction and the query/product as the user turn.

    ``style`` is ``full`` (the whole step format and label rule, for zero-shot use) or ``compact``.

    ``system=None`` builds the instruction from ``schema``, the step schema the model writes (None: the
    built-in schema of the record's taxonomy, so an esci4 record gets the esci4 label set); pass
    :data:`DEFAULT_SYSTEM` or any string to override. The record's label is never used.
    """
    if style not in PROMPT_STYLES:
        raise UserError(f"unknown prompt style {style!r}; use one of {PROMPT_STYLES}")
    if system is None:
        schema = schema or default_schema(record.taxonomy)
        system = system_prompt(schema) if style == "full" else compact_system_prompt(schema)
    return [{"role": "system", "content": system}, {"role": "user", "content": user_message(record)}]


__all__ = [
    "PROMPT_STYLES",
    "compact_system_prompt",
    "DEFAULT_SYSTEM",
    "build_messages",
    "format_product",
    "rule_text",
    "system_prompt",
    "teacher_system_prompt",
    "user_message",
]
