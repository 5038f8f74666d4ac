"""``she train prm``: step labels for policy rollouts, then fine-tuning of the generative judge.

Data (the old TRL stepwise format, one JSON object per line)::

    {"prompt": "<query/product text>", "completions": ["Query: ...", "Product: ...", ...],
     "labels": [true, false, ...], "record_id": ..., "query_id": ..., "rollout": 0, "label_sources": [...]}

``prompt`` is the query/product text (:func:`she.reasoning.prompts.user_message`), *not* a chat-templated
string, so a dataset does not depend on which judge model is trained on it. ``labels`` are booleans
(``label_mode: hard``) or floats in [0, 1] (``soft``); ``null`` marks a step that got no label (it stays
in the judge's input as context but adds nothing to the loss -- TRL's own PRM trainer does not accept
nulls, drop those rows or steps before giving it this file).

Where labels come from:

* **Monte-Carlo rollouts (Math-Shepherd).** For each record the policy samples a rollout; for every step
  prefix ending at step k it samples M continuations, and ``share_k`` = the fraction of continuations
  whose parsed label equals the human label. ``hard``: ``share_k > 0`` (the prefix can still reach the
  right answer); ``soft``: ``share_k`` itself. Steps at or after the step that states the rollout's own
  label need no sampling: the outcome is already decided (1 if that label is right, else 0).
* **Verifier facts** (:func:`she.rewards.verifier.verify_steps`): correct -> 1, incorrect -> 0. Facts
  are exact where they exist and free, so by default they override MC, and MC is only *run* for the
  steps the facts cannot check (``unknown_steps: mc``) -- or those steps are skipped (``skip``).

Training is a plain torch loop: cross-entropy on the verdict slots only, soft targets over the two
verdict tokens (:func:`she.rewards.judge.verdict_loss_terms`). A share of query groups is held out and
the judge's step-level accuracy and ROC AUC on it are written to ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from she.config import PRMJobConfig, to_dict
from she.data.schema import Record
from she.errors import UserError
from she.evaluation.metrics import roc_auc
from she.models.metadata import schema_of
from she.reasoning.schema import StepSchema, resolve_schema, schema_for

log = logging.getLogger(__name__)

LABEL_MODES = ("hard", "soft")
PRIORITIES = ("facts", "mc")
UNKNOWN_POLICIES = ("mc", "skip")
SRC_FACTS, SRC_MC, SRC_OUTCOME = "facts", "mc", "outcome"

# (requests [(record, prefix text)], n, temperature) -> n continuation texts per request
Sampler = Callable[[Sequence[tuple[Record, str]], int, float], list[list[str]]]


# -- sampling from the policy ------------------------------------------------------------------------
class PolicySampler:
    """Batched sampling of continuations from a policy: prompt (the policy's chat prompt) + prefix.

    Requests are repeated ``n`` times and sorted by length so batches waste little padding. Seeded per
    call (``seed + call index``), so a labelling run is reproducible on the same hardware. ``schema`` is the
    step schema of the policy's prompt (None = the built-in one).
    """

    def __init__(self, model: Any, tokenizer: Any, *, prompt_style: str = "full", top_p: float = 1.0,
                 max_new_tokens: int = 96, batch_size: int = 32, bf16: bool = False, seed: int = 0,
                 progress: bool = False, schema: StepSchema | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.schema = schema
        self.prompt_style, self.top_p, self.max_new_tokens = prompt_style, top_p, max_new_tokens
        self.batch_size, self.bf16, self.seed, self.progress = batch_size, bf16, seed, progress
        self.generations = 0
        self._calls = 0
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def prompt(self, record: Record) -> str:
        from she.reasoning.prompts import build_messages

        messages = build_messages(record, style=self.prompt_style, schema=schema_for(self.schema, record.taxonomy))
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, requests: Sequence[tuple[Record, str]], n: int, temperature: float) -> list[list[str]]:
        import torch

        from she.models.generation import fast_decoding, fast_sampling, shared_prefill
        from she.models.metadata import autocast

        if n < 1:
            raise UserError("n must be >= 1")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        prompts = [self.prompt(r) + prefix for r, prefix in requests]
        flat = [i for i in range(len(requests)) for _ in range(n)]
        order = sorted(range(len(flat)), key=lambda j: len(prompts[flat[j]]))
        texts: list[str] = [""] * len(flat)
        tok, model = self.tokenizer, self.model
        tok.padding_side = "left"
        device = next(model.parameters()).device
        eos = tok.eos_token_id
        torch.manual_seed(self.seed + self._calls)
        self._calls += 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": self.top_p} if temperature > 0 \
            else {"do_sample": False}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(flat), desc="policy sampling", unit="gen")
        model.eval()
        # on a CPU the decoding speed-ups of she.models.generation (packed weights once for all batches)
        with torch.no_grad(), fast_decoding(model, pack=self.bf16):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = tok([prompts[flat[j]] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                # on a CPU sampled by inversion (she.models.generation: the same distribution, the same torch seed);
                # the n samples of a request are adjacent rows (a stable sort), so their prompt is computed once
                with autocast(self.bf16, device), fast_sampling(temperature > 0 and device.type == "cpu"), \
                        shared_prefill(model, n > 1 and device.type == "cpu"):
                    out = model.generate(**enc, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=eos, **sampling)
                gen = out[:, enc["input_ids"].shape[1]:]
                for row, j in enumerate(idx):
                    ids = gen[row].tolist()
                    if eos in ids:
                        ids = ids[: ids.index(eos)]
                    texts[j] = tok.decode(ids, skip_special_tokens=True)
                self.generations += len(idx)
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        grouped: list[list[str]] = [[] for _ in requests]
        for j, i in enumerate(flat):
            grouped[i].append(texts[j])
        return grouped


# -- labelling (pure functions) -------------------------------------------------------------------------
def step_prefixes(text: str, parsed: Any) -> list[str]:
    """The rollout text up to and including step k's line, plus a newline, for every step k."""
    return [text[: s.span[1]] + "\n" for s in parsed.steps]


def decided_at(parsed: Any) -> int | None:
    """Index of the step whose line states the label the parser reads (the outcome is fixed from there)."""
    if parsed.label_span is None:
        return None
    for k, s in enumerate(parsed.steps):
        if s.span[0] <= parsed.label_span[0] < s.span[1]:
            return k
    return None


def fact_labels(parsed: Any, record: Record) -> list[float | None]:
    """Verifier verdicts as labels: correct -> 1.0, incorrect -> 0.0, unknown -> None."""
    from she.rewards.verifier import CORRECT, INCORRECT, verify_steps

    score = {CORRECT: 1.0, INCORRECT: 0.0}
    return [score.get(v.verdict) for v in verify_steps(parsed, record)]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {allowed}, got {value!r}")


def mc_needed(facts: Sequence[float | None], *, use_mc: bool = True, priority: str = "facts",
              unknown: str = "mc") -> list[bool]:
    """Which steps need Monte-Carlo labels: all (``priority=mc``) or only those the facts cannot check.

    Skipping MC where a fact will win anyway is what makes facts + MC affordable on a CPU.
    """
    _check_choice("facts_priority", priority, PRIORITIES)
    _check_choice("unknown_steps", unknown, UNKNOWN_POLICIES)
    if not use_mc:
        return [False] * len(facts)
    if priority == "mc":
        return [True] * len(facts)
    return [f is None and unknown == "mc" for f in facts]


def merge_step_labels(mc: Sequence[float | None], facts: Sequence[float | None], *, priority: str = "facts",
                      unknown: str = "mc", mc_sources: Sequence[str] | None = None
                      ) -> tuple[list[float | None], list[str | None]]:
    """Per step: (label, source). ``facts`` priority: the fact, else (``unknown=mc``) the MC value, else
    None; ``mc`` priority: the MC value, else the fact. ``mc_sources`` names each MC value's origin
    (``mc`` or ``outcome``) for the statistics."""
    _check_choice("facts_priority", priority, PRIORITIES)
    _check_choice("unknown_steps", unknown, UNKNOWN_POLICIES)
    if len(mc) != len(facts):
        raise ValueError(f"{len(mc)} MC labels but {len(facts)} fact labels")
    srcs = list(mc_sources) if mc_sources is not None else [SRC_MC] * len(mc)
    labels: list[float | None] = []
    sources: list[str | None] = []
    for c, f, cs in zip(mc, facts, srcs):
        if priority == "facts":
            pick = (f, SRC_FACTS) if f is not None else (c, cs) if (c is not None and unknown == "mc") else (None, None)
        else:
            pick = (c, cs) if c is not None else (f, SRC_FACTS) if f is not None else (None, None)
        labels.append(pick[0])
        sources.append(pick[1])
    return labels, sources


def finalize_label(value: float | None, source: str | None, mode: str) -> bool | float | None:
    """``hard``: MC share > 0 -> True (Math-Shepherd "hard estimation"), facts as booleans;
    ``soft``: the value as a float."""
    _check_choice("label_mode", mode, LABEL_MODES)
    if value is None:
        return None
    if mode == "hard":
        return bool(value > 0) if source in (SRC_MC, SRC_OUTCOME) else bool(value >= 0.5)
    return float(value)


def mc_shares(items: Sequence[tuple[Record, str, Any, Sequence[bool]]], sampler: Sampler, m: int,
              temperature: float, schema: StepSchema | None = None) -> tuple[list[list[float | None]], list[list[str]]]:
    """Monte-Carlo share per needed step of each (record, rollout text, parsed, need) item.

    All continuations of all items go to the sampler in one call (one batched generation). Steps at or
    after :func:`decided_at` get the known outcome without sampling (source ``outcome``); steps not
    needed get None. Continuations are parsed in ``schema`` (the policy's; None = the built-in one).
    """
    from she.reasoning.parse import parse_trace

    requests: list[tuple[Record, str]] = []
    where: list[tuple[int, int]] = []
    shares: list[list[float | None]] = []
    sources: list[list[str]] = []
    for i, (record, text, parsed, need) in enumerate(items):
        if record.label is None:
            raise UserError(f"record {record.id} has no label: Monte-Carlo labels need the human label")
        if len(need) != len(parsed.steps):
            raise ValueError(f"record {record.id}: need has {len(need)} entries for {len(parsed.steps)} steps")
        d = decided_at(parsed)
        prefixes = step_prefixes(text, parsed)
        row: list[float | None] = [None] * len(parsed.steps)
        src = [SRC_MC] * len(parsed.steps)
        for k in range(len(parsed.steps)):
            if not need[k]:
                continue
            if d is not None and k >= d:
                row[k] = 1.0 if parsed.label == record.label else 0.0
                src[k] = SRC_OUTCOME
            else:
                requests.append((record, prefixes[k]))
                where.append((i, k))
        shares.append(row)
        sources.append(src)
    if requests:
        conts = sampler(requests, m, temperature)
        if len(conts) != len(requests):
            raise RuntimeError(f"sampler returned {len(conts)} groups for {len(requests)} requests")
        for (i, k), (record, prefix), group in zip(where, requests, conts):
            sch = schema_for(schema, record.taxonomy)
            hits = sum(parse_trace(prefix + c, sch).label == record.label for c in group)
            shares[i][k] = hits / len(group)
    return shares, sources


def build_prm_dataset(records: Sequence[Record], sampler: Sampler | None, *, rollouts_per_record: int = 1,
                      add_reference_traces: bool = False, mc_continuations: int = 4, rollout_temperature: float = 1.0,
                      mc_temperature: float = 1.0, label_mode: str = "hard", use_mc: bool = True,
                      use_facts: bool = True, facts_priority: str = "facts", unknown_steps: str = "mc",
                      schema: StepSchema | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample rollouts, label every step, return (rows, statistics). Nothing is dropped silently:
    records without a human label, rollouts without steps and rows without any labelled step are
    counted in the statistics. Rollouts and reference traces are in ``schema``, the policy's step schema
    (None = the built-in one); the sampler prompts with its own."""
    from she.reasoning.parse import parse_trace
    from she.reasoning.prompts import user_message

    _check_choice("label_mode", label_mode, LABEL_MODES)
    mc_needed([], use_mc=use_mc, priority=facts_priority, unknown=unknown_steps)  # validates the choices
    if use_mc and mc_continuations < 1:
        raise UserError("mc_continuations must be >= 1 when use_mc is true")
    if not use_mc and not use_facts:
        raise UserError("use_mc and use_facts are both false: there is nothing to label steps with")
    if rollouts_per_record < 0 or (rollouts_per_record == 0 and not add_reference_traces):
        raise UserError("rollouts_per_record must be >= 1 (or 0 with add_reference_traces)")
    if (rollouts_per_record > 0 or use_mc) and sampler is None:
        raise UserError("a policy sampler is needed for rollouts and Monte-Carlo labels")
    stats: Counter = Counter()
    labelled = [r for r in records if r.label is not None]
    stats["records"] = len(records)
    stats["records_without_label"] = len(records) - len(labelled)
    traces: list[tuple[Record, str, Any]] = []  # (record, text, rollout id)
    if rollouts_per_record > 0 and labelled:
        outs = sampler([(r, "") for r in labelled], rollouts_per_record, rollout_temperature)
        stats["generations_rollouts"] = len(labelled) * rollouts_per_record
        for r, texts in zip(labelled, outs):
            traces += [(r, t, j) for j, t in enumerate(texts)]
    if add_reference_traces:
        from she.reasoning.rationale import write_rationale

        traces += [(r, write_rationale(r, schema_for(schema, r.taxonomy)), "reference") for r in labelled]
        stats["reference_traces"] = len(labelled)
    items = []
    for r, text, rid in traces:
        parsed = parse_trace(text, schema_for(schema, r.taxonomy))
        stats["rollouts"] += 1
        if not parsed.steps:
            stats["rollouts_without_steps"] += 1
            continue
        facts = fact_labels(parsed, r) if use_facts else [None] * len(parsed.steps)
        need = mc_needed(facts, use_mc=use_mc, priority=facts_priority, unknown=unknown_steps)
        items.append((r, text, parsed, need, facts, rid))
    mc, mc_src = mc_shares([(r, t, p, n) for r, t, p, n, _, _ in items], sampler, mc_continuations, mc_temperature,
                           schema) \
        if use_mc else ([[None] * len(it[2].steps) for it in items], [[SRC_MC] * len(it[2].steps) for it in items])
    stats["generations_mc"] = sum(1 for row, srcs in zip(mc, mc_src) for v, s in zip(row, srcs)
                                  if v is not None and s == SRC_MC) * mc_continuations
    rows: list[dict[str, Any]] = []
    for (r, text, parsed, need, facts, rid), c, cs in zip(items, mc, mc_src):
        vals, srcs = merge_step_labels(c, facts, priority=facts_priority, unknown=unknown_steps, mc_sources=cs)
        labels = [finalize_label(v, s, label_mode) for v, s in zip(vals, srcs)]
        stats["steps"] += len(labels)
        for lab, s in zip(labels, srcs):
            if lab is None:
                stats["steps_unlabelled"] += 1
            else:
                stats[f"steps_from_{s}"] += 1
                stats["label_sum"] += float(lab)
        if all(lab is None for lab in labels):
            stats["rows_without_labels"] += 1
            continue
        rows.append({"prompt": user_message(r), "completions": [s.text for s in parsed.steps], "labels": labels,
                     "record_id": r.id, "query_id": r.group, "rollout": rid, "label_sources": srcs})
    out = dict(stats)
    n_lab = stats["steps"] - stats["steps_unlabelled"]
    out["rows"] = len(rows)
    out["labelled_steps"] = n_lab
    out["mean_label"] = round(stats["label_sum"] / n_lab, 4) if n_lab else None
    out.pop("label_sum", None)
    return rows, out


# -- dataset files ----------------------------------------------------------------------------------
def save_prm_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def check_prm_row(row: Any, where: str) -> dict[str, Any]:
    """Validate one row of the stepwise format; errors name ``where`` (file:line) and the field."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    for name in ("prompt", "completions", "labels"):
        if name not in row:
            raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise UserError(f"{where}: field 'prompt' must be a non-empty string")
    comps, labels = row["completions"], row["labels"]
    if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps) or not comps:
        raise UserError(f"{where}: field 'completions' must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(comps):
        raise UserError(f"{where}: field 'labels' must be a list with one entry per completion ({len(comps)})")
    for k, lab in enumerate(labels):
        if lab is None or isinstance(lab, bool):
            continue
        if not isinstance(lab, (int, float)) or not math.isfinite(lab) or not 0 <= lab <= 1:
            raise UserError(f"{where}: field 'labels[{k}]' is {lab!r}; "
                            "expected true/false, a number in [0, 1] or null")
    return row


def load_prm_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    from she.data.validation import iter_jsonl

    rows = [check_prm_row(row, f"{path}:{n}") for n, row in iter_jsonl(path)]
    return rows


def split_rows_by_group(rows: Sequence[dict[str, Any]], fraction: float, seed: int = 0
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held out): whole query groups (``query_id``, else ``record_id``, else the prompt) go to
    one side, so the judge is measured on queries it never saw. Groups are ordered by a seeded hash;
    the first ``round(fraction * groups)`` are held out (at least one when fraction > 0 and there are
    two or more groups)."""
    if not 0 <= fraction < 1:
        raise UserError(f"eval_fraction must be in [0, 1), got {fraction}")

    def group(row: dict[str, Any]) -> str:
        return str(row.get("query_id") or row.get("record_id") or row["prompt"])

    groups = sorted({group(r) for r in rows}, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    n_eval = round(fraction * len(groups))
    if fraction > 0 and n_eval == 0 and len(groups) >= 2:
        n_eval = 1
    held = set(groups[:n_eval])
    return [r for r in rows if group(r) not in held], [r for r in rows if group(r) in held]


# -- metrics (roc_auc: she.evaluation.metrics) ------------------------------------------------------
def _targets(labels: Sequence[Any]) -> list[float | None]:
    return [None if v is None else float(v) for v in labels]


def evaluate_judge(judge: Any, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Step-level accuracy (P >= 0.5 vs label >= 0.5), ROC AUC, Brier score and mean verdict loss on the
    labelled steps of ``rows``, overall and per step key."""
    encoded = [judge.encode(r["prompt"], r["completions"]) for r in rows]
    probs = judge.probabilities(encoded)
    ps: list[float] = []
    ys: list[float] = []
    keys: list[str] = []
    for row, pr in zip(rows, probs):
        for k, (p, y) in enumerate(zip(pr, _targets(row["labels"]))):
            if y is None:
                continue
            ps.append(p)
            ys.append(y)
            keys.append(row["completions"][k].split(":", 1)[0].strip()[:20])
    if not ps:
        return {"steps": 0, "accuracy": None, "auc": None, "brier": None, "loss": None}
    hit = [(p >= 0.5) == (y >= 0.5) for p, y in zip(ps, ys)]
    eps = 1e-7
    by_key: dict[str, dict[str, float]] = {}
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        key_auc = roc_auc([ps[i] for i in idx], [ys[i] >= 0.5 for i in idx])
        by_key[key] = {"steps": len(idx), "accuracy": round(sum(hit[i] for i in idx) / len(idx), 4),
                       "positive_share": round(sum(ys[i] >= 0.5 for i in idx) / len(idx), 4),
                       "auc": None if key_auc is None else round(key_auc, 4)}
    auc = roc_auc(ps, [y >= 0.5 for y in ys])
    return {
        "steps": len(ps),
        "accuracy": round(sum(hit) / len(hit), 4),
        "auc": None if auc is None else round(auc, 4),
        "brier": round(sum((p - y) ** 2 for p, y in zip(ps, ys)) / len(ps), 4),
        # two-way cross-entropy of the scoring probability (comparable across checkpoints)
        "loss": round(-sum(y * math.log(max(p, eps)) + (1 - y) * math.log(max(1 - p, eps))
                           for p, y in zip(ps, ys)) / len(ps), 4),
        "positive_share": round(sum(y >= 0.5 for y in ys) / len(ys), 4),
        "by_step": by_key,
    }


# -- training ---------------------------------------------------------------------------------------
def encode_rows(judge: Any, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, list[float | None]]]:
    """(encoded input, target per verdict slot) for every row with at least one labelled slot."""
    out = []
    for row in rows:
        enc = judge.encode(row["prompt"], row["completions"])
        targets = _targets(row["labels"])[: len(enc.positions)]
        if any(t is not None for t in targets):
            out.append((enc, targets))
    return out


def batch_verdict_loss(judge: Any, batch: Sequence[tuple[Any, list[float | None]]], model: Any = None):
    """Mean verdict cross-entropy over the labelled slots of ``batch`` (a tensor with grad). ``model``: the
    judge's model as the trainer wraps it (DDP), default ``judge.model``."""
    import torch

    from she.models.heads import selected_logits
    from she.rewards.judge import collate, verdict_loss_terms

    model = judge.model if model is None else model
    device = next(model.parameters()).device
    ids, mask, rows, cols = collate([e for e, _ in batch], judge.tokenizer.pad_token_id)
    flat = [t for _, ts in batch for t in ts]
    keep = torch.tensor([t is not None for t in flat], dtype=torch.bool)
    y = torch.tensor([t for t in flat if t is not None], dtype=torch.float32, device=device)
    logits = selected_logits(model, ids.to(device), mask.to(device), rows[keep].to(device), cols[keep].to(device))
    return verdict_loss_terms(logits, judge.good_id, judge.bad_id, y).mean()


def mean_verdict_loss(judge: Any, rows: Sequence[dict[str, Any]], batch_size: int = 16) -> float:
    """Training loss (full-vocabulary verdict cross-entropy) averaged over labelled slots, no grad."""
    import torch

    examples = encode_rows(judge, rows)
    total, count = 0.0, 0
    was = judge.model.training
    judge.model.eval()
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = examples[s : s + batch_size]
            n = sum(t is not None for _, ts in batch for t in ts)
            total += float(batch_verdict_loss(judge, batch)) * n
            count += n
    judge.model.train(was)
    return total / count if count else float("nan")


def _judge_trainer_class():
    """A transformers ``Trainer`` whose loss is the verdict cross-entropy of :func:`batch_verdict_loss`: the
    batches are lists of pre-encoded rows, so the collator passes them through as they are."""
    from transformers import Trainer, TrainerCallback

    class JudgeTrainer(Trainer):
        def __init__(self, *args: Any, judge: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.judge = judge

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = batch_verdict_loss(self.judge, inputs, model=model)
            return (loss, None) if return_outputs else loss

    class LogLastStep(TrainerCallback):
        """The last step is logged even when ``logging_steps`` does not divide it (as the judge always did)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return JudgeTrainer, LogLastStep


def train_judge(judge: Any, rows: Sequence[dict[str, Any]], *, epochs: float = 1.0, max_steps: int = -1,
                learning_rate: float = 5e-5, batch_size: int = 8, weight_decay: float = 0.0, warmup_steps: int = 0,
                grad_clip: float = 1.0, bf16: bool = False, seed: int = 0, logging_steps: int = 10,
                progress: bool = True, output_dir: str | os.PathLike | None = None, resume: bool = False,
                save_steps: int = 0) -> list[dict[str, float]]:
    """Fine-tune ``judge.model`` on the verdict slots of ``rows`` with a transformers ``Trainer`` (AdamW,
    linear warm-up then linear decay, gradient clipping; :func:`batch_verdict_loss` as ``compute_loss``), so
    the judge gets what every other job has: checkpoints (``save_steps`` > 0, with manifests, in
    ``output_dir``), resuming from the newest intact one (``resume``) and ``accelerate launch``.
    Returns the log history ``[{"step", "loss", "lr"}]``."""
    import tempfile

    from transformers import TrainingArguments

    from she.training.checkpoints import ManifestCallback
    from she.training.trainer_setup import device_args, train_resuming

    examples = encode_rows(judge, rows)
    if not examples:
        raise UserError("no training row has a labelled step that fits the judge's max_length")
    with tempfile.TemporaryDirectory() as scratch:  # no output_dir: nothing is kept
        out = Path(output_dir) if output_dir is not None else Path(scratch)
        args = TrainingArguments(
            output_dir=str(out), num_train_epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
            per_device_train_batch_size=batch_size, weight_decay=weight_decay, warmup_steps=warmup_steps,
            max_grad_norm=grad_clip if grad_clip and grad_clip > 0 else None, lr_scheduler_type="linear",
            **device_args(bf16), seed=seed, data_seed=seed, logging_steps=max(1, logging_steps), report_to=[],
            save_strategy="steps" if save_steps > 0 else "no", save_steps=save_steps if save_steps > 0 else 500,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not progress,
        )
        judge_trainer, log_last = _judge_trainer_class()
        trainer = judge_trainer(model=judge.model, args=args, train_dataset=examples, data_collator=list,
                                processing_class=judge.tokenizer, callbacks=[ManifestCallback(), log_last()],
                                judge=judge)
        train_resuming(trainer, out, resume, log)
    judge.model.eval()
    return [{"step": h["step"], "loss": round(float(h["loss"]), 5), "lr": h.get("learning_rate")}
            for h in trainer.state.log_history if "loss" in h]


# -- the job ----------------------------------------------------------------------------------------
def _records_for(cfg: PRMJobConfig) -> list[Record]:
    from she.data.sources import load_data, load_splits

    if cfg.split == "all":
        records = load_data(cfg.data)
    else:
        splits = load_splits(cfg.data)
        if cfg.split not in splits:
            raise UserError(f"split {cfg.split!r} does not exist; use one of {sorted(splits)} or 'all'")
        records = splits[cfg.split]
    if cfg.max_records is not None and len(records) > cfg.max_records:
        keep = sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.max_records))
        records = [records[i] for i in keep]
    from she.data.factstore import attach_from_path

    return attach_from_path(records, cfg.facts_store)  # unchanged when no facts_store is set


def check_prm_config(cfg: PRMJobConfig) -> None:
    _check_choice("label_mode", cfg.label_mode, LABEL_MODES)
    _check_choice("facts_priority", cfg.facts_priority, PRIORITIES)
    _check_choice("unknown_steps", cfg.unknown_steps, UNKNOWN_POLICIES)
    if not 0 <= cfg.eval_fraction < 1:
        raise UserError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.mc_continuations < 1 or cfg.rollouts_per_record < 0 or cfg.batch_size < 1:
        raise UserError("mc_continuations and batch_size must be >= 1, rollouts_per_record >= 0")
    if cfg.verdict_words is not None and len(cfg.verdict_words) != 2:
        raise UserError("verdict_words must be two words [good, bad] or null")


def load_judge_for_training(cfg: PRMJobConfig):
    """The judge to fine-tune: a saved judge keeps its format; a base model gets ``verdict_words`` (or
    the automatic ones) and ``max_length``."""
    from she.models.registry import load_model_and_tokenizer, resolve_model
    from she.rewards.judge import JUDGE_META, JudgeFormat, StepJudge, auto_verdicts

    path = resolve_model(cfg.judge_model)
    if (Path(path) / JUDGE_META).exists() and cfg.verdict_words is None:
        return StepJudge.from_pretrained(str(path), bf16=cfg.bf16)
    model, tok = load_model_and_tokenizer(str(path), for_training=True)
    good, bad = cfg.verdict_words or auto_verdicts(tok)
    return StepJudge(model, tok, JudgeFormat(good=good, bad=bad, max_length=cfg.max_length), bf16=cfg.bf16)


def run_prm_job(cfg: PRMJobConfig, progress: bool = True) -> dict[str, Any]:
    """Label (or load) the stepwise dataset, fine-tune the judge, measure it on held-out queries.

    The policy's rollouts are prompted, written and parsed in its own step schema (``cfg.policy``'s she.json).

    Writes to ``cfg.output_dir``: ``config.json``, ``prm_dataset.jsonl`` (when labelling),
    ``judge/`` (save_pretrained + ``she_judge.json``), ``log_history.json`` and ``metrics.json``.
    Returns the metrics dict plus the paths.
    """
    import torch

    from she.models.registry import load_model_and_tokenizer

    check_prm_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    timings: dict[str, float] = {}
    t = time.time()
    if cfg.dataset_file:
        rows = load_prm_rows(cfg.dataset_file)
        labelling: dict[str, Any] = {"dataset_file": cfg.dataset_file, "rows": len(rows)}
        dataset_path = Path(cfg.dataset_file)
    else:
        from she.models.metadata import prompt_style_of

        schema = resolve_schema(schema_of(cfg.policy), cfg.data.taxonomy)
        records = _records_for(cfg)
        policy, ptok = load_model_and_tokenizer(cfg.policy)
        sampler = PolicySampler(policy, ptok, prompt_style=prompt_style_of(cfg.policy), top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size,
                                bf16=cfg.bf16, seed=cfg.seed, progress=progress, schema=schema)
        rows, labelling = build_prm_dataset(
            records, sampler, rollouts_per_record=cfg.rollouts_per_record,
            add_reference_traces=cfg.add_reference_traces, mc_continuations=cfg.mc_continuations,
            rollout_temperature=cfg.rollout_temperature, mc_temperature=cfg.mc_temperature,
            label_mode=cfg.label_mode, use_mc=cfg.use_mc, use_facts=cfg.use_facts,
            facts_priority=cfg.facts_priority, unknown_steps=cfg.unknown_steps, schema=schema)
        labelling["generations_total"] = sampler.generations
        del policy, sampler
        dataset_path = save_prm_rows(rows, out / "prm_dataset.jsonl")
    timings["labelling"] = round(time.time() - t, 2)
    if not rows:
        raise UserError(f"no labelled rows to train on (labelling statistics: {labelling}); "
                        "a weak policy writes no parseable steps -- try add_reference_traces: true")
    train_rows, eval_rows = split_rows_by_group(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows:
        raise UserError("every row was held out for evaluation: lower eval_fraction or label more records")

    torch.manual_seed(cfg.seed)
    judge = load_judge_for_training(cfg)
    judge.progress = progress
    metrics: dict[str, Any] = {"labelling": labelling, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                               "verdict_words": [judge.fmt.good, judge.fmt.bad]}
    if cfg.eval_before and eval_rows:
        t = time.time()
        metrics["before"] = evaluate_judge(judge, eval_rows)
        timings["eval_before"] = round(time.time() - t, 2)
    t = time.time()
    history = train_judge(judge, train_rows, output_dir=out, epochs=cfg.epochs, max_steps=cfg.max_steps,
                          learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                          warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, bf16=cfg.bf16, seed=cfg.seed,
                          logging_steps=cfg.logging_steps, progress=progress)
    timings["training"] = round(time.time() - t, 2)
    if eval_rows:
        t = time.time()
        metrics["after"] = evaluate_judge(judge, eval_rows)
        timings["eval_after"] = round(time.time() - t, 2)
    judge_dir = judge.save_pretrained(out / "judge", extra={"label_mode": cfg.label_mode, "base_model": cfg.judge_model,
                                                            "policy": cfg.policy, "train_rows": len(train_rows)})
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    metrics["timings"] = timings
    metrics["final_train_loss"] = history[-1]["loss"] if history else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return {**metrics, "judge_dir": str(judge_dir), "dataset": str(dataset_path),
            "metrics_file": str(out / "metrics.json")}


__all__ = [
    "PolicySampler",
    "batch_verdict_loss",
    "build_prm_dataset",
    "check_prm_row",
    "decided_at",
    "encode_rows",
    "evaluate_judge",
    "fact_labels",
    "finalize_label",
    "load_prm_rows",
    "mc_needed",
    "mc_shares",
    "mean_verdict_loss",
    "merge_step_labels",
    "roc_auc",
    "run_prm_job",
    "save_prm_rows",
    "split_rows_by_group",
    "step_prefixes",
    "train_judge",
]
