"""Numbers with units in free text, and the ``Numbers`` step of the grounded schema.

A *quantity* is a number with an optional unit: ``20v``, ``3/4 in.``, ``1-1/2"``, ``50 ft``, ``1.9 cu. ft.``,
``(4-Pack)``, the parts of a dimension (``2x4`` -> 2 and 4; ``3/4 in. x 50 ft`` -> 3/4 in and 50 ft). Values are
exact fractions (``0.5`` == ``1/2`` == ``.5``; ``1-1/2`` == ``1 1/2`` == ``1.5``), unit spellings map to one
canonical unit (``in``/``inch``/``inches``/``"``/``''`` -> ``in``; ``ft``/``feet``/``'`` -> ``ft``; ...; see
:data:`UNITS`). Units are not converted into each other (12 in is not 1 ft).

:func:`compare_quantities` states, for each quantity of the query (at most :data:`MAX_NUMBERS`, first occurrence
of each), what the product text says about it:

* ``match``    -- the product has the same value with the same unit, or one of the two has no unit;
* ``mismatch`` -- the query quantity has a unit and the product states that unit, but never with this value
  (``20v`` vs ``18-Volt``): the product contradicts the query;
* ``missing``  -- the product does not state it (no quantity of that value, and, for a quantity with a unit, no
  quantity of that unit either). A query number without a unit is ``match`` or ``missing``, never ``mismatch``.

The line (:func:`numbers_text`): ``3/4 in=match; 50 ft=missing``, query order, ``; ``-separated, or ``none`` when
the query has no quantity. :func:`parse_numbers` reads such a line back (any spelling of the numbers and units,
``found``/``absent`` for ``match``/``missing``) so the verifier compares *meanings*, not strings.

Known failures (rules, not understanding): ``2 in 1`` reads as 2 inches; a number glued to letters (``dw059``,
``r-13``, ``2nd``, ``15a``) is not a quantity (model numbers, ordinals); ``3 1/2`` is one mixed number even where
it means 3 and 1/2; ``'`` after a number is feet; a bare ``m``/``a`` is not read as metres/amps (``3M``, articles).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

MAX_NUMBERS = 4  # query quantities stated on one line (the first ones)
STATES = ("match", "mismatch", "missing")

# canonical unit -> regex of its spellings (case-insensitive; the word after it must end there)
UNITS: tuple[tuple[str, str], ...] = (
    ("sq ft", r"sq\.?\s?f(?:ee)?t\.?|square\s+f(?:ee|oo)t|sqft"),
    ("cu ft", r"cu\.?\s?f(?:ee)?t\.?|cubic\s+f(?:ee|oo)t|cuft"),
    ("oz", r"fl\.?\s?oz\.?|ounces?|oz\.?"),
    ("in", r"inch(?:es)?|in\.?"),
    ("ft", r"f(?:ee|oo)t|ft\.?"),
    ("yd", r"yards?|yds?\.?"),
    ("mm", r"millimet(?:er|re)s?|mm\.?"),
    ("cm", r"centimet(?:er|re)s?|cm\.?"),
    ("meter", r"met(?:er|re)s?"),
    ("gal", r"gallons?|gal\.?"),
    ("qt", r"quarts?|qt\.?"),
    ("lb", r"pounds?|lbs?\.?"),
    ("v", r"volts?|v"),
    ("kw", r"kilowatts?|kw"),
    ("w", r"watts?|w"),
    ("amp", r"amperes?|amps?"),
    ("ah", r"ah"),
    ("btu", r"btus?"),
    ("cfm", r"cfm"),
    ("gpm", r"gpm"),
    ("psi", r"psi"),
    ("hp", r"horsepower|hp"),
    ("mph", r"mph"),
    ("rpm", r"rpm"),
    ("k", r"kelvin|k"),
    ("lm", r"lumens?|lm"),
    ("ga", r"gauge|ga\.?|awg"),
    ("pack", r"packs?|pk\.?|count|ct\.?"),
    ("piece", r"pieces?|pcs?\.?"),
    ("light", r"lights?"),
    ("grit", r"grit"),
    ("mil", r"mils?"),
    ("tooth", r"tooth|teeth"),
    ("ton", r"tons?"),
)
_UNIT_GROUPS = [f"u{i}" for i in range(len(UNITS))]
_UNIT_RE = "|".join(f"(?P<{g}>{pat})" for g, (_, pat) in zip(_UNIT_GROUPS, UNITS))
_UNIT_OF = dict(zip(_UNIT_GROUPS, (u for u, _ in UNITS)))
_LENGTH_UNITS = frozenset({"", "in", "ft", "yd"})  # written as fractions (3/4 in); other units as decimals

_NUM_RE = r"[0-9]+[ -][0-9]+/[0-9]+|[0-9]+/[0-9]+|[0-9]*\.[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+"
# not glued to a letter/digit before (dw059, 1.5's tail) nor after a letter and hyphen (r-13, #SC-141)
# quote marks are units only when glued to the number (3/4", 50'; '' is inches) and may be followed by a digit (8'6")
_QTY = re.compile(
    rf"(?<![A-Za-z0-9.])(?<![A-Za-z]-)#?(?P<num>{_NUM_RE})"
    rf"(?:(?P<qin>\"|'')(?![A-Za-z])|(?P<qft>')(?![A-Za-z])|\s?-?\s?(?:{_UNIT_RE})(?![A-Za-z0-9])|(?![A-Za-z0-9]))",
    re.I,
)
# the x of a dimension glued to numbers/units: 2x4, 2"x4", 3/4in.x50ft
_DIM_X = re.compile(r"(?:(?<=[0-9.\"'])|(?<=in)|(?<=ft)|(?<=mm)|(?<=cm))\s*[x×*]\s*(?=[0-9.])", re.I)
_TRANSLATE = str.maketrans({"″": '"', "”": '"', "“": '"', "′": "'", "’": "'", "‘": "'", "×": "x", "⁄": "/"})


@dataclass(frozen=True, order=True)
class Quantity:
    """An exact value and a canonical unit (``""``: none)."""

    value: Fraction
    unit: str = ""

    def __str__(self) -> str:
        return f"{format_value(self.value, self.unit)} {self.unit}".strip()


def format_value(v: Fraction, unit: str = "") -> str:
    """Canonical spelling of ``v``: ``20``; ``3/4``, ``1-1/2`` for lengths and bare numbers (binary fractions,
    the way inches are written); ``1.9``, ``2.5`` otherwise (when exact in 4 decimals); else ``a/b``."""
    if v.denominator == 1:
        return str(v.numerator)
    d = v.denominator
    if unit in _LENGTH_UNITS and d & (d - 1) == 0 and d <= 128:
        whole, rem = divmod(v.numerator, d)
        return f"{whole}-{rem}/{d}" if whole else f"{rem}/{d}"
    for places in range(1, 5):
        if (v * 10**places).denominator == 1:
            return f"{float(v):.{places}f}"
    return f"{v.numerator}/{v.denominator}"


def _value(num: str) -> Fraction | None:
    num = num.replace(",", "")
    m = re.fullmatch(r"([0-9]+)[ -]([0-9]+)/([0-9]+)|([0-9]+)/([0-9]+)", num)
    if m is None:
        return Fraction(num)
    whole, a, b = (m.group(1), m.group(2), m.group(3)) if m.group(1) else ("0", m.group(4), m.group(5))
    return None if int(b) == 0 else int(whole) + Fraction(int(a), int(b))


def normalize_text(text: str) -> str:
    """Unicode-tolerant form for number reading: vulgar fractions (``1½`` -> ``1 1/2``), full-width digits and
    primes/curly quotes (NFKC plus a small table), and a glued dimension ``x`` spaced out."""
    out = []
    for ch in text:
        if unicodedata.category(ch) == "No" and "⁄" in unicodedata.normalize("NFKC", ch):
            out.append(" " + unicodedata.normalize("NFKC", ch).replace("⁄", "/"))  # ½ -> " 1/2"
        else:
            out.append(ch)
    t = unicodedata.normalize("NFKC", "".join(out).translate(_TRANSLATE)).translate(_TRANSLATE)
    return _DIM_X.sub(" x ", t)


def _matches(text: str):
    for m in _QTY.finditer(text):
        v = _value(m.group("num"))
        if v is None:
            continue
        unit = "in" if m.group("qin") else "ft" if m.group("qft") else \
            next((_UNIT_OF[g] for g in _UNIT_GROUPS if m.group(g) is not None), "")
        yield m, Quantity(v, unit)


def quantities(text: str | None) -> list[Quantity]:
    """The quantities of ``text`` in order, each once (first occurrence)."""
    out: list[Quantity] = []
    for _, q in _matches(normalize_text(text or "")):
        if q not in out:
            out.append(q)
    return out


def strip_quantities(text: str | None) -> str:
    """``text`` (normalised) with every quantity replaced by a space: what is left for word heuristics."""
    t = normalize_text(text or "")
    return _QTY.sub(" ", t)


def compare_quantities(query: str | None, product: str | None, limit: int = MAX_NUMBERS) -> list[tuple[Quantity, str]]:
    """``[(query quantity, match|mismatch|missing)]`` for the first ``limit`` quantities of ``query`` (module
    docstring); ``[]`` when the query states none."""
    have = quantities(product)
    out = []
    for q in quantities(query)[:limit]:
        if any(p.value == q.value and (p.unit == q.unit or not p.unit or not q.unit) for p in have):
            state = "match"
        elif q.unit and any(p.unit == q.unit for p in have):
            state = "mismatch"
        else:
            state = "missing"
        out.append((q, state))
    return out


def numbers_text(checks: list[tuple[Quantity, str]]) -> str:
    """The ``Numbers`` line's content: ``3/4 in=match; 50 ft=missing`` or ``none``."""
    return "; ".join(f"{q}={s}" for q, s in checks) if checks else "none"


_STATE_ALIASES = {
    "match": "match", "matches": "match", "matched": "match", "found": "match", "same": "match",
    "mismatch": "mismatch", "mismatched": "mismatch", "mismatches": "mismatch", "different": "mismatch",
    "missing": "missing", "absent": "missing", "not found": "missing", "unstated": "missing",
}
_ITEM = re.compile(r"(?P<q>.+?)\s*[=:]\s*(?P<s>[a-z][a-z ]*?)\s*\.?", re.I)


def parse_numbers(text: str | None) -> dict[Quantity, str] | None:
    """The ``{quantity: state}`` a ``Numbers`` line states (``none`` -> ``{}``); None when it cannot be read: an
    item that is not exactly one quantity, ``=`` and a state, or one quantity given two states."""
    if text is None:
        return None
    t = text.strip()
    if not t:
        return None
    if t.strip(" .").lower() in ("none", "nothing", "-", "n/a"):
        return {}
    out: dict[Quantity, str] = {}
    for item in re.split(r";|,\s", t):
        item = item.strip()
        if not item:
            continue
        m = _ITEM.fullmatch(item)
        if m is None:
            return None
        state = _STATE_ALIASES.get(" ".join(m.group("s").lower().split()))
        qtext = normalize_text(m.group("q"))
        found = list(_matches(qtext))
        if state is None or len(found) != 1 or re.search(r"[^\W_]", _QTY.sub(" ", qtext)):
            return None
        q = found[0][1]
        if out.get(q, state) != state:
            return None
        out[q] = state
    return out


__all__ = [
    "MAX_NUMBERS", "STATES", "UNITS", "Quantity", "compare_quantities", "format_value", "normalize_text",
    "numbers_text", "parse_numbers", "quantities", "strip_quantities",
]
