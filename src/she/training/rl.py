"""``she train srpo`` / ``she train grpo``: build the examiner, the prompt dataset and run :class:`SRPOTrainer`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from she.algorithms.advantages import EXACT_ESTIMATORS
from she.config import RLJobConfig
from she.data.factstore import facts_on_share
from she.data.guideline import labels_from_facts
from she.data.schema import Record
from she.errors import UserError
from she.models.metadata import schema_of
from she.reasoning.schema import StepSchema, resolve_schema

log = logging.getLogger(__name__)


def build_examiner(cfg: RLJobConfig):
    from she.rewards.hybrid import HybridExaminer, VerifierExaminer

    if cfg.rated_verdict and not (cfg.step_rewards and (cfg.reward_steps is None or "Verdict" in cfg.reward_steps)):
        raise UserError("rl.rated_verdict scores the verdict step, which earns nothing unless rl.step_rewards is true "
                        f"and rl.reward_steps includes Verdict (got step_rewards {cfg.step_rewards}, reward_steps "
                        f"{cfg.reward_steps})")
    if cfg.rated_verdict and resolved_advantage(cfg) != "srpo_exact":
        # a rated score is a degree, not a verdict: the gated estimators' flaw threshold and srpo_likelihood's
        # right/wrong test would read an off-by-one verdict (0.5) as no flaw, or as right
        raise UserError(f"rl.rated_verdict is built and measured with advantage srpo_exact (enumerated leaves), got "
                        f"{resolved_advantage(cfg)!r} (docs/srpo.md, \"Rated verdicts\")")
    verifier = VerifierExaminer(graded=cfg.graded_sets, rated=cfg.rated_verdict)
    if cfg.examiner == "verifier":
        return verifier
    if cfg.examiner in ("hybrid", "blend"):
        if not cfg.judge:
            raise UserError(f"examiner {cfg.examiner!r} needs a judge folder (`judge:` from `she train prm`)")
        from she.rewards.judge import StepJudge

        judge = StepJudge.from_pretrained(cfg.judge)
        mode = "verifier_first" if cfg.examiner == "hybrid" else "blend"
        return HybridExaminer(verifier, judge, mode=mode, weight=cfg.judge_weight,
                              judge_steps=judge_steps_above_floor(cfg.judge, cfg.judge_auc_floor))
    raise UserError(f"unknown examiner {cfg.examiner!r}; use verifier, hybrid or blend")


def read_teacher(cfg: RLJobConfig, records: list[Record]) -> dict[str, dict[str, float]]:
    """``{record id: {label: q}}``: the teacher (``rl.teacher``, a cross-encoder folder) read on every RL prompt
    before training; ``uniform``: q = 1 / K for every label (the term's KL anchor alone, the control). Refused
    before the policy is loaded (the trainer checks the first two again for the Python API): an estimator other than
    the exact ones, ``beta`` 0 (the term is regularised towards the reference model), a teacher over other labels."""
    from she.data.labels import get_taxonomy
    from she.training.cross_encoder import CrossEncoderJudge

    if resolved_advantage(cfg) not in EXACT_ESTIMATORS:
        raise UserError(f"rl.teacher is built for the exact estimators {EXACT_ESTIMATORS} (rl.rollout_evidence: "
                        f"enumerated), got {resolved_advantage(cfg)!r} (docs/srpo.md, \"A teacher's term\")")
    if not cfg.beta > 0:
        raise UserError(f"rl.teacher regularises towards the reference model: it needs rl.beta > 0, got {cfg.beta}")
    labels = list(get_taxonomy(cfg.data.taxonomy).labels)
    if cfg.teacher == "uniform":  # the control: log q constant, so the term is its KL anchor alone
        return {str(r.id): {lab: 1.0 / len(labels) for lab in labels} for r in records}
    if not Path(cfg.teacher, "config.json").is_file():
        raise UserError(f"rl.teacher: {cfg.teacher} is not a model folder (no config.json; she train cross-encoder "
                        "writes one under its output_dir/final)")
    judge = CrossEncoderJudge.from_pretrained(cfg.teacher)
    if set(judge.labels) != set(labels):
        raise UserError(f"rl.teacher {cfg.teacher} predicts {sorted(judge.labels)}, the data's taxonomy has "
                        f"{sorted(labels)}")
    out = {str(r.id): dict(d["probs"]) for r, d in zip(records, judge.predict(records))}
    log.info("teacher %s read %d RL prompts", cfg.teacher, len(out))
    return out


def judge_steps_above_floor(judge_dir: str, floor: float | None) -> list[str] | None:
    """Step keys whose held-out judge AUC (``metrics.json`` of ``she train prm``, next to the judge folder)
    is at least ``floor``; None = no filter (no floor, or no per-step metrics to read -- said in the log)."""
    if floor is None:
        return None
    path = Path(judge_dir).parent / "metrics.json"
    try:
        by_step = (json.loads(path.read_text()).get("after") or {}).get("by_step") or {}
    except (OSError, ValueError):
        by_step = {}
    aucs = {k: v.get("auc") for k, v in by_step.items() if isinstance(v, dict)}
    if not any(a is not None for a in aucs.values()):
        log.warning("judge_auc_floor=%s: no per-step AUC in %s; the judge scores every step type", floor, path)
        return None
    kept = sorted(k for k, a in aucs.items() if a is not None and a >= floor)
    dropped = {k: a for k, a in aucs.items() if k not in kept}
    if dropped:
        log.warning("judge step types below judge_auc_floor=%s (left to the verifier / neutral): %s", floor, dropped)
    return kept


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


def resolve_class_weights(cfg: RLJobConfig, train: list[Record]) -> dict[str, float] | None:
    """``cfg.class_weights`` as ``{label: weight}``: None, ``balanced`` (inverse label frequency in ``train``),
    or the mapping given (every label of the taxonomy needs a weight >= 0)."""
    from she.data.labels import get_taxonomy
    from she.training.srpo import balanced_class_weights

    cw = cfg.class_weights
    if cw is None or cw == "none":
        return None
    labels = get_taxonomy(cfg.data.taxonomy).labels
    if cw == "balanced":
        return balanced_class_weights([r.label for r in train], labels)
    if isinstance(cw, str):
        raise UserError(f"class_weights must be null, 'balanced' or a mapping label -> weight, got {cw!r}")
    missing = [lab for lab in labels if lab not in cw]
    unknown = [k for k in cw if k not in labels]
    if missing or unknown:
        raise UserError(f"class_weights: labels {missing} have no weight, {unknown} are not labels of {cfg.data.taxonomy}")
    bad = {k: v for k, v in cw.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
    if bad:
        raise UserError(f"class_weights: weights must be numbers >= 0, got {bad}")
    return {k: float(v) for k, v in cw.items()}


def fact_coverage_note(records: list[Record], alpha: float) -> tuple[int, str]:
    """(logging level, message) on how many RL records carry step facts, for a step estimator. A warning when facts
    are on a share s < 1 of them and either ``alpha * s`` is under 0.5 or s is under a quarter: on the noisy synthetic
    comparison a quarter at alpha 1 collapsed like GRPO, the same quarter at alpha 4 (= 1 / s) did not, and a tenth at
    alpha 10 did (docs/srpo.md, "How many pairs need step facts?"); a measured hint, not a rule, so nothing is
    changed."""
    n = len(records)
    with_facts = sum(not r.facts.is_empty() for r in records)
    share = with_facts / n if n else 0.0
    msg = f"step facts on {with_facts} of {n} RL records ({share:.0%}), alpha {alpha:g}"
    if with_facts == 0:
        return logging.INFO, msg + ": the examiner reads only what each label implies"
    if share < 0.25:
        return logging.WARNING, (msg + ": under the quarter that docs/srpo.md (\"How many pairs need step facts?\") "
                                 "measured to work; a tenth at alpha 10 did not beat the SFT start")
    if share < 1.0 and alpha * share < 0.5:
        return logging.WARNING, (msg + f": share x alpha = {alpha * share:.2f}; with a partial fact pass docs/srpo.md "
                                 f"(\"How many pairs need step facts?\") measured alpha ~ 1 / share (here "
                                 f"{1.0 / share:.1f}) against a collapse at share x alpha 0.25")
    return logging.INFO, msg


def resolved_advantage(cfg: RLJobConfig) -> str:
    """The estimator a job runs: ``grpo`` whenever step rewards are off (``she train grpo`` on an SRPO config; on
    enumerated rollouts its exact form ``grpo_exact``), else ``cfg.advantage`` or the default ``srpo_gated``."""
    if not cfg.step_rewards:
        return "grpo_exact" if cfg.rollout_evidence == "enumerated" else "grpo"
    return cfg.advantage or "srpo_gated"


def run_examiner_check(cfg: RLJobConfig, examiner, records: list[Record], schema: StepSchema | None = None
                       ) -> dict | None:
    """Score gold vs constant traces of up to ``cfg.examiner_check_records`` records (she.rewards.check), written
    in ``schema`` (the policy's; None = the built-in one of the data's taxonomy); ``error`` refuses to train when
    a constant trace wins on a class, ``warn`` logs it, ``off`` skips. Written to
    ``<output_dir>/examiner_check.json``."""
    import random

    from she.reasoning.schema import schema_for
    from she.rewards.check import check_examiner, format_check

    if cfg.examiner_check not in ("error", "warn", "off"):
        raise UserError(f"examiner_check must be error, warn or off, got {cfg.examiner_check!r}")
    advantage = resolved_advantage(cfg)
    # srpo_likelihood pays no examiner score: it credits P(gold value), which no constant answer can raise
    if cfg.examiner_check == "off" or advantage in ("grpo", "srpo_likelihood") or not records:
        return None
    sample = list(records)
    random.Random(cfg.seed).shuffle(sample)
    criterion = "flaw" if advantage.startswith("srpo_gated") else "reward"
    report = check_examiner(examiner, sample[: cfg.examiner_check_records], schema_for(schema, cfg.data.taxonomy),
                            criterion=criterion, include_label_step=cfg.rated_verdict, paid_steps=cfg.reward_steps)
    text = format_check(report)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "examiner_check.json").write_text(json.dumps(report, indent=2))
    log.info("%s", text)
    if not report["ok"]:
        if cfg.examiner_check == "error":
            raise UserError(f"{text}\nThe step reward would pay a constant answer more than the truth, so SRPO would "
                            "drift there; fix the examiner (judge, facts) or set examiner_check: warn to train anyway")
        log.warning("examiner check failed (examiner_check: warn): training anyway")
    return report


def loss_batch_settings(rollouts: int, micro_batches: int = 1) -> dict:
    """TRL's batch keywords for a step of ``rollouts`` rollouts per process that go through the loss in
    ``micro_batches`` pieces: one generation batch of ``rollouts`` (``per_device_train_batch_size x
    steps_per_generation``), split by TRL into ``micro_batches`` forward + backward passes whose gradients add
    up before the step's one optimizer update (``gradient_accumulation_steps``). TRL's ``dapo`` loss (the one
    ``run_rl_job`` trains with) divides each piece by the whole generation batch's token count, so the gradient is
    the one of a single pass (tests/test_loss_micro_batches.py); what changes is the activation memory held at once
    (1/n). Of TRL's other losses ``grpo``, ``dr_grpo``, ``sapo``, ``cispo`` and ``luspo`` stay equal (equal pieces);
    ``bnpo``, ``top_entropy_quantile < 1`` and an entropy bonus average per piece and do not."""
    if micro_batches < 1 or rollouts % micro_batches:
        raise UserError(f"rl.loss_micro_batches must be >= 1 and divide the {rollouts} rollouts a process trains on "
                        f"each step, got {micro_batches}")
    return {"per_device_train_batch_size": rollouts // micro_batches,
            "gradient_accumulation_steps": micro_batches, "steps_per_generation": micro_batches}


def rollout_settings(cfg: RLJobConfig) -> dict:
    """The job's rollout-engine settings as :func:`build_grpo_config` keywords (TRL's ``GRPOConfig`` names).

    Layout-invariant sampling hooks ``model.generate``, which vLLM never calls: the two cannot be combined.
    """
    if cfg.use_vllm and cfg.layout_invariant_sampling:
        raise UserError("layout_invariant_sampling works with transformers generation only; turn off use_vllm")
    return {"use_vllm": cfg.use_vllm, "vllm_mode": cfg.vllm_mode,
            "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            "vllm_server_base_url": cfg.vllm_server_base_url}


def trainer_rollout_kwargs(cfg: RLJobConfig, train: list[Record] | None = None, schema: StepSchema | None = None
                           ) -> dict:
    """Extra :class:`SRPOTrainer` keywords: a custom ``rollout_func`` ("module:function"), or the computed-evidence
    one (``rollout_evidence: computed``: the steps of ``train``'s prompts a program computes, written in ``schema``,
    forced), and the advantage dump folder, each only when set (otherwise the trainer is built exactly as before)."""
    from she.training.distributed import import_object

    out: dict = {}
    if cfg.rollout_evidence not in ("sampled", "computed", "enumerated"):
        raise UserError(f"rl.rollout_evidence must be sampled, computed or enumerated, got {cfg.rollout_evidence!r}")
    exact = resolved_advantage(cfg) in EXACT_ESTIMATORS
    if exact != (cfg.rollout_evidence == "enumerated"):
        raise UserError(f"rl.advantage {resolved_advantage(cfg)!r} with rl.rollout_evidence {cfg.rollout_evidence!r}: "
                        f"the exact estimators {EXACT_ESTIMATORS} and enumerated rollouts go together")
    if cfg.rollout_evidence in ("computed", "enumerated"):
        if cfg.rollout_func or cfg.use_vllm:
            raise UserError(f"rl.rollout_evidence: {cfg.rollout_evidence} is its own rollout_func on transformers "
                            "generation; unset rollout_func and use_vllm")
        from she.training.computed_rollouts import computed_evidence_rollout, enumerated_evidence_rollout

        make = computed_evidence_rollout if cfg.rollout_evidence == "computed" else enumerated_evidence_rollout
        out["rollout_func"] = make(train or [], schema if schema is not None else resolve_schema(None, cfg.data.taxonomy))
        leaves = getattr(out["rollout_func"], "num_leaves", None)
        if leaves is not None and cfg.num_generations != leaves:
            raise UserError(f"rl.rollout_evidence: enumerated has {leaves} leaves a prompt on this schema; set "
                            f"rl.num_generations: {leaves} (got {cfg.num_generations})")
    elif cfg.rollout_func:
        out["rollout_func"] = import_object(cfg.rollout_func)
    if cfg.dump_advantages:
        out["dump_advantages_dir"] = cfg.dump_advantages
    return out


def run_rl_job(cfg: RLJobConfig, train: list[Record], callbacks: list | None = None,
               check_records: list[Record] | None = None) -> Path:
    """``callbacks``: extra ``TrainerCallback``s (the curriculum's plateau stop, see she.sampling.curriculum).
    ``check_records``: held-out labelled records for the examiner check (default: the training records).

    Prompts are written, and rollouts parsed and examined, in the policy's own step schema (``cfg.model``'s
    ``she.json``), which the saved model's ``she.json`` carries on."""
    from she.models.registry import load_model_and_tokenizer
    from she.training.checkpoints import ManifestCallback
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset
    from she.training.trainer_setup import heap_trim_callback, save_final, train_resuming, write_job_config

    spec = schema_of(cfg.model)
    schema = resolve_schema(spec, cfg.data.taxonomy)
    if cfg.facts_share is not None and cfg.facts_store:  # the live examiner would read the store's facts on every pair
        raise UserError("rl.facts_share simulates a partial fact pass on records that carry facts; with rl.facts_store "
                        "the store is the fact pass (annotate or drop pairs there instead): set one of the two")
    train = with_store_facts(cfg, train)
    if cfg.outcome_labels not in ("data", "facts"):
        raise UserError(f"rl.outcome_labels must be data or facts, got {cfg.outcome_labels!r}")
    # relabel before the share: the outcome reads every pair's facts, the examiner only the share's
    if cfg.outcome_labels == "facts":
        train = labels_from_facts(train)
    train = facts_on_share(train, cfg.facts_share)
    if resolved_advantage(cfg) not in ("grpo", "grpo_exact") and cfg.alpha:
        log.log(*fact_coverage_note(train, cfg.alpha))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The GRPOConfig comes first: it checks the vLLM settings (before a model is loaded) and sets up the
    # process group under `accelerate launch`, so that rank-0-only writes below know their rank.
    args = build_grpo_config(
        out, num_generations=cfg.num_generations,
        **loss_batch_settings(cfg.per_device_batch_size or cfg.num_generations * cfg.prompts_per_step,
                              cfg.loss_micro_batches),
        max_completion_length=cfg.max_completion_length, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, beta=cfg.beta, temperature=cfg.temperature, bf16=cfg.bf16, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, scale_rewards=cfg.scale_rewards,
        logging_steps=cfg.logging_steps, report_to=cfg.report_to, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, **rollout_settings(cfg),
    )
    write_job_config(out, cfg, args.process_index)
    examiner = _live(build_examiner(cfg), cfg)
    class_weights = resolve_class_weights(cfg, train)
    rollout_kwargs = trainer_rollout_kwargs(cfg, train, schema)  # computed stems are written here, before the model
    if args.process_index == 0:
        run_examiner_check(cfg, examiner, check_records if check_records is not None else train, schema)
    if cfg.rated_verdict:
        from she.data.labels import check_rating_scale

        check_rating_scale(train, "rl.rated_verdict")
    teacher_probs = read_teacher(cfg, train) if cfg.teacher else None
    model, tok = load_model_and_tokenizer(cfg.model)
    tok.padding_side = "left"
    if cfg.layout_invariant_sampling:
        from she.training.distributed import install_layout_invariant_sampling

        install_layout_invariant_sampling(model, seed=cfg.seed)
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=make_prompt_dataset(train, cfg.prompt_style, schema=schema),
        processing_class=tok, records_by_id={r.id: r for r in train}, examiner=examiner,
        step_rewards=cfg.step_rewards, advantage=resolved_advantage(cfg), alpha=cfg.alpha, credit_mode=cfg.credit_mode,
        critical=cfg.critical, first_error_weight=cfg.first_error_weight, flawed_share=cfg.flawed_share,
        incorrect_below=cfg.incorrect_below, class_weights=class_weights, share_pin=cfg.share_pin,
        reward_steps=cfg.reward_steps, include_label_step=cfg.rated_verdict,
        teacher_probs=teacher_probs, teacher_weight=cfg.teacher_weight, teacher_beta=cfg.teacher_beta,
        outcome=cfg.outcome, likelihood_steps=cfg.likelihood_steps, likelihood_objective=cfg.likelihood_objective,
        likelihood_clip=cfg.likelihood_clip, likelihood_decouple=cfg.likelihood_decouple,
        likelihood_class_weights=cfg.likelihood_class_weights, rollout_sampler=cfg.rollout_sampler,
        rollout_prefill=cfg.rollout_prefill, logp_prefix=cfg.logp_prefix,
        taxonomy=cfg.data.taxonomy, schema=schema, partial_credit=cfg.partial_credit, format_weight=cfg.format_weight,
        callbacks=[ManifestCallback(), *(callbacks or []), *filter(None, [heap_trim_callback(cfg.heap_trim_steps)])],
        max_bad_steps=cfg.max_bad_steps,
        **build_reward_model_kwargs(cfg), **rollout_kwargs,
    )
    train_resuming(trainer, out, cfg.resume, log)

    def curves(final: Path) -> None:
        from she.evaluation.report import rl_curves

        rl_curves(trainer.state.log_history, out)  # reward.png, step_reward.png, policy.png

    # the tokenizer saved with the weights is trainer.processing_class, `tok` (left padding)
    return save_final(trainer, out, {"prompt_style": cfg.prompt_style, "target": "reasoning",
                                     "taxonomy": cfg.data.taxonomy, "schema": spec}, on_main=curves)
