"""Tolerant trace parser with character spans.

:func:`parse_trace` reads whatever a policy or a teacher produced and never raises on a string: a
broken trace is a *result* (``format_ok=False`` plus ``errors``), because during RL every sample is
scored, including the garbage ones.

Tolerance rules (see docs/reasoning-format.md):

* A step line is ``Key: content`` at the start of a line. Keys match case-insensitively, ignoring
  ``_``/``-``/extra spaces, against the step key, its name and its aliases.
* Allowed decoration before the key: bullets (``- * + •``), markdown headings (``#``), numbering
  (``3.`` ``3)`` ``(3)``) and ``Step 3:``; markdown emphasis around the key and after the colon
  (``**Type:**``, ``**Type**:``, ``__Type__:``); a full-width colon ``：``; ``\\r\\n`` line ends.
* Any other line is chatter: kept in ``extra_lines`` (spans), never an error by itself.
* Choice steps read the choice the content *starts* with (``same (both are drills)`` -> ``same``).
  Label steps accept a canonical label name at the start (``Exact.``, ``**Exact** match``) or a
  taxonomy alias only when it is the whole content (``3``, ``E``), so ``I think ...`` is not read
  as the alias ``I`` = Irrelevant.
* Attribute steps read ``attr=value`` (or ``attr: value``) pairs separated by ``;`` or ``,``;
  ``none`` means nothing was checked.
* If a step occurs twice, every occurrence is returned but the trace is not ``format_ok``; the
  label is the one of the *first* verdict line with a readable label.

Spans are ``[start, end)`` indices into the original Python string (code points, the same unit
tokenizers' ``offset_mapping`` uses), covering the step line without the newline and without
surrounding whitespace, so ``text[start:end]`` is exactly the line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from she.data.labels import get_taxonomy
from she.data.schema import MATCH_VALUES
from she.errors import UserError
from she.reasoning.schema import StepSchema, StepSpec

MAX_ERRORS = 20  # errors beyond this are summarised, so a 100k-line garbage sample stays cheap

_NEWLINE = re.compile(r"\r\n|\n|\r")
_HEADER = re.compile(
    r"(?:(?:[-*+•·>]\s+|\#{1,6}\s*|\(?\d{1,3}[.)]\s*|step\s*\d{1,3}\s*[:.)-]?\s*)){0,3}"
    r"[*_`]{0,3}\s*"
    r"(?P<key>[^\W\d_][^\W_]*+(?:[ \t_-][^\W_]++){0,3}?)"
    r"\s*[*_`]{0,3}\s*[:：]\s*[*_`]{0,3}",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_HAS_WORD = re.compile(r"[^\W_]")

_NONE_WORDS = {"none", "n/a", "na", "nothing", "-", "none checked", "no attributes"}
_ATTR_ALIASES = {"colour": "color", "colours": "color", "colors": "color", "brands": "brand",
                 "materials": "material", "sizes": "size", "functions": "function"}
_VALUE_ALIASES = {
    "match": "match", "matches": "match", "matched": "match", "matching": "match", "ok": "match",
    "mismatch": "mismatch", "mismatches": "mismatch", "mismatched": "mismatch", "mismatching": "mismatch",
    "unspecified": "unspecified", "unknown": "unspecified", "unstated": "unspecified", "na": "unspecified",
}
_ATTR_PART = re.compile(r"[\s*_`]*([^\W\d_]+)[\s*_`]*[=:][\s*_`]*([^\W\d_]+)")


@dataclass
class ParsedStep:
    """One recognised step line.

    ``text`` is the whole line (``== original[span[0]:span[1]]``); ``value`` is what follows
    ``Key:`` (decoration stripped); ``conclusion`` is the normalised reading (choice string,
    attribute dict, canonical label, or the free text) or ``None`` when unreadable.
    """

    name: str
    key: str
    kind: str
    text: str
    value: str
    conclusion: Any
    span: tuple[int, int]
    valid: bool
    line: int  # 1-based line number, for error messages


@dataclass
class ParsedTrace:
    steps: list[ParsedStep] = field(default_factory=list)
    label: str | None = None
    label_span: tuple[int, int] | None = None
    format_ok: bool = False
    errors: list[str] = field(default_factory=list)
    extra_lines: list[tuple[int, int]] = field(default_factory=list)  # spans of non-step, non-blank lines

    def step(self, name: str) -> ParsedStep | None:
        """First occurrence of step ``name`` (or None)."""
        for s in self.steps:
            if s.name == name:
                return s
        return None

    def conclusions(self) -> dict[str, Any]:
        """``{step name: conclusion}`` of the first occurrence of each step."""
        out: dict[str, Any] = {}
        for s in self.steps:
            out.setdefault(s.name, s.conclusion)
        return out


# -- conclusion readers (pure, never raise) --------------------------------------------------------
def parse_choice(value: str, choices: tuple[str, ...]) -> str | None:
    """The choice ``value`` starts with (longest first), ignoring case and leading punctuation."""
    v = value.lower()
    v = v[re.match(r"[\W_]*", v).end():]
    for c in sorted(choices, key=len, reverse=True):
        cl = c.lower()
        if v.startswith(cl) and (len(v) == len(cl) or not v[len(cl)].isalnum()):
            return c
    return None


def parse_label(value: str, taxonomy: str) -> tuple[str | None, tuple[int, int] | None]:
    """(canonical label, span of the label words inside ``value``) or (None, None)."""
    tax = get_taxonomy(taxonomy)
    words = []
    for m in _WORD.finditer(value):
        words.append(m)
        if len(words) >= 4:
            break
    for k in range(len(words), 0, -1):
        cand = " ".join(w.group() for w in words[:k])
        try:
            canonical = tax.normalize(cand)
        except ValueError:
            continue
        whole = not _HAS_WORD.search(value, words[k - 1].end())
        if whole or cand.lower() == canonical.lower():
            return canonical, (words[0].start(), words[k - 1].end())
    return None, None


def parse_attributes(value: str, allowed: tuple[str, ...]) -> tuple[dict[str, str] | None, list[str]]:
    """Read ``brand=match; size=mismatch`` -> ({...}, errors). ``none`` -> ({}, [])."""
    v = value.strip().strip("*_` ").rstrip(".").strip()
    if v.lower() in _NONE_WORDS:
        return {}, []
    if not v:
        return None, ["no attribute checks (write 'none' when nothing is checked)"]
    out: dict[str, str] = {}
    errors: list[str] = []
    for part in re.split(r"[;,]", v):
        if not part.strip(" *_`."):
            continue
        m = _ATTR_PART.match(part)
        if not m:
            errors.append(f"cannot read attribute check {part.strip()[:40]!r} (expected attr=match|mismatch|unspecified)")
            continue
        attr = m.group(1).lower()
        attr = _ATTR_ALIASES.get(attr, attr)
        val = _VALUE_ALIASES.get(m.group(2).lower())
        if attr not in allowed:
            errors.append(f"unknown attribute {m.group(1)[:40]!r} (allowed: {', '.join(allowed)})")
        elif val is None:
            errors.append(f"attribute {attr}: value {m.group(2)[:40]!r} is not one of {'/'.join(MATCH_VALUES)}")
        elif attr in out:
            errors.append(f"attribute {attr} checked twice")
        else:
            out[attr] = val
    if not out and not errors:
        return None, ["no attribute checks (write 'none' when nothing is checked)"]
    return out, errors


def _read_step(spec: StepSpec, value: str, taxonomy: str) -> tuple[Any, bool, list[str], tuple[int, int] | None]:
    """(conclusion, valid, errors, label span within value)."""
    if spec.kind == "free":
        ok = bool(_HAS_WORD.search(value))
        return (value if ok else None), ok, ([] if ok else ["empty"]), None
    if spec.kind == "choice":
        c = parse_choice(value, spec.choices or ())
        if c is None:
            return None, False, [f"{value[:40]!r} is not one of {'/'.join(spec.choices or ())}"], None
        return c, True, [], None
    if spec.kind == "attributes":
        d, errs = parse_attributes(value, spec.choices or ())
        if errs or d is None:
            return None, False, errs, None
        return d, True, [], None
    lab, span = parse_label(value, taxonomy)
    if lab is None:
        return None, False, [f"{value[:40]!r} is not a label of {taxonomy} ({'/'.join(get_taxonomy(taxonomy).labels)})"], None
    return lab, True, [], span


def _lines(text: str):
    start = 0
    for m in _NEWLINE.finditer(text):
        yield start, m.start()
        start = m.end()
    yield start, len(text)


def parse_trace(text: str, schema: StepSchema) -> ParsedTrace:
    """Parse ``text`` against ``schema``. Never raises on any string input."""
    out = ParsedTrace()
    errors: list[str] = []
    if not isinstance(text, str):
        out.errors = [f"input is not a string ({type(text).__name__})"]
        return out
    order: list[int] = []
    for lineno, (s, e) in enumerate(_lines(text), start=1):
        line = text[s:e]
        stripped = line.strip()
        if not stripped:
            continue
        ls = s + (len(line) - len(line.lstrip()))
        le = ls + len(stripped)
        m = _HEADER.match(stripped)
        idx = schema.index_of_key(m.group("key")) if m else None
        if idx is None:
            out.extra_lines.append((ls, le))
            continue
        spec = schema.steps[idx]
        raw_value = stripped[m.end():]
        value = raw_value.strip()
        voff = ls + m.end() + (len(raw_value) - len(raw_value.lstrip()))
        conclusion, valid, errs, vspan = _read_step(spec, value, schema.taxonomy)
        errors.extend(f"line {lineno}: step {spec.key}: {msg}" for msg in errs)
        out.steps.append(ParsedStep(spec.name, spec.key, spec.kind, stripped, value, conclusion, (ls, le), valid, lineno))
        order.append(idx)
        if spec.kind == "label" and valid and out.label is None:
            out.label = conclusion
            out.label_span = (voff + vspan[0], voff + vspan[1])

    expected = list(range(len(schema.steps)))
    if order != expected:
        present = set(order)
        missing = [schema.steps[i].key for i in expected if i not in present]
        if missing:
            errors.append(f"missing step(s): {', '.join(missing)}")
        counts = Counter(order)
        dups = [i for i in expected if counts[i] > 1]
        if dups:
            errors.append(f"duplicated step(s): {', '.join(schema.steps[i].key for i in dups)}")
        firsts = list(dict.fromkeys(order))  # first occurrences, in text order
        if firsts != sorted(firsts):
            errors.append(
                f"steps out of order: got {' > '.join(schema.steps[i].key for i in firsts)}, "
                f"expected {' > '.join(s.key for s in schema.steps)}"
            )
    if not order and not errors:
        errors.append("no steps found")
    out.format_ok = order == expected and all(st.valid for st in out.steps) and out.label is not None
    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"... and {len(errors) - MAX_ERRORS} more error(s)"]
    out.errors = errors
    return out


# -- the guideline rule applied to parsed conclusions --------------------------------------------------
# outcome -> label, per taxonomy. Outcomes: type different / accessory / related, or same with / without
# any attribute mismatch. This mirrors the Home Depot raters' guideline (see docs/reasoning-format.md).
_RULES: dict[str, dict[str, str]] = {
    "hd3": {"different": "Irrelevant", "accessory": "Irrelevant", "related": "Partial",
            "same_mismatch": "Partial", "same": "Exact"},
    "esci4": {"different": "Irrelevant", "accessory": "Complement", "related": "Substitute",
              "same_mismatch": "Substitute", "same": "Exact"},
    "taobao4": {"different": "Irrelevant", "accessory": "Irrelevant", "related": "Related",
                "same_mismatch": "Mismatch", "same": "Excellent"},
}


def _local_guideline_label(type_relation: str, attribute_results: Mapping[str, str], taxonomy: str) -> str:
    """Fallback implementation of the project's guideline rule (used if she.data.guideline is absent)."""
    if taxonomy not in _RULES:
        raise UserError(f"no guideline rule for taxonomy {taxonomy!r}; known: {sorted(_RULES)}")
    if type_relation == "same":
        mismatch = any(v == "mismatch" for v in attribute_results.values())
        return _RULES[taxonomy]["same_mismatch" if mismatch else "same"]
    if type_relation not in _RULES[taxonomy]:
        raise ValueError(f"unknown type relation {type_relation!r}")
    return _RULES[taxonomy][type_relation]


try:  # the shared implementation, when the data package provides one
    from she.data.guideline import GUIDELINE_TAXONOMIES as _SHARED_TAXONOMIES
    from she.data.guideline import guideline_label as _shared_guideline_label
except ImportError:  # pragma: no cover - depends on which modules exist
    _shared_guideline_label, _SHARED_TAXONOMIES = None, ()


def guideline_label(type_relation: str, attribute_results: Mapping[str, str], taxonomy: str) -> str:
    """Label implied by a type relation and attribute results under the project's guideline rule.

    Delegates to :func:`she.data.guideline.guideline_label` for the taxonomies it covers (hd3,
    esci4) and uses the table above for the others (taobao4).
    """
    if _shared_guideline_label is not None and taxonomy in _SHARED_TAXONOMIES:
        return _shared_guideline_label(type_relation, dict(attribute_results), taxonomy)
    return _local_guideline_label(type_relation, attribute_results, taxonomy)


def consistent_label(parsed: ParsedTrace, taxonomy: str) -> str | None:
    """The label the trace's own Type + Attributes steps imply, or None if they are unreadable.

    Uses the first ``type`` step and the first ``attributes`` step; a schema without an attributes
    step counts as "nothing checked". Lets a reward check that the verdict follows from the steps.
    """
    t = parsed.step("type")
    if t is None or not t.valid or t.conclusion is None:
        return None
    attrs: dict[str, str] = {}
    for s in parsed.steps:
        if s.kind == "attributes":
            if not s.valid or s.conclusion is None:
                return None
            attrs = s.conclusion
            break
    try:
        return guideline_label(t.conclusion, attrs, taxonomy)
    except ValueError:
        return None


def verdict_prefix(text: str, label_start: int) -> tuple[str, bool]:
    """The reasoning up to the verdict label, and whether the label's first token carries a leading space.

    ``label_start``: the label's first character in ``text`` (``ParsedTrace.label_span[0]``). A space right
    before the label belongs to the label's token in byte-level BPE (``" Exact"``), so it is cut with it.
    """
    if not 0 <= label_start <= len(text):
        raise ValueError(f"label_start {label_start} outside a text of {len(text)} characters")
    spaced = label_start > 0 and text[label_start - 1] == " "
    return text[: label_start - 1 if spaced else label_start], spaced


__all__ = [
    "ParsedStep",
    "ParsedTrace",
    "consistent_label",
    "guideline_label",
    "parse_attributes",
    "parse_choice",
    "parse_label",
    "parse_trace",
    "verdict_prefix",
]
