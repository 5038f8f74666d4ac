"""Label-conditioned, rule-based rationale writer: a short reasoning trace that agrees with the gold label.

Why: the policy needs SFT targets in the step format before RL, for *every* data source, and most
sources (Home Depot) have only query, title and a human label. The writer is *conditioned on the
gold label*: it picks the Type / Attributes conclusions that (a) imply the gold label under the
project's guideline rule and (b) are as plausible as possible given the evidence it has. Its output
always parses (``format_ok``) and its steps always imply its verdict; this is asserted on every call.

Evidence, strongest first:

1. **Human step facts** (``record.facts``; complete for synthetic data, partial for ESCI/WANDS):
   the type relation and attribute results are used as given, and ``Product.attributes`` supplies the
   product line.
2. **Lexical evidence** from the text only (query, title, brand, colour): the query head (last
   content word before a preposition), the product head type (title before `` with ``/`` in ``/
   `` for ``/``,``/``(``, brand and quantities stripped), which query words occur in the title
   (lower-cased, plural ``s``/``es`` stripped, stopwords ignored), small word lists for brands,
   colours, materials, functions and accessory/part words, and numbers for sizes.

When facts and the label disagree the label wins (the fewest conclusions are changed).

Honest limits: on data without facts the rationale is a *plausible explanation of the human label*,
not a verified fact -- e.g. a Partial judgement with every query word in the title gets a
``function=mismatch`` because something must have been wrong, and an unknown brand is invisible
to the word lists. The step verifier only rewards steps against human facts, never against these.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from she.data.labels import get_taxonomy
from she.data.schema import ATTRIBUTES, TYPE_RELATIONS, Record
from she.errors import UserError
from she.reasoning.parse import consistent_label, guideline_label, parse_trace, verdict_prefix
from she.reasoning.quantities import Quantity, compare_quantities, normalize_text, numbers_text, strip_quantities
from she.reasoning.render import one_line, render_trace
from she.reasoning.schema import StepSchema, default_schema, marginal_step

# ---------------------------------------------------------------------------------------------
# word lists (lower-case, stemmed with _stem); small on purpose: precision over recall
# ---------------------------------------------------------------------------------------------
STOPWORDS = frozenset(
    "a an and the of for with without to in on at by from or x w into onto over under up only "
    "set pack pc pcs piece ft in inch inches mm cm lb lbs oz gal gallon qt sq cu".split()
)
_PREPOSITIONS = frozenset("for with without over under in on to from into onto".split())
_NEGATIONS = re.compile(r"\b(without|no|non|not|except|excluding|free)\b", re.I)
COLORS = frozenset(
    "white black red blue green yellow brown gray grey silver gold bronze chrome nickel beige tan ivory "
    "almond bisque orange pink purple clear espresso biscuit cream charcoal navy teal khaki chestnut "
    "mahogany cherry walnut pewter graphite slate bone linen sand".split()
)
MATERIALS = frozenset(
    "wood wooden steel stainless metal aluminum aluminium brass copper iron vinyl plastic pvc cpvc pex "
    "ceramic porcelain glass concrete cedar oak pine maple bamboo granite marble stone fiberglass rubber "
    "nylon cotton polyester leather wicker resin composite mdf plywood galvanized quartz travertine "
    "laminate acrylic cement brick canvas teak redwood zinc titanium".split()
)
FUNCTIONS = frozenset(
    "cordless corded electric gas propane solar led outdoor indoor waterproof wireless portable "
    "rechargeable automatic manual smart programmable dimmable motion heated insulated adjustable "
    "folding recessed tankless frameless touchless pull-down pulldown self-propelled push "
    "hardwired plug-in battery-powered".split()
)
ACCESSORY_WORDS = frozenset(
    "bit blade battery charger cover case replacement cartridge filter bracket hose nozzle adapter "
    "attachment bag belt cord gasket handle hinge knob lid mount part refill spare strap tip washer "
    "seal wheel spring cap plug connector fitting clamp sleeve liner pad tray holder hook stand guard "
    "escutcheon faceplate trim repair bulb extension remote accessory accessories".split()
)
# brands as token tuples; multi-word ones first so "hampton bay" beats a single word
BRANDS = tuple(
    sorted(
        [
            tuple([b])
            for b in (
                "dewalt milwaukee ryobi makita bosch craftsman husky ridgid stanley kobalt porter-cable "
                "behr glidden valspar rust-oleum rustoleum kilz zinsser delta moen kohler pfister "
                "ge whirlpool samsung lg frigidaire maytag kitchenaid toro honda husqvarna echo "
                "greenworks worx lithonia philips cree feit ecosmart leviton lutron simpson everbilt "
                "quikrete sakrete rheem honeywell nest schlage kwikset defiant rubbermaid suncast "
                "weber char-broil nexgrill dyson hoover bissell shark 3m gorilla dap sharkbite nibco "
                "homewerks diablo irwin klein dremel stihl vigoro scotts miracle-gro ortho roundup "
                "armstrong pergo trafficmaster mohawk hdx hyde gardner bemis amerock broan "
                "ecobee emerson westinghouse minka "
            ).split()
        ]
        + [("hampton", "bay"), ("glacier", "bay"), ("american", "standard"), ("home", "decorators"),
           ("commercial", "electric"), ("john", "deere"), ("cub", "cadet"), ("troy-bilt",),
           ("briggs", "stratton"), ("owens", "corning"), ("black", "decker"), ("martha", "stewart"),
           ("simpson", "strong-tie"), ("ao", "smith"), ("price", "pfister")],
        key=len,
        reverse=True,
    )
)

_TOKEN = re.compile(r"\d+(?:[./]\d+)*|[^\W\d_]+(?:-[^\W\d_]+)*")
_NUMBER = re.compile(r"\d+(?:[./]\d+)*")
_UNITS = frozenset(
    "in in. inch inches ft ft. feet foot v volt volts w watt watts amp amps a gal gal. gallon gallons oz "
    "oz. fl fl. lb lb. lbs lbs. mm cm m qt qt. cu cu. sq sq. btu pack pk count ct ga gauge piece pc".split()
)
_HEAD_CUT = re.compile(r"\s(?:with|in|for|featuring|includes?|and)\s|,\s|\s[-–—|]\s|\(|\|", re.I)


def _stem(word: str) -> str:
    """Crude plural stripping so 'drills'/'drill', 'boxes'/'box', 'batteries'/'battery' meet."""
    w = word.lower().strip("'’.")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and (w[-3] in "sxz" or w[-4:-2] in ("ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


_STEMMED = {name: frozenset(_stem(w) for w in words) for name, words in
            (("color", COLORS), ("material", MATERIALS), ("function", FUNCTIONS), ("accessory", ACCESSORY_WORDS))}


def _tokens(text: str) -> list[str]:
    """Lower-case word/number tokens; hyphenated words are kept whole *and* split (see _stems)."""
    return _TOKEN.findall(text.lower())


def _stems(text: str) -> set[str]:
    out = set()
    for t in _tokens(text):
        out.add(_stem(t))
        if "-" in t:
            out.update(_stem(p) for p in t.split("-") if p)
    return out


def _content(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in STOPWORDS]


def _find_brand(tokens: list[str], *, at_start: bool = False) -> tuple[int, int] | None:
    """(start, end) token indices of a known brand in ``tokens`` (at index 0 only if ``at_start``)."""
    for b in BRANDS:
        n = len(b)
        starts = [0] if at_start else range(len(tokens) - n + 1)
        for i in starts:
            if tuple(tokens[i : i + n]) == b:
                return i, i + n
            # "briggs & stratton" / "black and decker": allow one joining token
            if n == 2 and tuple(tokens[i : i + 1]) == b[:1] and tokens[i + 1 : i + 2] == ["and"] \
                    and tuple(tokens[i + 2 : i + 3]) == b[1:]:
                return i, i + 3
    return None


# ---------------------------------------------------------------------------------------------
# evidence
# ---------------------------------------------------------------------------------------------
@dataclass
class Evidence:
    """What the writer knows about a (query, product) pair, before looking at the label."""

    query_phrase: str
    query_constraints: dict[str, str]  # attr -> surface text stated by the query (brand/color/size)
    product_phrase: str
    product_attrs: dict[str, str]  # attr -> surface text of the product
    attrs: dict[str, str]  # attr -> match/mismatch/unspecified (facts override lexical)
    type_order: list[str]  # type relations, most plausible first
    blame_order: list[str]  # attributes to mark mismatch first when the label needs one
    blame_supported: list[str]  # the ones backed by a query word missing from the product
    negation: bool
    notes: list[str] = field(default_factory=list)


def _query_parts(query: str) -> tuple[str, dict[str, str], list[str], str | None]:
    """(display phrase, constraints, content tokens, head stem)."""
    words = query.split()
    lowered = [w.lower().strip(",;:") for w in words]
    tok_words = [_tokens(w) for w in words]
    flat = [t for ts in tok_words for t in ts]
    constraints: dict[str, str] = {}
    drop: set[int] = set()
    # brand
    b = _find_brand(lowered)
    if b is not None:
        constraints["brand"] = " ".join(words[b[0] : b[1]]).lower()
        drop.update(range(b[0], b[1]))
    # size: words with digits plus one following unit word
    sizes = []
    for i, w in enumerate(lowered):
        if i in drop:
            continue
        if _NUMBER.search(w):
            part = [words[i]]
            drop.add(i)
            if i + 1 < len(words) and lowered[i + 1] in _UNITS:
                part.append(words[i + 1])
                drop.add(i + 1)
            sizes.append(" ".join(part))
    if sizes:
        constraints["size"] = " ".join(sizes[:2]).lower()
    colors = [words[i].lower() for i, w in enumerate(lowered) if i not in drop and _stem(w) in _STEMMED["color"]]
    if colors:
        constraints["color"] = " ".join(colors[:2])
        drop.update(i for i, w in enumerate(lowered) if _stem(w) in _STEMMED["color"])
    phrase_words = [w for i, w in enumerate(words) if i not in drop]
    phrase = " ".join(phrase_words[-8:])
    if not re.search(r"[^\W_]", phrase):
        phrase = query
    # head: last content token before the first preposition (after the first word)
    head_zone: list[str] = []
    for i, w in enumerate(lowered):
        if i > 0 and w in _PREPOSITIONS and head_zone:
            break
        if i not in drop:
            head_zone.extend(tok_words[i])
    cands = [t for t in _content(head_zone) if not _NUMBER.fullmatch(t)]
    if not cands:
        cands = [t for t in _content(flat) if not _NUMBER.fullmatch(t)]
    head = _stem(cands[-1]) if cands else None
    return phrase.lower(), constraints, _content(flat), head


def _product_parts(title: str, brand_field: str | None) -> tuple[str, str | None, str, str | None, list[str]]:
    """(type phrase, brand, head segment, colour/finish segment, size chunks)."""
    title = re.sub(r"^\s*\([^)]*\)\s*", "", title) or title
    m = _HEAD_CUT.search(title)
    head_seg = title[: m.start()] if m and m.start() > 0 else title
    words = head_seg.split()
    lowered = [w.lower() for w in words]
    brand = one_line(brand_field) if brand_field and brand_field.strip() else None
    start = 0
    b = _find_brand(lowered, at_start=True)
    if b is not None:
        brand = brand or " ".join(words[b[0] : b[1]])
        start = b[1]
    elif brand is not None and lowered[: len(brand.split())] == brand.lower().split():
        start = len(brand.split())
    elif len(words) >= 3 and re.fullmatch(r"(?:[A-Z]{2,}|[A-Z][a-z]+[A-Z]\w*)", words[0]) and not _NUMBER.search(words[0]):
        brand = brand or words[0]  # ALLCAPS or CamelCase first word: looks like a brand (BEHR, DeWalt)
        start = 1
    keep: list[str] = []
    sizes: list[str] = []
    i = start
    while i < len(words):
        w = words[i]
        if _NUMBER.search(w):
            chunk = [w]
            while i + 1 < len(words) and lowered[i + 1].strip(".,") in {u.strip(".") for u in _UNITS} and len(chunk) < 3:
                i += 1
                chunk.append(words[i])
            sizes.append(" ".join(chunk))
        elif lowered[i].strip(".,") not in {u.strip(".") for u in _UNITS} or not keep:
            keep.append(w)
        i += 1
    keep = [w for w in keep if _tokens(w) and w.lower() not in ("x", "-", "&")]
    while keep and keep[-1].lower() in STOPWORDS:
        keep.pop()
    while keep and keep[0].lower() in STOPWORDS:
        keep.pop(0)
    phrase = " ".join(keep[-3:]).lower() if keep else " ".join(title.split()[:4]).lower()
    color_seg = None
    cm = re.search(r"\sin\s+([^,(|]+?)(?:\s+with\s|\s+for\s|,|\(|\||$)", title, re.I)
    if cm:
        seg = cm.group(1).strip()
        if seg and not _NUMBER.search(seg) and len(seg.split()) <= 4:
            color_seg = seg
    return phrase, brand, head_seg, color_seg, sizes


def _apply_query_meta(meta: Mapping[str, str], q_cons: dict[str, str], notes: list[str]) -> None:
    """Structured query intent, when a source provides it (the synthetic generator does), beats
    lexical guessing: ``constraints`` is a JSON object attr -> value; single ``brand``/``color``/...
    keys are accepted too."""
    raw = meta.get("constraints")
    if raw:
        try:
            cons = json.loads(raw)
        except ValueError:
            notes.append("query_meta.constraints is not JSON; ignored")
            cons = None
        if isinstance(cons, dict):
            q_cons.clear()
            q_cons.update({a: one_line(str(cons[a])) for a in ATTRIBUTES if a in cons and one_line(str(cons[a]))})
    for a in ATTRIBUTES:
        if meta.get(a) and one_line(meta[a]):
            q_cons[a] = one_line(meta[a])


MAX_MISSING_WORDS = 6


def _product_text(record: Record) -> str:
    """Everything the product side says: title, brand, colour and attribute values (HTML unescaped)."""
    p = record.product
    title = html.unescape(one_line(p.title))
    values = [one_line(v) for v in p.attributes.values() if one_line(v)]
    return " ".join(x for x in (title, p.brand or "", p.color or "", " ".join(values)) if x)


def missing_query_words(record: Record) -> list[str]:
    """The query's content words (lower case, as written, first occurrence of each stem) whose stem
    occurs nowhere in the product text; at most :data:`MAX_MISSING_WORDS`. Label-free and exact: the
    ``Missing`` step of the coverage schema, written by :func:`rationale_steps` and checked by the verifier."""
    have = _stems(_product_text(record))
    out: list[str] = []
    seen: set[str] = set()
    for t in _content(_tokens(html.unescape(one_line(record.query)))):
        if t in _UNITS:  # "20v" tokenises as 20 + v: the number carries the requirement
            continue
        s = _stem(t)
        if s in seen:
            continue
        seen.add(s)
        parts = {_stem(x) for x in t.split("-") if x} if "-" in t else set()
        if s not in have and not (parts and parts <= have):
            out.append(t)
    return out[:MAX_MISSING_WORDS]


def coverage_text(words: list[str]) -> str:
    return ", ".join(words) if words else "none"


def parse_coverage(text: str | None) -> set[str] | None:
    """The stems a ``Missing`` step names (``"none"`` -> empty set); None when there is no text."""
    if text is None:
        return None
    t = text.strip().strip(".").strip()
    if not t:
        return None
    if t.lower() in ("none", "nothing", "-"):
        return set()
    return {_stem(w) for w in re.split(r"[,;]\s*|\s+", t.lower()) if w.strip("'’.")}


# ---------------------------------------------------------------------------------------------
# the grounded schema's computed steps (docs/reasoning-format.md, "The grounded schema"): label-free and exact
# ---------------------------------------------------------------------------------------------
# attribute values that identify a product rather than describe it: no quantities in them
_ID_ATTRIBUTES = frozenset({"product_uid", "product_id", "product_locale", "uid", "id", "asin", "sku", "locale"})


def _numbers_product_text(record: Record) -> str:
    """The product text the ``Numbers`` step reads: title, brand, colour and attribute values, identifiers
    (``product_uid``, ``product_id``, ``*_id``) left out -- a Home Depot uid is not a size."""
    p = record.product
    values = [one_line(v) for k, v in p.attributes.items()
              if one_line(v) and str(k).lower() not in _ID_ATTRIBUTES and not str(k).lower().endswith("_id")]
    title = html.unescape(one_line(p.title))
    return " ".join(x for x in (title, p.brand or "", p.color or "", " ".join(values)) if x)


def number_checks(record: Record) -> list[tuple[Quantity, str]]:
    """``[(query quantity, match|mismatch|missing)]``: the ``Numbers`` step of the grounded schema
    (:func:`she.reasoning.quantities.compare_quantities` on the query and the product text). Label-free and exact:
    written by :func:`rationale_steps`, checked by the verifier."""
    return compare_quantities(html.unescape(one_line(record.query)), _numbers_product_text(record))


def query_head(record: Record) -> str | None:
    """The query's head noun, as a stem: the last *noun-like* content word before the first preposition that
    follows one (``cover for grill`` -> cover, ``microwave over stove`` -> microwave), after dropping quantities
    (``3/4 in``, ``20v``), stopwords, bare units, known brands (``drill dewalt`` -> drill) and one-letter words;
    colour and function adjectives (``white``, ``cordless``, ``led``) are skipped too (``door white`` -> door)
    unless nothing else is left (``white`` -> white). None when the query has no word left (``3/4``)."""
    toks = _tokens(strip_quantities(html.unescape(one_line(record.query))).lower())
    b = _find_brand(toks)
    in_brand = set(range(b[0], b[1])) if b is not None else set()
    nouns: list[str] = []
    words: list[str] = []
    for i, t in enumerate(toks):
        if t in _PREPOSITIONS and nouns:
            break
        if t in STOPWORDS or t in _UNITS or _NUMBER.fullmatch(t) or i in in_brand or (len(t) < 2 and t.isascii()):
            continue
        words.append(t)
        s = _stem(t)
        if s not in _STEMMED["color"] and s not in _STEMMED["function"]:
            nouns.append(t)
    pick = nouns or words
    return _stem(pick[-1]) if pick else None


def head_check(record: Record) -> tuple[str, str]:
    """``(head stem, "found"|"absent")``, or ``("", "none")`` when the query has no head: the ``Head`` step.
    Found means the stem is a word (or hyphen part) of the product *title* (plural-stripped like the head);
    a head in a script without spaces (CJK) also counts as found when it occurs inside the title."""
    head = query_head(record)
    if head is None:
        return "", "none"
    title = normalize_text(html.unescape(one_line(record.product.title)))
    found = head in _stems(title) or (not head.isascii() and head in title.lower())
    return head, "found" if found else "absent"


def head_text(check: tuple[str, str]) -> str:
    """The ``Head`` line's content: ``drill found``, ``drill absent`` or ``none``."""
    word, state = check
    return "none" if state == "none" else f"{word} {state}"


_HEAD_STATES = {"found": "found", "present": "found", "in title": "found", "absent": "absent", "missing": "absent",
                "not found": "absent", "not in title": "absent"}
_HEAD_LINE = re.compile(r"[\"'`*]*(?P<w>\S+?)[\"'`*]*(?:\s*[=:]\s*|\s+)(?P<s>not found|not in title|in title|found|"
                        r"present|absent|missing)", re.I)


def parse_head(text: str | None) -> tuple[str, str] | None:
    """What a ``Head`` line states, in :func:`head_check`'s form (the word stemmed); None when unreadable."""
    if text is None:
        return None
    t = " ".join(text.split()).strip(" .")
    if not t:
        return None
    if t.lower() in ("none", "nothing", "-", "n/a"):
        return "", "none"
    m = _HEAD_LINE.fullmatch(t)
    if m is None:
        return None
    return _stem(normalize_text(m.group("w")).lower()), _HEAD_STATES[m.group("s").lower()]


def analyse(record: Record) -> Evidence:
    """Collect facts + lexical evidence for ``record`` (label not used)."""
    query = html.unescape(one_line(record.query))
    p = record.product
    title = html.unescape(one_line(p.title))
    pattrs = {str(k).lower(): one_line(v) for k, v in p.attributes.items() if one_line(v)}
    facts = record.facts
    notes: list[str] = []

    q_phrase, q_cons, q_content, q_head = _query_parts(query)
    _apply_query_meta(record.query_meta, q_cons, notes)
    meta_type = record.query_meta.get("intended_type") or record.query_meta.get("type")
    if meta_type and one_line(meta_type):
        q_phrase = one_line(meta_type).lower()
        if record.query_meta.get("negated_feature"):
            q_phrase += f" without {one_line(record.query_meta['negated_feature']).lower()}"

    p_phrase, p_brand, head_seg, color_seg, sizes = _product_parts(title, p.brand or pattrs.get("brand"))
    if pattrs.get("type"):
        p_phrase = pattrs["type"].lower()
    title_all = _product_text(record)
    t_stems = _stems(title_all)
    head_stems = _stems(head_seg)
    q_stems = {_stem(t) for t in q_content}
    if "-" in " ".join(q_content):
        q_stems |= _stems(" ".join(q_content))

    # product attributes shown on the product line
    p_attrs: dict[str, str] = {}
    if p_brand:
        p_attrs["brand"] = p_brand
    colour = p.color or pattrs.get("color") or pattrs.get("colour") or color_seg
    if not colour:
        cw = [w for w in title.split() if _stem(w) in _STEMMED["color"]]
        colour = " ".join(cw[:2]) if cw else None
    if colour:
        p_attrs["color"] = colour
    mat = pattrs.get("material") or next((w for w in title.split() if _stem(w) in _STEMMED["material"]), None)
    if mat:
        p_attrs["material"] = mat
    size = pattrs.get("size") or (" ".join(sizes[:2]) if sizes else None)
    if size:
        p_attrs["size"] = size
    if pattrs.get("function"):
        p_attrs["function"] = pattrs["function"]

    # lexical attribute results, only for attributes the query states
    lex: dict[str, str] = {}
    if "brand" in q_cons:
        qb = _stems(q_cons["brand"])
        lex["brand"] = "match" if qb <= t_stems or (p_brand and qb <= _stems(p_brand)) else "mismatch"
    elif p_brand and _stems(p_brand.split()[0]) & q_stems:
        lex["brand"] = "match"
        q_cons["brand"] = p_brand.lower()
        bstems = _stems(p_brand)
        rest = [w for w in q_phrase.split() if not (_stems(w) and _stems(w) <= bstems)]
        q_phrase = " ".join(rest) or q_phrase
    if "size" in q_cons:
        qn = set(_NUMBER.findall(q_cons["size"]))
        tn = set(_NUMBER.findall(title_all))
        lex["size"] = "match" if qn <= tn else "mismatch"
    for a in ("color", "material", "function"):
        qa = {s for s in q_stems if s in _STEMMED[a] and s != q_head}  # "red brick": brick is the type
        if qa:
            lex[a] = "match" if qa <= t_stems else "mismatch"

    attrs = dict(lex)
    for a in ATTRIBUTES:
        v = getattr(facts, a)
        if v is not None:
            if a in lex and lex[a] != v:
                notes.append(f"fact {a}={v} overrides lexical {lex[a]}")
            attrs[a] = v

    # type evidence
    acc = {s for s in head_stems if s in _STEMMED["accessory"]} - q_stems
    for_part = re.split(r"\sfor\s", title, maxsplit=1, flags=re.I)
    head_after_for = q_head is not None and len(for_part) == 2 and q_head in _stems(for_part[1])
    if acc or head_after_for:
        lexical_order = ["accessory", "related", "different", "same"]
    elif q_head is not None and q_head in head_stems:
        lexical_order = ["same", "related", "different", "accessory"]
    elif q_head is not None and q_head in t_stems:
        lexical_order = ["related", "same", "different", "accessory"]
    else:
        lexical_order = ["related", "different", "same", "accessory"]
    type_order = lexical_order
    if facts.type_relation is not None:
        type_order = [facts.type_relation] + [t for t in lexical_order if t != facts.type_relation]

    # which attribute to blame when the label needs a mismatch nobody saw: the attribute of a query
    # word missing from the title (brand > size > color > material > function), else function
    missing = [t for t in q_content if _stem(t) not in t_stems and _stem(t) != q_head]
    kinds: list[str] = []
    for t in missing:
        s = _stem(t)
        if _NUMBER.fullmatch(t):
            kinds.append("size")
        elif _find_brand([t]) is not None:
            kinds.append("brand")
        elif s in _STEMMED["color"]:
            kinds.append("color")
        elif s in _STEMMED["material"]:
            kinds.append("material")
        else:
            kinds.append("function")  # an unmet requirement of unknown kind: the vaguest attribute
    priority = ["brand", "size", "color", "material", "function"]
    blame = sorted(set(kinds), key=priority.index)
    blame += [a for a in ("function", "material", "size", "color", "brand") if a not in blame]
    # never blame what evidence says matches (or a fact says is unspecified) unless nothing else is left
    blame = [a for a in blame if attrs.get(a) in (None, "mismatch")] + \
            [a for a in blame if attrs.get(a) not in (None, "mismatch")]

    negation = facts.negation == "yes" if facts.negation is not None else bool(_NEGATIONS.search(query))
    supported = [a for a in blame if a in kinds or attrs.get(a) == "mismatch"]
    return Evidence(q_phrase, q_cons, p_phrase, p_attrs, attrs, type_order, blame, supported, negation, notes)


# ---------------------------------------------------------------------------------------------
# choosing conclusions consistent with the label
# ---------------------------------------------------------------------------------------------
def choose_conclusions(ev: Evidence, label: str, taxonomy: str, allowed: tuple[str, ...] | None) -> tuple[str, dict[str, str]]:
    """The most plausible (type, attribute results) whose guideline label is ``label``.

    ``allowed`` is the attributes the schema's attributes step may mention (None: no such step, so
    attributes cannot carry a mismatch). Types are tried in evidence order; for ``same`` the
    evidence attributes are kept if they already imply the label, otherwise mismatches are turned
    into matches (label needs none) or the most plausible attribute is marked mismatch.
    """
    base = {a: v for a, v in ev.attrs.items() if allowed is not None and a in allowed}
    types = ev.type_order + [t for t in TYPE_RELATIONS if t not in ev.type_order]
    # pass 1 blames only attributes backed by evidence; pass 2 (rarely needed, e.g. taobao4 Mismatch
    # with nothing missing) blames the most plausible attribute anyway
    for blame_order in (ev.blame_supported, ev.blame_order):
        for t in types:
            candidates = [base]
            if t == "same":
                if any(v == "mismatch" for v in base.values()):
                    candidates.append({a: ("match" if v == "mismatch" else v) for a, v in base.items()})
                elif allowed:
                    blame = next((a for a in blame_order if a in allowed), None)
                    if blame is not None:
                        candidates.append({**base, blame: "mismatch"})
            for attrs in candidates:
                if guideline_label(t, attrs, taxonomy) == label:
                    return t, attrs
        if not allowed:
            break
    raise UserError(f"no type/attribute conclusion implies label {label!r} in taxonomy {taxonomy!r}")


def _attr_text(attrs: Mapping[str, str], order: tuple[str, ...], include_unspecified: bool) -> dict[str, str]:
    return {a: attrs[a] for a in order if a in attrs and (include_unspecified or attrs[a] != "unspecified")}


def _analysis_line(phrase: str, values: Mapping[str, str], fallback: str) -> str:
    parts = [phrase if re.search(r"[^\W_]", phrase) else fallback]
    parts += [f"{a}={one_line(v)}" for a, v in values.items() if re.search(r"[^\W_]", v)]
    return "; ".join(parts)


StepWriter = Callable[[Record], str]


def rationale_steps(record: Record, schema: StepSchema | None = None, *, include_unspecified: bool = False,
                    extra_writers: Mapping[str, StepWriter] | None = None) -> dict[str, object]:
    """The step values (``{step name: value}``) of the rationale for ``record``; see :func:`write_rationale`."""
    if record.label is None:
        raise UserError(f"record {record.id}: no label; the rationale writer explains a gold label")
    schema = schema or default_schema(record.taxonomy)
    if schema.taxonomy != record.taxonomy:
        raise UserError(f"record {record.id}: taxonomy {record.taxonomy!r} differs from the schema's {schema.taxonomy!r}")
    attr_step = next((s for s in schema.steps if s.kind == "attributes"), None)
    allowed = attr_step.choices if attr_step is not None else None
    ev = analyse(record)
    type_rel, attrs = choose_conclusions(ev, record.label, record.taxonomy, allowed)
    shown = _attr_text(attrs, allowed or (), include_unspecified)
    same_ok = type_rel == "same" and not any(v == "mismatch" for v in attrs.values())

    q_cons = {a: ev.query_constraints[a] for a in ATTRIBUTES if a in ev.query_constraints}
    # the product line reports the brand plus whatever the attribute step checks
    p_vals = {a: ev.product_attrs[a] for a in ATTRIBUTES
              if a in ev.product_attrs and (a == "brand" or a in shown or a in q_cons)}
    steps: dict[str, object] = {}
    for s in schema.steps:
        if extra_writers and s.name in extra_writers:
            steps[s.name] = extra_writers[s.name](record)
        elif s.name == "query" and s.kind == "free":
            steps[s.name] = _analysis_line(_trim_words(ev.query_phrase, 8), q_cons, "unclear query")
        elif s.name == "product" and s.kind == "free":
            steps[s.name] = _analysis_line(_trim_words(ev.product_phrase, 6), {a: _trim_words(v, 4) for a, v in p_vals.items()},
                                           "unclear product")
        elif s.name == "coverage" and s.kind == "free":
            steps[s.name] = coverage_text(missing_query_words(record))
        elif s.name == "numbers" and s.kind == "free":
            steps[s.name] = numbers_text(number_checks(record))
        elif s.name == "head" and s.kind == "free":
            steps[s.name] = head_text(head_check(record))
        elif s.name == "similarity" and s.kind == "choice":
            from she.reasoning.similarity import similarity_bucket  # loads MiniLM: only for schemas that have it

            steps[s.name] = similarity_bucket(record)
        elif s.name == "type" and s.kind == "choice":
            steps[s.name] = type_rel
        elif s.name == "relevant" and s.kind == "choice":
            steps[s.name] = relevant_choice(record.label, record.taxonomy)
        elif s.kind == "attributes":
            steps[s.name] = shown
        elif s.kind == "label":
            steps[s.name] = record.label
        elif s.kind == "choice" and s.name in ("negation", "specs"):
            yes = ev.negation if s.name == "negation" else same_ok
            choice = "yes" if yes else "no"
            if choice not in (s.choices or ()):
                raise UserError(f"step {s.name!r}: choices must include 'yes' and 'no' for the rationale writer")
            steps[s.name] = choice
        else:
            raise UserError(
                f"rationale writer has no rule for step {s.name!r} (kind {s.kind}); pass extra_writers={{{s.name!r}: fn}}"
            )
    return steps


def relevant_choice(label: str, taxonomy: str) -> str:
    """The ``Relevant`` step of a gold label: ``no`` for the taxonomy's least relevant label, else ``yes``."""
    tax = get_taxonomy(taxonomy)
    return "no" if tax.normalize(label) == tax.labels[0] else "yes"


def _trim_words(text: str, n: int) -> str:
    words = one_line(text).split()
    return " ".join(words[:n])


def write_rationale(record: Record, schema: StepSchema | None = None, *, include_unspecified: bool = False,
                    extra_writers: Mapping[str, StepWriter] | None = None) -> str:
    """A short trace for ``record`` whose Type/Attributes imply its gold label and whose Verdict is it.

    Raises ``ValueError`` for an unlabelled record or a schema step it has no rule for. The result
    is checked with the parser before it is returned (``format_ok`` and ``consistent_label`` equal
    to the gold label); a failure there is a bug and raises ``RuntimeError``.
    """
    schema = schema or default_schema(record.taxonomy)
    text = render_trace(rationale_steps(record, schema, include_unspecified=include_unspecified,
                                        extra_writers=extra_writers), schema)
    parsed = parse_trace(text, schema)
    implied = consistent_label(parsed, schema.taxonomy) if parsed.step("type") is not None else parsed.label
    if not parsed.format_ok or parsed.label != record.label or implied != record.label:
        raise RuntimeError(
            f"record {record.id}: rationale failed its own check (format_ok={parsed.format_ok}, "
            f"label={parsed.label}, implied={implied}, errors={parsed.errors}):\n{text}"
        )
    return text


def computed_evidence(record: Record, schema: StepSchema | None = None, stop_at: str | None = None) -> str:
    """The reasoning the rationale writer computes from the pair alone, up to the verdict key (``...\nVerdict:``).

    For a schema whose steps are label-free functions of the strings (``evidence``, ``semantic``) this is the
    trace with every step right, written without looking at a label: the judge then only has to give the
    verdict (``evidence: computed`` in ``she eval`` / ``she predict``; docs/reasoning-format.md). The trace is
    written once per label of the taxonomy and must come out the same every time; a schema with a
    label-derived step (``Type``, ``Attributes``) is refused (``UserError``), so no label can leak in.
    ``stop_at`` (a step name): the trace up to that step's key instead (``...\nRelevant:``), for a schema whose
    label-derived step comes last and is read as a probability (:func:`she.evaluation.fast.marginal_judgements`).
    """
    schema = schema or default_schema(record.taxonomy)
    prefixes = set()
    for label in get_taxonomy(schema.taxonomy).labels:
        text = write_rationale(dataclasses.replace(record, label=label, taxonomy=schema.taxonomy), schema)
        parsed = parse_trace(text, schema)
        if stop_at is None:
            prefixes.add(verdict_prefix(text, parsed.label_span[0])[0])
        else:
            line = parsed.step(stop_at)
            if line is None:
                raise UserError(f"schema has no step {stop_at!r} to stop at")
            prefixes.add(text[: line.span[0]] + f"{line.key}:")
    if len(prefixes) != 1:
        steps = [s for s in schema.steps if s.kind != "label"]
        if stop_at is not None:
            steps = steps[: [s.name for s in steps].index(stop_at)]
        keys = ", ".join(s.key for s in steps)
        raise UserError(f"record {record.id}: the steps of this schema ({keys}) depend on the label, so they cannot be "
                        "computed from the pair; computed evidence needs a label-free schema (evidence, semantic) "
                        "or one whose only label-derived step is a choice right before the verdict (decision)")
    return prefixes.pop()


def computed_stem(record: Record, schema: StepSchema) -> str:
    """The steps of ``record``'s trace a program computes, as text ending with the key the model answers next:
    ``...\nVerdict:`` for a label-free schema (evidence, semantic), ``...\nRelevant:`` for one whose only
    label-derived step is the choice right before the verdict (decision; :func:`she.reasoning.schema.marginal_step`).
    ``UserError`` for any other schema."""
    try:
        return computed_evidence(record, schema)
    except UserError as full:
        try:
            step = marginal_step(schema)
        except UserError:
            raise full from None
        return computed_evidence(record, schema, stop_at=step.name)


__all__ = ["Evidence", "analyse", "choose_conclusions", "computed_evidence", "computed_stem", "rationale_steps",
           "relevant_choice", "write_rationale"]
