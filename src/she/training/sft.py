"""SFT warm start: a thin adapter over TRL's ``SFTTrainer``.

Each record becomes a conversational prompt-completion example: the prompt is the policy's chat
prompt (:func:`she.reasoning.prompts.build_messages`), the completion is a reasoning trace from the
rule-based rationale writer (or a teacher, or ``Verdict: <label>`` alone for the label-only baseline).
TRL then computes the loss on completion tokens only.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from she.config import SFTJobConfig
from she.data.schema import Record
from she.errors import UserError
from she.reasoning.schema import StepSchema, resolve_schema, schema_for

log = logging.getLogger(__name__)


def completion_text(record: Record, target: str = "reasoning", schema: StepSchema | None = None) -> str:
    """The SFT target of ``record``: its rule-based rationale in ``schema`` (None = the built-in schema), or
    ``Verdict: <label>`` for the label-only baseline."""
    from she.reasoning.rationale import write_rationale

    if record.label is None:
        raise UserError(f"record {record.id} has no label: SFT needs labelled data")
    if target == "reasoning":
        return write_rationale(record, schema_for(schema, record.taxonomy))
    if target == "label":
        return f"Verdict: {record.label}"
    raise UserError(f"unknown SFT target {target!r}; use 'reasoning' or 'label'")


def build_sft_dataset(records: list[Record], target: str = "reasoning", traces: dict[str, str] | None = None,
                      prompt_style: str = "compact", schema: StepSchema | None = None):
    """Conversational prompt-completion dataset. ``traces`` (record id -> text) overrides the rule writer,
    e.g. with accepted teacher traces. Prompts and rationales follow ``schema`` (None = the built-in one)."""
    from datasets import Dataset

    from she.reasoning.prompts import build_messages

    rows = []
    for r in records:
        text = traces[r.id] if traces and r.id in traces else completion_text(r, target, schema)
        rows.append({"prompt": build_messages(r, style=prompt_style, schema=schema_for(schema, r.taxonomy)),
                     "completion": [{"role": "assistant", "content": text}]})
    return Dataset.from_list(rows)


def relabel_by_rating(records: list[Record], mix: float, seed: int) -> tuple[list[Record], int]:
    """``records`` with each rated pair's label drawn from :func:`she.data.labels.rated_targets` (``sft.rating_targets``),
    and how many labels the draw changed. A pair without a rating, or of a taxonomy without a rating scale, keeps its
    label; ``mix`` 0 returns the records as they are. The draw is fixed by ``seed`` and the record ids (not their
    order), so a resumed run trains on the same labels."""
    import dataclasses
    import random

    from she.data.labels import rated_targets

    if mix == 0.0:
        return list(records), 0
    out, changed = [], 0
    for r in records:
        targets = None if r.score is None or r.label is None else rated_targets(r.label, r.score, r.taxonomy, mix)
        if targets is None:
            out.append(r)
            continue
        labels = list(targets)
        drawn = random.Random(f"{seed}:{r.id}").choices(labels, weights=[targets[lab] for lab in labels])[0]
        changed += drawn != r.label
        out.append(r if drawn == r.label else dataclasses.replace(r, label=drawn))
    return out, changed


def load_traces(path: str | os.PathLike) -> dict[str, str]:
    """Teacher traces ``{"id", "trace"}`` per line; records without one fall back to the rule writer."""
    from she.data.validation import iter_jsonl

    out: dict[str, str] = {}
    for n, d in iter_jsonl(path):
        if not isinstance(d, dict) or "id" not in d or "trace" not in d:
            raise UserError(f"{path}:{n}: expected a JSON object with 'id' and 'trace'")
        out[str(d["id"])] = str(d["trace"])
    return out


def count_tokens(records: list[Record], tokenizer, target: str = "reasoning", prompt_style: str = "compact",
                 schema: StepSchema | None = None) -> dict:
    """Tokens per training example (prompt + completion), for throughput figures."""
    from she.reasoning.prompts import build_messages

    total = completion = 0
    for r in records:
        text = completion_text(r, target, schema)
        msgs = build_messages(r, style=prompt_style, schema=schema_for(schema, r.taxonomy)) + [
            {"role": "assistant", "content": text}]
        total += len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])
        completion += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = max(1, len(records))
    return {"examples": len(records), "tokens": total, "mean_tokens": total / n, "mean_completion_tokens": completion / n}


def _verdict_sft_trainer():
    """``SFTTrainer`` that logs the verdict token's loss and accuracy and can weight it (she.algorithms.sft_loss).

    TRL's loss is ``-sum(outputs.log_probs) / N`` over the fused LM head's per-token log-probabilities; a forward
    hook multiplies those by the token weights before TRL reduces them, so the forward pass, the normalisation and
    TRL's own metrics stay TRL's (tests/test_trl_contract.py pins that line). Defined in a function so that TRL
    is imported only when SFT runs."""
    from trl import SFTTrainer

    from she.algorithms.sft_loss import last_label_token_mask, verdict_token_weights
    from she.training.lm_head import labelled_positions_only, resolve_labelled_positions

    class VerdictSFTTrainer(SFTTrainer):
        def __init__(self, *args, verdict_ids: list[int], verdict_weight: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            # TRL's fused head on the completion positions only (lm_head.py), unless compiled: the labelled count
            # changes every batch, and a compiled graph wants shapes that do not depend on the data
            self.labelled_only = resolve_labelled_positions(False if self.args.torch_compile else None)
            self.verdict_ids = list(verdict_ids)
            self.verdict_weight = float(verdict_weight)
            self._built_at = time.perf_counter()

        def log(self, logs, start_time=None):
            # seconds since the trainer was built, on each training log: the steady-state throughput after a
            # compile or a warm-up is a difference of two entries (scripts/bench_sft.py --marginal-from)
            if "loss" in logs:
                logs["wall_s"] = round(time.perf_counter() - self._built_at, 3)
            super().log(logs, start_time)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is None or labels.dim() != 2 or "attention_mask" not in inputs:  # padding-free: not ours
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            target = labels[:, 1:]  # the fused head scores position t against the token at t + 1
            mask = last_label_token_mask(target, self.verdict_ids)
            weights = verdict_token_weights(target, self.verdict_ids, self.verdict_weight) \
                if self.verdict_weight != 1.0 else None
            seen: dict = {}

            def hook(module, args, kwargs, output):
                if not kwargs.get("fused_lm_head") or output.log_probs is None:
                    return None
                seen["log_probs"], seen["is_top1"] = output.log_probs.detach(), output.is_top1
                if weights is not None:
                    output.log_probs = output.log_probs * weights.to(output.log_probs.device, output.log_probs.dtype)
                return output

            handle = model.register_forward_hook(hook, with_kwargs=True)
            try:
                with labelled_positions_only(self.labelled_only):
                    loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            if "log_probs" in seen:
                mode = "train" if self.model.training else "eval"
                gather = self.accelerator.gather_for_metrics
                n = gather(mask.sum()).sum()
                if n > 0:
                    nll = gather(-(seen["log_probs"] * mask).sum()).sum()
                    self._metrics[mode]["verdict_nll"].append((nll / n).item())
                    if seen["is_top1"] is not None:
                        top1 = gather((seen["is_top1"].bool() & mask).sum()).sum()
                        self._metrics[mode]["verdict_accuracy"].append((top1 / n).item())
            return loss

    return VerdictSFTTrainer


def train_sft(cfg: SFTJobConfig, train: list[Record], validation: list[Record] | None = None) -> Path:
    """Train and save the final model to ``cfg.output_dir/final``; returns that folder.

    The traces, prompts and ``she.json`` follow ``cfg.schema`` (the step schema variant)."""
    from trl import SFTConfig

    from she.models.registry import load_model_and_tokenizer
    from she.training.trainer_setup import common_training_args, save_final, train_resuming, write_job_config

    schema = resolve_schema(cfg.schema, cfg.data.taxonomy)  # a bad schema fails before the model loads
    if cfg.verdict_weight < 0:
        raise UserError(f"sft.verdict_weight must be >= 0, got {cfg.verdict_weight}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= cfg.rating_targets < 1.0:
        raise UserError(f"sft.rating_targets (the mix) must be in [0, 1), got {cfg.rating_targets}")
    traces = load_traces(cfg.traces_file) if cfg.traces_file else None
    if cfg.rating_targets:
        from she.data.labels import check_rating_scale

        check_rating_scale(train, "sft.rating_targets")
        if traces is not None:
            raise UserError("sft.rating_targets redraws the labels the rule-based traces are written from; a "
                            "traces_file's texts would keep theirs: use one or the other")
        train, changed = relabel_by_rating(train, cfg.rating_targets, cfg.seed)
        log.info("rating_targets %.2f: %d of %d training labels drawn away from the gold label", cfg.rating_targets,
                 changed, len(train))
    model, tok = load_model_and_tokenizer(cfg.model, for_training=True)
    train_ds = build_sft_dataset(train, cfg.target, traces=traces, prompt_style=cfg.prompt_style, schema=schema)
    eval_ds = build_sft_dataset(validation, cfg.target, prompt_style=cfg.prompt_style, schema=schema) \
        if validation else None
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
            target_modules="all-linear",
        )
    args = SFTConfig(
        **common_training_args(cfg, out),
        warmup_steps=cfg.warmup_ratio,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        weight_decay=cfg.weight_decay,
        eval_strategy="epoch" if eval_ds is not None else "no",
        completion_only_loss=True,
        train_sampling_strategy=cfg.train_sampling_strategy,
        torch_compile=cfg.torch_compile,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )
    write_job_config(out, cfg, args.process_index)  # under `accelerate launch` only rank 0 writes run files
    from she.training.checkpoints import ManifestCallback

    VerdictSFTTrainer = _verdict_sft_trainer()
    from she.evaluation.fast import fast_prefix, prefix_label_tokens

    verdict_ids, _ = prefix_label_tokens(tok, fast_prefix(cfg.data.taxonomy, schema), list(schema.labels))
    trainer = VerdictSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                processing_class=tok, peft_config=peft_config, callbacks=[ManifestCallback()],
                                verdict_ids=verdict_ids, verdict_weight=cfg.verdict_weight)
    train_resuming(trainer, out, cfg.resume, log)
    tok.padding_side = "left"
    if cfg.lora and trainer.accelerator.is_main_process:
        # merging is local and in place: rank 0 merges its (DDP-identical) copy
        final = out / "final"
        trainer.model.merge_and_unload().save_pretrained(final)  # an ordinary folder, not an adapter
        tok.save_pretrained(final)
    # without LoRA every rank saves (FSDP/ZeRO-3 gather); no rank returns before final/ is complete
    return save_final(trainer, out, {"prompt_style": cfg.prompt_style, "target": cfg.target,
                                     "taxonomy": cfg.data.taxonomy, "schema": cfg.schema}, save_model=not cfg.lora)
