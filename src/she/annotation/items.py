"""What an annotator sees: records + policy traces (+ judge scores) -> ranked :class:`QueueItem` payloads.

Traces come from a traces file (``{"id", "trace"}`` lines as ``she data teach`` writes, or ``she predict``
output with ``reasoning``), from the policy (``--model``: greedy generation), or, with neither, from the
rule-based rationale of the record (useful to collect facts before any policy exists).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from she.annotation.queue import Candidate, Ranked, rank_queue
from she.data.annotations import QueueItem
from she.data.schema import ATTRIBUTES, MATCH_VALUES, TYPE_RELATIONS, YES_NO, Record
from she.data.validation import DataError

# The facts an annotator can set under each step, with their closed vocabularies (free-text facts such as
# query_class are not offered: the page only offers values it can validate).
FACT_VOCAB: dict[str, tuple[str, ...]] = {"type_relation": TYPE_RELATIONS, **{a: MATCH_VALUES for a in ATTRIBUTES},
                                          "specs_met": YES_NO, "negation": YES_NO}
STEP_FACTS: dict[str, tuple[str, ...]] = {"query": ("negation",), "type": ("type_relation",),
                                          "attributes": (*ATTRIBUTES, "specs_met")}


def implied_facts(step_name: str, conclusion: Any) -> dict[str, str]:
    """Facts a *right* mark on a step establishes: a right Type step's relation, a right Attributes step's
    attribute values. Nothing for other steps (a right free-text step states no vocabulary fact)."""
    if step_name == "type" and conclusion in TYPE_RELATIONS:
        return {"type_relation": conclusion}
    if step_name == "attributes" and isinstance(conclusion, dict):
        return {a: v for a, v in conclusion.items() if a in ATTRIBUTES and v in MATCH_VALUES}
    return {}


def item_id_of(record_id: str, trace: str) -> str:
    return f"{record_id}~{hashlib.sha1(trace.encode('utf-8')).hexdigest()[:8]}"


def _id_lines(path: str | Path, what: str):
    """``(path, line number, object)`` for each non-blank JSONL line, each an object with an ``id``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such {what} file", path=p)
    for line, text in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", path=p, line=line) from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise DataError("missing field", path=p, line=line, field="id")
        yield p, line, obj


def load_traces(path: str | Path) -> dict[str, list[str]]:
    """``{record id: [trace, ...]}`` from JSONL lines with ``id`` and ``trace`` (or ``reasoning``)."""
    out: dict[str, list[str]] = {}
    for p, line, obj in _id_lines(path, "traces"):
        trace = obj.get("trace", obj.get("reasoning"))
        if not isinstance(trace, str) or not trace.strip():
            raise DataError("missing or empty (a trace line is {\"id\": ..., \"trace\": \"...\"})", path=p, line=line,
                            field="trace")
        out.setdefault(str(obj["id"]), []).append(trace)
    return out


def load_queue_file(path: str | Path) -> list[tuple[str, str | None, int]]:
    """An explicit queue, in file order: ``(record id, trace or None, need)`` from lines
    ``{"id": ..., "trace": "..." (optional), "need": 1 (optional, annotators wanted)}``."""
    out = []
    for p, line, obj in _id_lines(path, "queue"):
        trace = obj.get("trace")
        if trace is not None and not isinstance(trace, str):
            raise DataError("must be a string", path=p, line=line, field="trace")
        need = obj.get("need", 1)
        if isinstance(need, bool) or not isinstance(need, int) or not 1 <= need <= 10:
            raise DataError(f"must be an integer 1..10, got {json.dumps(need)}", path=p, line=line, field="need")
        out.append((str(obj["id"]), trace, need))
    return out


def payload(record: Record, trace: str, schema, *, judge: Sequence[float | None] | None = None,
            verifier: Sequence[float | None] | None = None) -> dict[str, Any]:
    """The JSON the page is rendered from (stored with the queue item)."""
    from she.reasoning.parse import parse_trace

    parsed = parse_trace(trace, schema)
    n = len(parsed.steps)
    judge = list(judge) if judge is not None else [None] * n
    verifier = list(verifier) if verifier is not None else [None] * n
    steps = [{"name": s.name, "key": s.key, "text": s.text, "conclusion": s.conclusion,
              "fields": list(STEP_FACTS.get(s.name, ())), "judge": judge[k], "verifier": verifier[k]}
             for k, s in enumerate(parsed.steps)]
    return {"record": record.to_dict(), "trace": trace, "steps": steps, "label": parsed.label, "gold": record.label}


def build_items(records: Sequence[Record], traces: Mapping[str, Sequence[str]], *, judge: Any = None,
                qc_share: float = 0.1, seed: int = 0, schema=None,
                explicit: Sequence[tuple[str, str | None, int]] | None = None) -> list[QueueItem]:
    """Score every (record, trace) with the verifier (the records' facts) and the judge (if any), rank them
    (:func:`rank_queue`), or keep the ``explicit`` order of a queue file, and build the queue items."""
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import default_schema
    from she.rewards.hybrid import VerifierExaminer

    by_id = {r.id: r for r in records}
    if schema is None:
        schema = default_schema(records[0].taxonomy if records else "hd3")
    pairs: list[tuple[Record, str, int, str | None]] = []  # record, trace, need, reason
    if explicit is not None:
        for rid, trace, need in explicit:
            if rid not in by_id:
                raise DataError(f"queue file names record {rid!r}, which is not in the data")
            for t in ([trace] if trace is not None else traces.get(rid, [])):
                pairs.append((by_id[rid], t, need, "queue file"))
    else:
        for r in records:
            for t in traces.get(r.id, []):
                pairs.append((r, t, 1, None))
    parsed = [parse_trace(t, schema) for _, t, _, _ in pairs]
    verifier = VerifierExaminer()
    v_scores = [verifier.score_steps(p, r) for p, (r, _, _, _) in zip(parsed, pairs)]
    if judge is not None and pairs:
        j_scores = [list(s) for s in judge.score_steps_batch([(p, r) for p, (r, _, _, _) in zip(parsed, pairs)])]
    else:
        j_scores = [[None] * len(p.steps) for p in parsed]
    items: dict[str, QueueItem] = {}
    for (r, t, need, reason), p, v, j in zip(pairs, parsed, v_scores, j_scores):
        iid = item_id_of(r.id, t)
        items.setdefault(iid, QueueItem(iid, r.id, reason or "", need, payload(r, t, schema, judge=j, verifier=v)))
    if explicit is not None:
        return list(items.values())
    cands = [Candidate(it.item_id, tuple(s["verifier"] for s in it.payload["steps"]),
                       tuple(s["judge"] for s in it.payload["steps"]), it.payload["label"], it.payload["gold"])
             for it in items.values()]
    ranked: list[Ranked] = rank_queue(cands, qc_share=qc_share, seed=seed)
    return [QueueItem(x.item_id, items[x.item_id].record_id, x.reason, x.need,
                      {**items[x.item_id].payload, "priority": round(x.priority, 4)}) for x in ranked]


def policy_traces(model_dir: str, records: Sequence[Record], *, max_new_tokens: int = 96) -> dict[str, list[str]]:
    """Greedy traces of the policy at ``model_dir`` (one per record)."""
    from she.evaluation.evaluate import prompt_style_of
    from she.evaluation.generate import generate_judgements
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    judged = generate_judgements(model, tok, list(records), taxonomy=records[0].taxonomy if records else "hd3",
                                 max_new_tokens=max_new_tokens, prompt_style=prompt_style_of(model_dir))
    return {j.record_id: [j.text] for j in judged}


def rule_traces(records: Sequence[Record]) -> dict[str, list[str]]:
    """The rule-based rationale of each record (no policy yet)."""
    from she.reasoning.rationale import write_rationale

    return {r.id: [write_rationale(r)] for r in records}


__all__ = ["FACT_VOCAB", "STEP_FACTS", "build_items", "implied_facts", "item_id_of", "load_queue_file",
           "load_traces", "payload", "policy_traces", "rule_traces"]
