"""``she train srpo`` / ``she train grpo``: build the examiner, the prompt dataset and run :class:`SRPOTrainer`."""

from __future__ import annotations

import json
from pathlib import Path

from she.config import RLJobConfig, to_dict
from she.data.schema import Record
from she.reasoning.schema import in_schema
from she.training.sft import schema_of


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


def _live(examiner, cfg: RLJobConfig):
    """With a fact store, the examiner reads it at every step (facts annotated while the job runs count at
    once; she.rewards.live_facts, docs/annotation.md)."""
    from she.rewards.live_facts import live_facts_examiner

    return live_facts_examiner(examiner, cfg.facts_store)


def build_reward_model_kwargs(cfg: RLJobConfig) -> dict:
    """``{"reward_model": ScalarRewardModel}`` when ``cfg.reward_model`` is set (scalar-RM GRPO), else ``{}``:
    without one the trainer is built exactly as before."""
    if not cfg.reward_model:
        return {}
    from she.training.reward_model import ScalarRewardModel

    return {"reward_model": ScalarRewardModel.from_pretrained(cfg.reward_model)}


def with_store_facts(cfg: RLJobConfig, records: list[Record]) -> list[Record]:
    """``records`` with the facts of ``cfg.facts_store`` attached (unchanged when none is set), so the
    verifier examiner can grade steps the data set itself has no facts for. Run before any model is
    loaded: a bad store path fails the job at once."""
    from she.data.factstore import attach_from_path

    return attach_from_path(records, cfg.facts_store)


def rollout_settings(cfg: RLJobConfig) -> dict:
    """The job's rollout-engine settings as :func:`build_grpo_config` keywords (TRL's ``GRPOConfig`` names).

    Layout-invariant sampling hooks ``model.generate``, which vLLM never calls: the two cannot be combined.
    """
    if cfg.use_vllm and cfg.layout_invariant_sampling:
        raise ValueError("layout_invariant_sampling works with transformers generation only; turn off use_vllm")
    return {"use_vllm": cfg.use_vllm, "vllm_mode": cfg.vllm_mode,
            "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            "vllm_server_base_url": cfg.vllm_server_base_url}


def trainer_rollout_kwargs(cfg: RLJobConfig) -> dict:
    """Extra :class:`SRPOTrainer` keywords: a custom ``rollout_func`` ("module:function") and the advantage dump
    folder, each only when set (otherwise the trainer is built exactly as before)."""
    from she.training.distributed import import_object

    out: dict = {}
    if cfg.rollout_func:
        out["rollout_func"] = import_object(cfg.rollout_func)
    if cfg.dump_advantages:
        out["dump_advantages_dir"] = cfg.dump_advantages
    return out


@in_schema(lambda cfg, *a, **k: schema_of(cfg.model))
def run_rl_job(cfg: RLJobConfig, train: list[Record], callbacks: list | None = None) -> Path:
    """``callbacks``: extra ``TrainerCallback``s (the curriculum's plateau stop, see she.sampling.curriculum).

    Rollouts are parsed and examined with the policy's own step schema (``she.json``)."""
    from she.models.registry import load_model_and_tokenizer
    from she.training.checkpoints import ManifestCallback
    from she.training.sft import last_checkpoint, save_she_meta
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    train = with_store_facts(cfg, train)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The GRPOConfig comes first: it checks the vLLM settings (before a model is loaded) and sets up the
    # process group under `accelerate launch`, so that rank-0-only writes below know their rank.
    args = build_grpo_config(
        out, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.per_device_batch_size or cfg.num_generations * cfg.prompts_per_step,
        max_completion_length=cfg.max_completion_length, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, beta=cfg.beta, temperature=cfg.temperature, bf16=cfg.bf16, seed=cfg.seed,
        logging_steps=cfg.logging_steps, report_to=cfg.report_to, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, **rollout_settings(cfg),
    )
    if args.process_index == 0:
        (out / "she_config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    model, tok = load_model_and_tokenizer(cfg.model)
    tok.padding_side = "left"
    if cfg.layout_invariant_sampling:
        from she.training.distributed import install_layout_invariant_sampling

        install_layout_invariant_sampling(model, seed=cfg.seed)
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=make_prompt_dataset(train, cfg.prompt_style),
        processing_class=tok, records_by_id={r.id: r for r in train}, examiner=_live(build_examiner(cfg), cfg),
        step_rewards=cfg.step_rewards, alpha=cfg.alpha, credit_mode=cfg.credit_mode, critical=cfg.critical,
        taxonomy=cfg.data.taxonomy, partial_credit=cfg.partial_credit, format_weight=cfg.format_weight,
        callbacks=[ManifestCallback(), *(callbacks or [])], max_bad_steps=cfg.max_bad_steps,
        **build_reward_model_kwargs(cfg), **trainer_rollout_kwargs(cfg),
    )
    resume = last_checkpoint(out) if cfg.resume else None
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    # save_model on every rank (FSDP/ZeRO-3 gather the full weights collectively); it writes on rank 0 only,
    # with the tokenizer (trainer.processing_class is `tok`, left padding)
    trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        save_she_meta(final, {"prompt_style": cfg.prompt_style, "target": "reasoning", "taxonomy": cfg.data.taxonomy})
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        from she.evaluation.report import rl_curves

        rl_curves(trainer.state.log_history, out)  # reward.png, step_reward.png, policy.png
    trainer.accelerator.wait_for_everyone()  # no rank returns (and reads final/) before rank 0 has written it
    return final
