"""pass@N rollouts of a policy and preference pairs from them (data for the DPO and reward-model baselines).

Why pass@N: the DPO and scalar-RM baselines must learn from the *same kind of signal* SRPO gets -- the
policy's own samples, judged against the human label -- and nothing more. So the data is:

1. **Rollouts.** The policy (normally the SFT checkpoint) samples N completions per training prompt, with
   the prompt style it was trained with (``she.json``). Each completion is parsed
   (:func:`she.reasoning.parse.parse_trace`) and marked *correct* when its parsed label equals the gold
   label; an unparsable completion has no label and is incorrect.
2. **Pairs.** For every prompt with at least one correct and one incorrect rollout,
   :func:`make_preference_pairs` draws up to ``max_pairs_per_prompt`` distinct (chosen = correct,
   rejected = incorrect) pairs. Prompts where all N rollouts agree give no pair -- there is nothing to
   prefer -- and are *counted*, never dropped silently.

Optional fallback (``fallback_rationale``, default off): a prompt whose N rollouts are all wrong can use
the rule-based rationale (:func:`she.reasoning.rationale.write_rationale`) as its chosen completion. Off by
default because it feeds the baseline gold reasoning that SRPO never sees during RL (SRPO's only contact
with the rule writer is the shared SFT warm start); turning it on answers a different question ("DPO with
reference traces") and must be reported as such.

The rollouts are cached in a JSONL file, one line per record, written as they are produced (chunk by
chunk), so an interrupted sampling run resumes where it stopped and two jobs (DPO and the reward model)
can share one cache -- which is how the equal-data rule of docs/baselines.md is kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.schema import StepSchema

log = logging.getLogger(__name__)

# Settings that change what a rollout *is*; a cache written with other values cannot be reused.
CACHE_KEYS = ("policy", "n", "temperature", "top_p", "max_new_tokens", "prompt_style")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion and how it was judged."""

    text: str
    label: str | None  # parsed label, None when the completion states none
    correct: bool  # label == gold
    format_ok: bool


@dataclass
class RecordRollouts:
    """The N rollouts of one record, plus the settings they were sampled with (the cache line)."""

    id: str
    gold: str
    rollouts: list[Rollout]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_correct(self) -> int:
        return sum(r.correct for r in self.rollouts)

    def to_json(self) -> str:
        d = {"id": self.id, "gold": self.gold, **self.settings, "rollouts": [asdict(r) for r in self.rollouts]}
        return json.dumps(d, ensure_ascii=False)


@dataclass(frozen=True)
class PreferencePair:
    """A DPO/RM training pair. The prompt is *not* stored: it is rebuilt from the record with the policy's
    prompt style (:func:`preference_rows`), so a pair file never goes stale when the prompt format does."""

    record_id: str
    chosen: str
    rejected: str
    chosen_source: str = "rollout"  # rollout | rationale (the fallback)


# ------------------------------------------------------------------------------------ judging rollouts


def judge_rollout(text: str, record: Record, schema: StepSchema | None = None) -> Rollout:
    """Parse one completion in ``schema`` (None = the built-in one) and compare its label with the gold label."""
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import schema_for

    if record.label is None:
        raise UserError(f"record {record.id}: no gold label; pass@N rollouts need labelled records")
    parsed = parse_trace(text, schema_for(schema, record.taxonomy))
    return Rollout(text=text, label=parsed.label, correct=parsed.label == record.label, format_ok=parsed.format_ok)


# ------------------------------------------------------------------------------------------- pairs


def _distinct(texts: Iterable[str]) -> list[str]:
    """Texts in first-seen order without repeats: two identical rollouts are one piece of evidence."""
    seen: set[str] = set()
    out = []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def make_preference_pairs(
    rollouts_by_id: Mapping[str, RecordRollouts],
    max_pairs_per_prompt: int | None,
    seed: int = 0,
    *,
    references: Mapping[str, str] | None = None,
) -> tuple[list[PreferencePair], dict[str, int]]:
    """(chosen = correct, rejected = incorrect) pairs per prompt, and counts of what happened (pure).

    For a prompt with C distinct correct and W distinct incorrect completions there are C*W candidate
    pairs; up to ``max_pairs_per_prompt`` (None = all) are drawn without replacement, in an order that
    depends only on ``seed`` and the record id (not on dict order), so the same cache always gives the same
    pairs. ``references`` (record id -> a known-good completion, e.g. the rule-based rationale) is the
    optional fallback: used as the only chosen text for a prompt with *no* correct rollout.

    Statistics: ``prompts``, ``prompts_with_pairs``, ``no_correct`` (all rollouts wrong, no fallback),
    ``no_incorrect`` (all right), ``fallback_prompts``, ``pairs``.
    """
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise UserError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    stats = {"prompts": 0, "prompts_with_pairs": 0, "no_correct": 0, "no_incorrect": 0, "fallback_prompts": 0,
             "pairs": 0}
    pairs: list[PreferencePair] = []
    for rid in sorted(rollouts_by_id):
        rs = rollouts_by_id[rid]
        stats["prompts"] += 1
        good = _distinct(r.text for r in rs.rollouts if r.correct)
        bad = _distinct(r.text for r in rs.rollouts if not r.correct)
        source = "rollout"
        if not bad:
            stats["no_incorrect"] += 1
            continue
        if not good:
            if references is None or rid not in references:
                stats["no_correct"] += 1
                continue
            good, source = [references[rid]], "rationale"
            stats["fallback_prompts"] += 1
        candidates = [(c, r) for c in good for r in bad]
        random.Random(f"{seed}:{rid}").shuffle(candidates)
        take = candidates if max_pairs_per_prompt is None else candidates[:max_pairs_per_prompt]
        pairs.extend(PreferencePair(rid, c, r, source) for c, r in take)
        stats["prompts_with_pairs"] += 1
        stats["pairs"] += len(take)
    return pairs, stats


def preference_rows(pairs: Sequence[PreferencePair], records_by_id: Mapping[str, Record],
                    prompt_style: str = "compact", schema: StepSchema | None = None) -> list[dict[str, Any]]:
    """TRL's conversational preference format: ``prompt`` = the policy's chat messages (exactly what SFT
    and GRPO put in front of the model, :func:`she.reasoning.prompts.build_messages`, in the policy's
    ``schema``; None = the built-in one), ``chosen`` / ``rejected`` = one assistant message each."""
    from she.reasoning.prompts import build_messages
    from she.reasoning.schema import schema_for

    rows = []
    for p in pairs:
        if p.record_id not in records_by_id:
            raise ValueError(f"preference pair for record {p.record_id!r}, which is not among the records")
        rows.append({
            "prompt": build_messages(records_by_id[p.record_id], style=prompt_style,
                                     schema=schema_for(schema, records_by_id[p.record_id].taxonomy)),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        })
    return rows


def pass_at_n_stats(rollouts_by_id: Mapping[str, RecordRollouts]) -> dict[str, float]:
    """pass@1 (share of correct rollouts) and pass@N (share of prompts with a correct rollout)."""
    n_prompts = len(rollouts_by_id)
    n_rollouts = sum(len(r.rollouts) for r in rollouts_by_id.values())
    return {
        "prompts": n_prompts,
        "rollouts": n_rollouts,
        "pass@1": sum(r.n_correct for r in rollouts_by_id.values()) / n_rollouts if n_rollouts else 0.0,
        "pass@n": sum(r.n_correct > 0 for r in rollouts_by_id.values()) / n_prompts if n_prompts else 0.0,
        "format_ok": (sum(x.format_ok for r in rollouts_by_id.values() for x in r.rollouts) / n_rollouts
                      if n_rollouts else 0.0),
    }


# ------------------------------------------------------------------------------------------- cache


def _rollout_from_json(d: Any, where: str) -> Rollout:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected an object, got {type(d).__name__}")
    for key, tp in (("text", str), ("correct", bool), ("format_ok", bool)):
        if not isinstance(d.get(key), tp):
            raise UserError(f"{where}: field {key!r} must be a {tp.__name__}, got {d.get(key)!r}")
    if d.get("label") is not None and not isinstance(d["label"], str):
        raise UserError(f"{where}: field 'label' must be a string or null, got {d['label']!r}")
    return Rollout(d["text"], d.get("label"), d["correct"], d["format_ok"])


def load_rollouts(path: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> dict[str, RecordRollouts]:
    """Read a rollout cache. With ``settings``, every line must have been sampled with the same
    :data:`CACHE_KEYS` values (else a ValueError names the file, line and field): mixing rollouts of two
    policies or temperatures in one training set would be a silent confound."""
    from she.data.validation import iter_jsonl

    out: dict[str, RecordRollouts] = {}
    for n, d in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object")
        for key in ("id", "gold"):
            if not isinstance(d.get(key), str):
                raise UserError(f"{where}: field {key!r} must be a string, got {d.get(key)!r}")
        if not isinstance(d.get("rollouts"), list):
            raise UserError(f"{where}: field 'rollouts' must be a list")
        if settings is not None:
            for key in CACHE_KEYS:
                if key in settings and d.get(key) != settings[key]:
                    raise UserError(
                        f"{where}: field {key!r} is {d.get(key)!r} but this run uses {settings[key]!r}; "
                        "use another cache_file or the same sampling settings"
                    )
        if d["id"] in out:
            raise UserError(f"{where}: record id {d['id']!r} occurs twice")
        rollouts = [_rollout_from_json(x, f"{where} rollouts[{i}]") for i, x in enumerate(d["rollouts"])]
        out[d["id"]] = RecordRollouts(d["id"], d["gold"], rollouts, {k: d[k] for k in CACHE_KEYS if k in d})
    return out


def rollout_settings(policy_dir: str | os.PathLike, *, n: int, temperature: float, top_p: float,
                     max_new_tokens: int, prompt_style: str) -> dict[str, Any]:
    """The :data:`CACHE_KEYS` values stored on every cache line (the policy as an absolute path, so the same
    folder named two ways is one policy)."""
    return {"policy": str(Path(policy_dir).resolve()), "n": int(n), "temperature": float(temperature),
            "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "prompt_style": prompt_style}


def _drop_incomplete_tail(path: Path) -> None:
    """Cut a last line without its newline: the trace of a run killed while appending (resume repairs it,
    with a warning, instead of failing on half a JSON object)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)


def sample_rollouts(
    policy: str,
    records: Sequence[Record],
    cache_file: str | os.PathLike,
    *,
    n: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 80,
    batch_size: int = 32,
    prompt_style: str | None = None,
    bf16: bool = False,
    seed: int = 0,
    chunk_records: int = 64,
    progress: bool = False,
    schema: StepSchema | None = None,
) -> dict[str, RecordRollouts]:
    """N sampled completions per record from ``policy`` (registry name or folder), cached and resumable.

    Records already in ``cache_file`` (same settings) are not sampled again; new ones are sampled in chunks
    of ``chunk_records`` and appended after each chunk, so a crash loses at most one chunk. Each chunk is
    seeded from ``seed`` and its first record id, so resuming reproduces the same samples on the same
    hardware. ``prompt_style`` and ``schema`` None = the policy's own (``she.json``), like ``she eval``. Returns
    the rollouts of ``records`` (not of other records that may also be in the cache).
    """
    from she.models.metadata import model_step_schema, prompt_style_of
    from she.models.registry import resolve_model

    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    policy_dir = resolve_model(policy)
    style = prompt_style or prompt_style_of(policy_dir)
    schema = schema or model_step_schema(policy_dir, records[0].taxonomy if records else "hd3")
    settings = rollout_settings(policy_dir, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                prompt_style=style)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError("sample_rollouts: record ids must be unique")
    path = Path(cache_file)
    if path.exists():
        _drop_incomplete_tail(path)
    cached = load_rollouts(path, settings) if path.exists() else {}
    todo = [r for r in records if r.id not in cached]
    if todo:
        from she.models.registry import load_model_and_tokenizer
        from she.training.prm import PolicySampler

        log.info("pass@%d: sampling %d record(s), %d already cached in %s", n, len(todo), len(records) - len(todo), path)
        model, tok = load_model_and_tokenizer(policy_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), chunk_records):
            chunk = todo[start : start + chunk_records]
            chunk_seed = seed + zlib.crc32(chunk[0].id.encode()) % (2**31)
            sampler = PolicySampler(model, tok, prompt_style=style, top_p=top_p, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, bf16=bf16, seed=chunk_seed, progress=progress,
                                    schema=schema)
            texts = sampler([(r, "") for r in chunk], n, temperature)
            lines = []
            for r, group in zip(chunk, texts):
                rs = RecordRollouts(r.id, r.label, [judge_rollout(t, r, schema) for t in group], dict(settings))
                cached[r.id] = rs
                lines.append(rs.to_json() + "\n")
            with open(path, "a", encoding="utf-8") as f:  # append: earlier chunks stay intact
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
    out = {}
    for r in records:
        rs = cached[r.id]
        if rs.gold != r.label:
            raise UserError(f"{path}: record {r.id!r} is cached with gold {rs.gold!r} but the data says {r.label!r}")
        out[r.id] = rs
    return out


def subsample(records: Sequence[Record], max_records: int | None, seed: int) -> list[Record]:
    """A seeded subsample (the pass@N budget); all records when ``max_records`` is None or large enough."""
    records = list(records)
    if max_records is None or len(records) <= max_records:
        return records
    return random.Random(f"{seed}:pass@n").sample(records, max_records)


def build_pairs_for_job(policy: str, records: Sequence[Record], rcfg, cache_file: str | os.PathLike, *,
                        prompt_style: str | None = None, bf16: bool = False, progress: bool = False,
                        schema: StepSchema | None = None) -> tuple[list[PreferencePair], dict[str, Any], str]:
    """The shared front half of the DPO and RM jobs: subsample, sample (or reuse) rollouts, make pairs.

    ``rcfg`` is a :class:`she.config.PassAtNConfig`; ``schema`` the policy's step schema (None = its she.json).
    Returns (pairs, statistics, prompt style used).
    """
    from she.models.metadata import model_step_schema, prompt_style_of
    from she.models.registry import resolve_model

    labelled = [r for r in records if r.label is not None]
    if len(labelled) != len(records):
        raise UserError(f"{len(records) - len(labelled)} training record(s) have no label; pass@N needs labels")
    chosen = subsample(labelled, rcfg.max_records, rcfg.seed)
    style = prompt_style or prompt_style_of(resolve_model(policy))
    schema = schema or model_step_schema(policy, chosen[0].taxonomy if chosen else "hd3")
    rollouts = sample_rollouts(policy, chosen, cache_file, n=rcfg.n, temperature=rcfg.temperature, top_p=rcfg.top_p,
                               max_new_tokens=rcfg.max_new_tokens, batch_size=rcfg.batch_size, prompt_style=style,
                               bf16=bf16, seed=rcfg.seed, progress=progress, schema=schema)
    references = None
    if rcfg.fallback_rationale:
        from she.reasoning.rationale import write_rationale
        from she.reasoning.schema import schema_for

        references = {r.id: write_rationale(r, schema_for(schema, r.taxonomy)) for r in chosen}
    pairs, pstats = make_preference_pairs(rollouts, rcfg.max_pairs_per_prompt, rcfg.seed, references=references)
    stats = {**pass_at_n_stats(rollouts), **pstats, "generations": len(chosen) * rcfg.n,
             "cache_file": str(cache_file)}
    if not pairs:
        raise UserError(
            f"pass@{rcfg.n} gave no preference pairs ({stats}); every prompt was all-right or all-wrong. "
            "Sample more rollouts (n), raise the temperature, or set fallback_rationale: true"
        )
    return pairs, stats, style


__all__ = [
    "CACHE_KEYS",
    "PreferencePair",
    "RecordRollouts",
    "Rollout",
    "build_pairs_for_job",
    "judge_rollout",
    "load_rollouts",
    "make_preference_pairs",
    "pass_at_n_stats",
    "preference_rows",
    "rollout_settings",
    "sample_rollouts",
    "subsample",
]
