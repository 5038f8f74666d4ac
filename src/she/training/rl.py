"""``she train srpo`` / ``she train grpo``: build the examiner, the prompt dataset and run :class:`SRPOTrainer`."""

from __future__ import annotations

import json
from pathlib import Path

from she.config import RLJobConfig, to_dict
from she.data.schema import Record


def build_examiner(cfg: RLJobConfig):
    from she.rewards.hybrid import HybridExaminer, VerifierExaminer

    if cfg.examiner == "verifier":
        return VerifierExaminer()
    if cfg.examiner in ("hybrid", "blend"):
        if not cfg.judge:
            raise ValueError(f"examiner {cfg.examiner!r} needs a judge folder (`judge:` from `she train prm`)")
        from she.rewards.judge import StepJudge

        judge = StepJudge.from_pretrained(cfg.judge)
        mode = "verifier_first" if cfg.examiner == "hybrid" else "blend"
        return HybridExaminer(VerifierExaminer(), judge, mode=mode, weight=cfg.judge_weight)
    raise ValueError(f"unknown examiner {cfg.examiner!r}; use verifier, hybrid or blend")


def run_rl_job(cfg: RLJobConfig, train: list[Record]) -> Path:
    from she.models.registry import load_model_and_tokenizer
    from she.training.sft import last_checkpoint, save_she_meta
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "she_config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    model, tok = load_model_and_tokenizer(cfg.model)
    tok.padding_side = "left"
    args = build_grpo_config(
        out, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.num_generations * cfg.prompts_per_step,
        max_completion_length=cfg.max_completion_length, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, beta=cfg.beta, temperature=cfg.temperature, bf16=cfg.bf16, seed=cfg.seed,
        logging_steps=cfg.logging_steps, report_to=cfg.report_to, save_strategy="steps",
        save_steps=cfg.save_steps,
    )
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=make_prompt_dataset(train, cfg.prompt_style),
        processing_class=tok, records_by_id={r.id: r for r in train}, examiner=build_examiner(cfg),
        step_rewards=cfg.step_rewards, alpha=cfg.alpha, credit_mode=cfg.credit_mode, critical=cfg.critical,
        taxonomy=cfg.data.taxonomy, partial_credit=cfg.partial_credit, format_weight=cfg.format_weight,
    )
    resume = last_checkpoint(out) if cfg.resume else None
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    trainer.model.save_pretrained(final)
    tok.save_pretrained(final)
    save_she_meta(final, {"prompt_style": cfg.prompt_style, "target": "reasoning", "taxonomy": cfg.data.taxonomy})
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    return final
