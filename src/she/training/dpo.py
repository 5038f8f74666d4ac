"""``she train dpo``: the offline preference baseline, a thin adapter over TRL's ``DPOTrainer``.

Data: pass@N rollouts of the SFT policy, turned into (chosen = right label, rejected = wrong label) pairs
(:mod:`she.training.pairs`). The prompt is the policy's own chat prompt -- the same
:func:`she.reasoning.prompts.build_messages` call SFT and GRPO use, in the prompt style saved with the
policy -- so DPO trains on exactly the context the model sees at inference.

The policy is also DPO's frozen reference (TRL loads a second copy from the same folder), which is the
standard setup and the one that matches GRPO's "start from SFT, stay near it" (there via ``beta``/clipping).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from she.config import DPOJobConfig, to_dict
from she.data.schema import Record

log = logging.getLogger(__name__)


def build_dpo_config(cfg: DPOJobConfig, output_dir: str | Path):
    """A TRL ``DPOConfig`` from the job config: CPU when there is no CUDA, bf16 only where supported
    (mirrors :func:`she.training.sft.train_sft`)."""
    import torch
    from trl import DPOConfig

    from she.training.sft import use_cpu

    cpu = use_cpu()
    bf16 = cfg.bf16 and (cpu or torch.cuda.is_bf16_supported())
    return DPOConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        bf16=bf16,
        use_cpu=cpu,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to in ("none", "") else [cfg.report_to],
        dataloader_num_workers=0,
    )


def run_dpo_job(cfg: DPOJobConfig, train_records: list[Record], *, progress: bool = True) -> Path:
    """Sample (or reuse) pass@N rollouts, build pairs, run DPO, save ``<output_dir>/final``; returns it.

    Also writes ``she_config.json``, ``pairs_stats.json`` (pass@1/pass@N, pair counts, generations) and
    ``log_history.json`` in ``output_dir``. Resumes from the last checkpoint (``resume: true``), and the
    rollout cache makes a restarted job skip sampling already done.
    """
    from datasets import Dataset
    from trl import DPOTrainer

    from she.models.registry import load_model_and_tokenizer, resolve_model
    from she.training.pairs import build_pairs_for_job, preference_rows
    from she.training.sft import last_checkpoint, save_she_meta

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "she_config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    cache = cfg.rollouts.cache_file or out / "rollouts.jsonl"
    pairs, stats, style = build_pairs_for_job(cfg.model, train_records, cfg.rollouts, cache,
                                              prompt_style=cfg.prompt_style, bf16=cfg.bf16, progress=progress)
    (out / "pairs_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("DPO on %d pairs from %d prompts (pass@1 %.3f)", stats["pairs"], stats["prompts"], stats["pass@1"])
    records_by_id = {r.id: r for r in train_records}
    train_ds = Dataset.from_list(preference_rows(pairs, records_by_id, style))

    from she.training.checkpoints import ManifestCallback

    model, tok = load_model_and_tokenizer(resolve_model(cfg.model), for_training=True)
    trainer = DPOTrainer(model=model, args=build_dpo_config(cfg, out), train_dataset=train_ds, processing_class=tok,
                         callbacks=[ManifestCallback()])
    resume = last_checkpoint(out) if cfg.resume else None
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    tok.padding_side = "left"  # the saved tokenizer is for generation
    trainer.save_model(str(final))  # every rank (sharded setups gather); rank 0 writes weights + tokenizer
    if trainer.accelerator.is_main_process:
        save_she_meta(final, {"prompt_style": style, "target": "reasoning", "taxonomy": cfg.data.taxonomy,
                              "trained_by": "dpo"})
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.accelerator.wait_for_everyone()
    return final


__all__ = ["build_dpo_config", "run_dpo_job"]
