"""``she eval`` and ``she predict``: generate judgements, score them, write metrics, a report and plots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.data.validation import atomic_write_lines
from she.errors import UserError
from she.evaluation.generate import Judgement, generate_judgements
from she.models.metadata import label_offsets_of, model_step_schema, offsets_key, prompt_style_of
from she.reasoning.schema import StepSchema


def judgement_json(j: Judgement, record: Record | None = None) -> dict:
    d = {"id": j.record_id, "label": j.label, "probs": j.probs, "format_ok": j.format_ok, "reasoning": j.text}
    if j.raw_label != j.label and j.raw_label is not None:
        d["raw_label"] = j.raw_label  # the generated label, before the model's calibration offsets
    if j.step_probs is not None:
        d["step_probs"] = j.step_probs  # evidence: marginal -- the marginalised step's value probabilities
    if record is not None and record.label is not None:
        d["gold"] = record.label
    return d


def score(records: list[Record], judgements: list[Judgement], taxonomy: str) -> dict:
    """Metrics of judgements against gold labels (pure given the judgements)."""
    from she.evaluation.metrics import classification_report, step_accuracy
    from she.rewards.verifier import verify_steps

    labels = list(get_taxonomy(taxonomy).labels)
    y_true = [r.label for r in records]
    y_pred = [j.label for j in judgements]
    m = classification_report(y_true, y_pred, labels)
    if any(j.raw_label is not None and j.raw_label != j.label for j in judgements):
        raw = classification_report(y_true, [j.raw_label for j in judgements], labels)
        m["uncalibrated"] = {k: raw[k] for k in ("macro_f1", "accuracy", "per_class", "confusion")}
    m["format_valid_rate"] = sum(j.format_ok for j in judgements) / max(1, len(judgements))
    verdicts = []
    for r, j in zip(records, judgements):
        if r.facts.is_empty():
            continue
        # the Verdict step is the label itself, already scored above; step accuracy is about reasoning
        verdicts.append([v.verdict for v in verify_steps(j.parsed, r) if v.step != "Verdict"])
    if verdicts:
        m["step_accuracy"] = step_accuracy(verdicts)
    checks = step_checks(records, judgements)
    if checks:
        m["step_checks"] = checks
    return m


def step_checks(records: list[Record], judgements: list[Judgement]) -> dict[str, dict]:
    """Per step key, how many of the generated steps the verifier could check were correct -- on *every*
    record, including those without step facts, where the checks come from the gold label (Type/Attributes,
    docs/srpo.md) or from the strings themselves (the coverage schema's ``Missing``). The Verdict is left out
    (it is the label, scored above). ``{key: {"correct", "incorrect", "accuracy"}}``; keys never checked are absent."""
    from she.rewards.verifier import verify_steps

    out: dict[str, dict] = {}
    for r, j in zip(records, judgements):
        if getattr(j, "parsed", None) is None or r.label is None:
            continue
        for v in verify_steps(j.parsed, r):
            if v.step == "Verdict" or v.verdict not in ("correct", "incorrect"):
                continue
            c = out.setdefault(v.step, {"correct": 0, "incorrect": 0})
            c[v.verdict] += 1
    for c in out.values():
        c["accuracy"] = c["correct"] / (c["correct"] + c["incorrect"])
    return out


def judge_records(model, tokenizer, records: list[Record], *, evidence: str = "generated", taxonomy: str = "hd3",
                  batch_size: int = 16, max_new_tokens: int = 96, bf16: bool = True, progress: bool = True,
                  prompt_style: str = "full", label_offsets: dict[str, float] | None = None,
                  schema: StepSchema | None = None) -> list[Judgement]:
    """Judgements of ``records`` with the steps ``generated`` by the model (:func:`generate_judgements`),
    ``computed`` from the pair and forced (:func:`she.evaluation.fast.computed_evidence_judgements`), or generated
    with the verdict ``marginal``-ised over the last step's values (:func:`she.evaluation.fast.marginal_judgements`)."""
    offsets_key(evidence)  # a clear error for an unknown mode
    if evidence == "marginal":
        from she.evaluation.fast import marginal_judgements

        return marginal_judgements(model, tokenizer, records, taxonomy=taxonomy, prompt_style=prompt_style,
                                   schema=schema, batch_size=batch_size, max_new_tokens=max_new_tokens, bf16=bf16,
                                   progress=progress, label_offsets=label_offsets)
    if evidence == "computed":
        from she.evaluation.fast import computed_evidence_judgements

        return computed_evidence_judgements(model, tokenizer, records, taxonomy=taxonomy, prompt_style=prompt_style,
                                            schema=schema, batch_size=batch_size, bf16=bf16,
                                            label_offsets=label_offsets)
    return generate_judgements(model, tokenizer, records, taxonomy=taxonomy, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, bf16=bf16, progress=progress, prompt_style=prompt_style,
                               label_offsets=label_offsets, schema=schema)


def evaluate(
    model_path: str,
    records: list[Record],
    out_dir: str | os.PathLike,
    *,
    taxonomy: str = "hd3",
    batch_size: int = 16,
    max_new_tokens: int = 96,
    bf16: bool = True,
    title: str = "Evaluation",
    progress: bool = True,
    calibrated: bool = True,
    schema: StepSchema | None = None,
    evidence: str = "generated",
) -> dict:
    """Generate, score and report. ``calibrated``: apply the model's ``label_offsets`` (she.json, from
    ``she calibrate``) when it has them; the uncalibrated scores are then reported too. ``schema``: the step
    schema the model writes; None = its own (``she.json``, :func:`~she.models.metadata.model_step_schema`).
    ``evidence``: ``generated`` (the model writes its steps) or ``computed`` (:func:`judge_records`), whose
    offsets are fitted separately (``she calibrate --evidence computed``)."""
    from she.evaluation.report import write_report
    from she.models.registry import load_model_and_tokenizer

    missing = [r.id for r in records if r.label is None]
    if missing:
        raise UserError(f"{len(missing)} record(s) have no label (first: {missing[0]}); use `she predict` instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = schema or model_step_schema(model_path, taxonomy)
    model, tok = load_model_and_tokenizer(model_path)
    style = prompt_style_of(model_path)
    offsets = label_offsets_of(model_path, evidence) if calibrated else None
    t0 = time.time()
    judgements = judge_records(model, tok, records, evidence=evidence, taxonomy=taxonomy, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, bf16=bf16, progress=progress, prompt_style=style,
                               label_offsets=offsets, schema=schema)
    elapsed = time.time() - t0
    m = score(records, judgements, taxonomy)
    n_tokens = sum(j.n_new_tokens for j in judgements)
    m["generation"] = {"seconds": elapsed, "new_tokens": n_tokens, "tokens_per_s": n_tokens / max(elapsed, 1e-9),
                       "pairs_per_s": len(records) / max(elapsed, 1e-9)}
    m["model"] = str(model_path)
    m["evidence"] = evidence
    atomic_write_lines(out / "metrics.json", [json.dumps(m, indent=2)])
    atomic_write_lines(out / "predictions.jsonl",
                       (json.dumps(judgement_json(j, r), ensure_ascii=False) + "\n" for r, j in zip(records, judgements)))
    write_report(m, out, labels=list(get_taxonomy(taxonomy).labels), title=title, examples=list(zip(records, judgements))[:5])
    return m


def calibrate(model_path: str, records: list[Record], *, taxonomy: str = "hd3", batch_size: int = 32,
              max_new_tokens: int = 96, bf16: bool = True, progress: bool = True,
              schema: StepSchema | None = None, evidence: str = "generated", method: str = "grid") -> dict:
    """Fit per-class verdict offsets on ``records`` (a validation split: never the test pairs) and write them
    into the model's ``she.json`` (``label_offsets``; ``label_offsets_computed`` for ``evidence="computed"``) and
    ``calibration.json`` (``calibration_computed.json``), the pairs' verdict probabilities beside them
    (``calibration_predictions.jsonl``, ``calibration_computed_predictions.jsonl``) so another fit needs no new
    read. Returns the report: offsets, method, Macro F1 and predicted-class shares before and after, on these pairs.
    ``method`` as in :func:`she.evaluation.calibration.fit_label_offsets` (``bagged`` resamples whole queries);
    ``schema`` and ``evidence`` as in :func:`evaluate`."""
    from she.evaluation.calibration import apply_offsets, fit_label_offsets
    from she.evaluation.metrics import classification_report
    from she.models.metadata import load_she_meta
    from she.models.registry import load_model_and_tokenizer, resolve_model

    missing = [r.id for r in records if r.label is None]
    if missing or not records:
        raise UserError(f"calibration needs labelled pairs ({len(missing)} unlabelled, {len(records)} given)")
    folder = Path(resolve_model(model_path))
    schema = schema or model_step_schema(model_path, taxonomy)
    model, tok = load_model_and_tokenizer(model_path)
    key = offsets_key(evidence)
    js = judge_records(model, tok, records, evidence=evidence, taxonomy=taxonomy, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, bf16=bf16, progress=progress,
                       prompt_style=prompt_style_of(model_path), schema=schema)
    labels = list(get_taxonomy(taxonomy).labels)
    gold = [r.label for r in records]
    raw = [j.raw_label for j in js]
    offsets = fit_label_offsets([j.probs for j in js], raw, gold, labels, method=method,
                                groups=[r.query for r in records])
    cal = [apply_offsets(j.probs, j.raw_label, offsets) for j in js]

    def summary(pred):
        m = classification_report(gold, pred, labels)
        return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
                "pred_share": {lab: sum(p == lab for p in pred) / len(pred) for lab in labels}}

    report = {"label_offsets": offsets, "method": method, "evidence": evidence, "n": len(records),
              "with_probs": sum(j.probs is not None for j in js), "before": summary(raw), "after": summary(cal)}
    meta = load_she_meta(folder)
    meta[key] = offsets
    atomic_write_lines(folder / "she.json", [json.dumps(meta, indent=2)])
    name = "calibration" if evidence == "generated" else f"calibration_{evidence}"
    atomic_write_lines(folder / f"{name}_predictions.jsonl",
                       (json.dumps({"id": r.id, "gold": r.label, "raw_label": j.raw_label, "probs": j.probs}) + "\n"
                        for r, j in zip(records, js)))
    atomic_write_lines(folder / f"{name}.json", [json.dumps(report, indent=2)])
    return report


def predict(model_path: str, records: list[Record], out_file: str | os.PathLike, *, taxonomy: str = "hd3",
            batch_size: int = 16, max_new_tokens: int = 96, bf16: bool = True, progress: bool = True,
            fast: bool = False, schema: StepSchema | None = None, evidence: str = "generated") -> int:
    """Write one JSON line per pair. Streams in chunks so huge inputs never sit in memory as judgements.

    ``fast=True`` scores the label in one forward pass without writing reasoning
    (:class:`she.evaluation.fast.FastScorer`, the service's fast mode too; exact for label-target models, an
    approximation for reasoning models); ``reasoning`` is then empty. ``schema`` and ``evidence`` as in
    :func:`evaluate` (``computed``: ``reasoning`` holds the computed steps; not with ``fast``)."""
    from she.models.registry import load_model_and_tokenizer

    schema = schema or model_step_schema(model_path, taxonomy)
    model, tok = load_model_and_tokenizer(model_path)
    style = prompt_style_of(model_path)
    if fast and evidence != "generated":
        raise UserError("fast mode reads the label without steps; evidence: computed forces the computed ones -- "
                        "pick one")
    offsets = label_offsets_of(model_path, evidence)
    scorer = None
    if fast:
        from she.evaluation.fast import FastScorer

        scorer = FastScorer(model, tok, taxonomy=taxonomy, prompt_style=style, schema=schema, batch_size=batch_size,
                            bf16=bf16)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    chunk = max(batch_size * 8, 64)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for start in range(0, len(records), chunk):
                part = records[start : start + chunk]
                if scorer is not None:
                    judged = scorer.score(part)
                else:
                    judged = judge_records(model, tok, part, evidence=evidence, taxonomy=taxonomy,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens, bf16=bf16,
                                           progress=progress, prompt_style=style, label_offsets=offsets, schema=schema)
                for r, j in zip(part, judged):
                    f.write(json.dumps(judgement_json(j, r), ensure_ascii=False) + "\n")
                    n += 1
        os.replace(tmp, out)
    except BaseException:  # a failure (or Ctrl-C) midway must not leave a half-written .tmp behind
        tmp.unlink(missing_ok=True)
        raise
    return n
