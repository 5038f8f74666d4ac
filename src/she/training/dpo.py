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

from she.config import DPOJobConfig
from she.data.schema import Record
from she.models.metadata import schema_of
from she.reasoning.schema import resolve_schema

log = logging.getLogger(__name__)


def build_dpo_config(cfg: DPOJobConfig, output_dir: str | Path):
    """A TRL ``DPOConfig`` from the job config: CPU when there is no CUDA, bf16 only where supported
    (mirrors :func:`she.training.sft.train_sft`)."""
    from trl import DPOConfig

    from she.training.trainer_setup import common_training_args

    return DPOConfig(
        **common_training_args(cfg, output_dir),
        warmup_steps=cfg.warmup_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
    )


def run_dpo_job(cfg: DPOJobConfig, train_records: list[Record], *, progress: bool = True) -> Path:
    """Sample (or reuse) pass@N rollouts, build pairs, run DPO, save ``<output_dir>/final``; returns it.

    Prompts, rollouts and the saved ``she.json`` follow the policy's step schema (``cfg.model``'s she.json).

    Also writes ``she_config.json``, ``pairs_stats.json`` (pass@1/pass@N, pair counts, generations) and
    ``log_history.json`` in ``output_dir``. Resumes from the last checkpoint (``resume: true``), and the
    rollout cache makes a restarted job skip sampling already done.
    """
    from datasets import Dataset
    from trl import DPOTrainer

    from she.models.registry import load_model_and_tokenizer, resolve_model
    from she.training.pairs import build_pairs_for_job, preference_rows
    from she.training.lm_head import labelled_positions_only, resolve_labelled_positions
    from she.training.trainer_setup import save_final, train_resuming, write_job_config

    labelled_only = resolve_labelled_positions()  # a bad SHE_LM_HEAD_POSITIONS fails before any sampling
    spec = schema_of(cfg.model)
    schema = resolve_schema(spec, cfg.data.taxonomy)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_job_config(out, cfg)
    cache = cfg.rollouts.cache_file or out / "rollouts.jsonl"
    pairs, stats, style = build_pairs_for_job(cfg.model, train_records, cfg.rollouts, cache,
                                              prompt_style=cfg.prompt_style, bf16=cfg.bf16, progress=progress,
                                              schema=schema)
    (out / "pairs_stats.json").write_text(json.dumps(stats, indent=2))
    log.info("DPO on %d pairs from %d prompts (pass@1 %.3f)", stats["pairs"], stats["prompts"], stats["pass@1"])
    records_by_id = {r.id: r for r in train_records}
    train_ds = Dataset.from_list(preference_rows(pairs, records_by_id, style, schema))

    from she.training.checkpoints import ManifestCallback

    model, tok = load_model_and_tokenizer(resolve_model(cfg.model), for_training=True)
    trainer = DPOTrainer(model=model, args=build_dpo_config(cfg, out), train_dataset=train_ds, processing_class=tok,
                         callbacks=[ManifestCallback()])
    with labelled_positions_only(labelled_only):  # the fused LM head on the completion positions only (lm_head.py)
        train_resuming(trainer, out, cfg.resume, log)
    tok.padding_side = "left"  # the saved tokenizer is for generation
    return save_final(trainer, out, {"prompt_style": style, "target": "reasoning", "taxonomy": cfg.data.taxonomy,
                                     "trained_by": "dpo", "schema": spec})


__all__ = ["build_dpo_config", "run_dpo_job"]
