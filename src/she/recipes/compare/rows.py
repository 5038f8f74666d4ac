"""The rows of the ``she compare`` table, as data: ``name -> Row``.

A row says what it is (main result or ablation, one line for results.md), how its model comes about and how
it is scored. The driver (:mod:`she.recipes.compare.run`) walks this table; it has no per-row branches.

``family`` is how the model of a row comes about:

* ``majority`` -- no model; :attr:`Row.predict` labels every pair.
* ``sft`` -- the shared SFT start itself.
* ``job`` -- one job: :attr:`Row.config` builds its config (when the job runs), :attr:`Row.run` trains;
  ``from_sft`` rows start from the shared SFT folder.
* ``rl`` -- one ``run_rl_job`` from SFT; :attr:`Row.rl` is the row's change to the shared ``rl:`` section
  (rows whose RL jobs come out identical share one run, see :func:`she.recipes.compare.plan.plan_same_as`).
* ``full`` -- the srpo_full data pipeline (difficulty band -> diverse selection -> curriculum) before RL;
  ``rl`` as above.

Jobs are imported when they run (``from she.training.sft import train_sft`` inside the function), so a test
that replaces a job on its module replaces it here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from she.config import CrossEncoderJobConfig, DPOJobConfig
from she.data.sources import majority_label, prior_train
from she.errors import UserError
from she.recipes.compare.config import CE_FIXED, DPO_FIXED, build_section

@dataclass(frozen=True)
class Row:
    """One row of the table. ``run`` (the driver) is passed to the callables as their first argument."""

    kind: str  # main | ablation | seed (another seed of a main row)
    description: str
    family: str  # majority | sft | job | rl | full (module docstring)
    config: Callable[[Any, Mapping[str, Any]], Any] | None = None  # (run, needs) -> the job's config
    run: Callable[[Any, Any], None] | None = None  # (run, job config) -> trains into the job's folder
    rl: Mapping[str, Any] | None = None  # rl/full rows: the row's change to the shared rl: section
    from_sft: bool = True  # the row's job starts from the shared SFT folder
    reward_model: bool = False  # rl rows: the reward is the scalar reward model of the shared `rm` job
    charged: tuple[str, ...] = ()  # shared jobs whose wall time the row is charged with, besides its own
    predict: Callable[[Any, Any], list[dict[str, Any]]] | None = None  # (run, model) -> predictions; None = generate


# -- the jobs ----------------------------------------------------------------------------------------------


def _label_only_config(run: Any, needs: Mapping[str, Any]) -> Any:
    return run.sft_config("label", run.out / "label_only_sft")


def _train_label_only(run: Any, cfg: Any) -> None:
    from she.training.sft import train_sft

    train_sft(cfg, run.label_only_train())  # the label_only: section's sample of the training queries


def _dpo_config(run: Any, needs: Mapping[str, Any]) -> DPOJobConfig:
    c = run.cfg
    return build_section(DPOJobConfig, c.dpo, "dpo", DPO_FIXED, model=str(needs["sft"]), output_dir=str(run.out / "dpo"),
                         data=c.data, rollouts=run.passn(), seed=c.seed)


def _run_dpo(run: Any, cfg: DPOJobConfig) -> None:
    from she.training.dpo import run_dpo_job

    run_dpo_job(cfg, run.train, progress=False)


def _cross_encoder_config(run: Any, needs: Mapping[str, Any]) -> CrossEncoderJobConfig:
    c = run.cfg
    return build_section(CrossEncoderJobConfig, c.cross_encoder, "cross_encoder", CE_FIXED,
                         output_dir=str(run.out / "cross_encoder"), data=c.data, eval_split="none", seed=c.seed)


def _run_cross_encoder(run: Any, cfg: CrossEncoderJobConfig) -> None:
    from she.training.cross_encoder import run_cross_encoder_job

    run_cross_encoder_job(cfg, run.train, None)


def _rl_config(run: Any, needs: Mapping[str, Any]) -> Any:
    return run.rl_config(needs["row"], model=needs["sft"], judge=needs.get("judge"),
                         reward_model=needs.get("reward_model"))


def _run_rl(run: Any, cfg: Any) -> None:
    from she.training.rl import run_rl_job

    run_rl_job(cfg, run.rl_train())


# -- predictions of the rows that generate nothing ---------------------------------------------------------


def _predict_majority(run: Any, model: Any) -> list[dict[str, Any]]:
    lab = majority_label(prior_train(run.cfg.data, run.train), run.labels)
    return [{"id": r.id, "label": lab, "gold": r.label} for r in run.evals]


def _predict_cross_encoder(run: Any, model: Any) -> list[dict[str, Any]]:
    from she.training.cross_encoder import CrossEncoderJudge

    return CrossEncoderJudge.from_pretrained(model).predict(run.evals, run.cfg.eval.batch_size)


# -- the table: main rows first, then the ablations (the order of results.md) -----------------------------

_RL = dict(config=_rl_config, run=_run_rl)

ROWS: dict[str, Row] = {
    "majority": Row("main", "predicts the most frequent label of the training split (before any balancing) for "
                    "every pair", "majority", from_sft=False, predict=_predict_majority),
    "label_only_sft": Row("main", "SFT from the base model on `Verdict: <label>` only (no reasoning); its training "
                          "pairs may be more than the shared split's (the `label_only:` section)", "job",
                          config=_label_only_config, run=_train_label_only, from_sft=False),
    "sft": Row("main", "SFT on reasoning traces: the shared start of every generative row below", "sft"),
    "dpo": Row("main", "DPO on pass@N preference pairs sampled from the SFT policy", "job", config=_dpo_config,
               run=_run_dpo),
    # GRPO's examiner only feeds its step metrics: the verifier, so that the baseline never loads (or waits for)
    # the judge
    "grpo": Row("main", "GRPO from SFT, outcome (label) reward only", "rl",
                rl={"step_rewards": False, "examiner": "verifier"}, **_RL),
    "rm_grpo": Row("main", "GRPO whose reward is a scalar reward model trained on the same pass@N pairs", "rl",
                   rl={"step_rewards": False}, reward_model=True, charged=("rm",), **_RL),
    "srpo": Row("main", "SRPO: GRPO plus per-step rewards from the examiner and estimator of the `rl:` section",
                "rl", rl={"step_rewards": True}, **_RL),
    "srpo_gated": Row("main", "SRPO with outcome-gated, penalty-only step credit (docs/srpo.md), the `rl:` examiner",
                      "rl", rl={"step_rewards": True, "advantage": "srpo_gated"}, **_RL),
    "srpo_full": Row("main", "SRPO on a difficulty-banded, diverse prompt set, trained as a curriculum", "full",
                     rl={"step_rewards": True}),
    "cross_encoder": Row("main", "BERT-style cross-encoder classifier over [query, product] (non-generative anchor)",
                         "job", config=_cross_encoder_config, run=_run_cross_encoder, from_sft=False,
                         predict=_predict_cross_encoder),
    "srpo_no_step_reward": Row("ablation", "SRPO with step rewards off (the same job as grpo, reused)", "rl",
                               rl={"step_rewards": False, "examiner": "verifier"}, **_RL),
    "srpo_verifier_only": Row("ablation", "SRPO with the offline verifier as the only step examiner", "rl",
                              rl={"step_rewards": True, "examiner": "verifier"}, **_RL),
    # blend with weight 1: the judge's score wherever it has one; the verifier only fills the steps the judge
    # cannot score (cut off by its max_length) -- rewards/hybrid.py has no pure judge mode
    "srpo_judge_only": Row("ablation", "SRPO with the judge as the step examiner (blend, judge_weight 1.0)", "rl",
                           rl={"step_rewards": True, "examiner": "blend", "judge_weight": 1.0}, **_RL),
    "srpo_gated_verifier_only": Row("ablation", "srpo_gated with the offline verifier as the only step examiner",
                                    "rl", rl={"step_rewards": True, "advantage": "srpo_gated", "examiner": "verifier"},
                                    **_RL),
    "srpo_gated_min_verifier_only": Row("ablation", "srpo_gated_min with the offline verifier as the only examiner",
                                        "rl", rl={"step_rewards": True, "advantage": "srpo_gated_min",
                                                  "examiner": "verifier"}, **_RL),
    "srpo_gated_computed_only": Row("ablation", "srpo_gated whose step reward covers only the steps computed exactly "
                                    "from the strings (Missing), none of the label-derived checks", "rl",
                                    rl={"step_rewards": True, "advantage": "srpo_gated", "examiner": "verifier",
                                        "reward_steps": ["Missing"]}, **_RL),
    "srpo_gated_graded_missing": Row("ablation", "srpo_gated_computed_only with Missing graded by word overlap "
                                     "(Jaccard) instead of exact 0/1", "rl",
                                     rl={"step_rewards": True, "advantage": "srpo_gated", "examiner": "verifier",
                                         "reward_steps": ["Missing"], "graded_sets": True}, **_RL),
    "srpo_gated_balanced_graded_missing": Row("ablation", "srpo_gated_graded_missing with zero-sum step credit: "
                                              "penalties paid back to unflagged steps of right verdicts", "rl",
                                              rl={"step_rewards": True, "advantage": "srpo_gated_balanced",
                                                  "examiner": "verifier", "reward_steps": ["Missing"],
                                                  "graded_sets": True}, **_RL),
    "srpo_decoupled": Row("ablation", "SRPO whose step tokens are credited by their own (group-centred) step only "
                          "and every other token by the outcome only", "rl",
                          rl={"step_rewards": True, "advantage": "srpo_decoupled"}, **_RL),
    "srpo_likelihood": Row("ablation", "SRPO whose decision step (Relevant) is credited by the exact gradient of the "
                           "policy's log P(gold decision), both signs, every rollout; the other tokens by the outcome",
                           "rl", rl={"step_rewards": True, "advantage": "srpo_likelihood", "examiner": "verifier"},
                           **_RL),
    "srpo_likelihood_outcome": Row("ablation", "srpo_likelihood whose decision tokens get the outcome advantage too "
                                   "(likelihood_decouple: false)", "rl",
                                   rl={"step_rewards": True, "advantage": "srpo_likelihood", "examiner": "verifier",
                                       "likelihood_decouple": False}, **_RL),
    "srpo_likelihood_prob": Row("ablation", "srpo_likelihood whose decision credit is the gradient of P(gold decision) "
                                "itself (likelihood_objective: prob): the expected step accuracy, mode-seeking", "rl",
                                rl={"step_rewards": True, "advantage": "srpo_likelihood", "examiner": "verifier",
                                    "likelihood_objective": "prob"}, **_RL),
    "srpo_likelihood_prob_balanced": Row("ablation", "srpo_likelihood_prob with the credit weighted by the inverse "
                                         "frequency of the gold decision (likelihood_class_weights: balanced): "
                                         "the decision's balanced accuracy", "rl",
                                         rl={"step_rewards": True, "advantage": "srpo_likelihood",
                                             "examiner": "verifier", "likelihood_objective": "prob",
                                             "likelihood_class_weights": "balanced"}, **_RL),
    "srpo_gated_min": Row("ablation", "srpo_gated with PURE-style min-form credit over the penalties", "rl",
                          rl={"step_rewards": True, "advantage": "srpo_gated_min"}, **_RL),
    "srpo_centered": Row("ablation", "SRPO with group-centred step credit normalised per step type", "rl",
                         rl={"step_rewards": True, "advantage": "srpo_centered"}, **_RL),
    "srpo_centered_pooled": Row("ablation", "the first SRPO: centred step credit pooled over step types", "rl",
                                rl={"step_rewards": True, "advantage": "srpo_centered_pooled"}, **_RL),
    "srpo_full_no_difficulty": Row("ablation", "srpo_full without the difficulty band (no pass-rate estimation)",
                                   "full", rl={"step_rewards": True}),
    "srpo_full_no_diverse": Row("ablation", "srpo_full with a random (not diverse) subset of the band", "full",
                                rl={"step_rewards": True}),
    "srpo_full_no_curriculum": Row("ablation", "srpo_full trained in one stage on the selected prompts", "full",
                                   rl={"step_rewards": True}),
}

# the same rollouts a step (16 x 2 instead of 4 x 8): the decision's credit is exact per rollout and needs no group
# baseline, so the rollouts can go to 4x as many distinct prompts (docs/srpo.md, "More prompts with the same rollouts")
ROWS["srpo_likelihood_g2"] = Row("ablation", "srpo_likelihood with groups of 2 rollouts: the same rollouts a step "
                                 "spread over more prompts (4 x 8 becomes 16 x 2)", "rl",
                                 rl={**ROWS["srpo_likelihood"].rl, "regroup_generations": 2}, **_RL)
# the log-likelihood credit (a proper scoring rule) with srpo_likelihood_prob_balanced's weights: a value the policy
# rarely says is pulled back hardest, where the prob form's pull vanishes (docs/srpo.md, session 41)
ROWS["srpo_likelihood_balanced"] = Row("ablation", "srpo_likelihood with the credit weighted by the inverse frequency "
                                       "of the gold value (likelihood_class_weights: balanced): the step's balanced "
                                       "log-likelihood", "rl",
                                       rl={**ROWS["srpo_likelihood"].rl, "likelihood_objective": "logprob",
                                           "likelihood_class_weights": "balanced"}, **_RL)

# rollouts with the computed steps forced (she.training.computed_rollouts): the policy samples and trains only the
# decision and the verdict, after the evidence the computed read of `she eval` forces too (docs/srpo.md, "Computed
# evidence in the rollouts")
for _base in ("grpo", "srpo_likelihood"):
    ROWS[f"{_base}_computed"] = Row("ablation", f"{_base} on rollouts whose computed steps are forced "
                                    "(rollout_evidence: computed)", "rl",
                                    rl={**ROWS[_base].rl, "rollout_evidence": "computed"}, **_RL)

# enumerated rollouts (she.training.computed_rollouts): the computed steps forced, then every decision value x verdict
# once (6 leaves on the decision schema), each weighed by its probability -- the exact expected-reward gradient
# (she.algorithms.advantages, section 11; docs/srpo.md, "Enumerated rollouts"). GRPO's outcome, and SRPO's outcome
# plus the verifier's score of the decision step
ROWS["grpo_exact"] = Row("ablation", "GRPO over enumerated leaves (computed steps forced, every decision x verdict "
                         "once, weighed by its probability): the exact expected outcome", "rl",
                         rl={**ROWS["grpo"].rl, "rollout_evidence": "enumerated", "num_generations": 6}, **_RL)
ROWS["srpo_exact"] = Row("ablation", "grpo_exact whose reward adds alpha x the verifier's score of the decision step "
                         "(Relevant), exact over the leaves", "rl",
                         rl={"step_rewards": True, "advantage": "srpo_exact", "examiner": "verifier",
                             "reward_steps": ["Relevant"], "rollout_evidence": "enumerated", "num_generations": 6},
                         **_RL)
# the same with the verdict step scored by its agreement with the pair's mean human rating (rl.rated_verdict;
# docs/srpo.md, "Rated verdicts"): the one human signal in this data the gold label, and so GRPO's outcome, leaves out
ROWS["srpo_exact_rated"] = Row("ablation", "srpo_exact whose reward also adds alpha x the verdict's agreement with the "
                               "pair's mean human rating", "rl",
                               rl={**ROWS["srpo_exact"].rl, "reward_steps": ["Relevant", "Verdict"],
                                   "rated_verdict": True}, **_RL)
# the same with a teacher's term on the verdict (rl.teacher, a cross-encoder read on every RL prompt; docs/srpo.md,
# "A teacher's term"): log q(verdict) - beta (log pi - log pi_ref), whose maximiser is the reference pooled with the
# teacher -- the pool measured in session 32 to order pairs better than the SFT alone
ROWS["srpo_exact_teacher"] = Row("ablation", "srpo_exact plus a cross-encoder teacher's KL-regularised term on each "
                                 "leaf's verdict (rl.teacher)", "rl", rl={**ROWS["srpo_exact"].rl, "teacher": True},
                                 **_RL)
# its control: the same term with a uniform teacher (log q constant), i.e. only its KL anchor towards the SFT
ROWS["srpo_exact_kl"] = Row("ablation", "srpo_exact_teacher with a uniform teacher: the term's KL anchor alone "
                            "(the control of the teacher's knowledge)", "rl",
                            rl={**ROWS["srpo_exact"].rl, "teacher": "uniform"}, **_RL)
# and GRPO's arm under the same anchor (alpha 0), so that srpo_exact_kl - grpo_exact_kl is the step term alone again
ROWS["grpo_exact_kl"] = Row("ablation", "grpo_exact with srpo_exact_kl's anchor (a uniform teacher's term): the fair "
                            "GRPO arm beside it", "rl", rl={**ROWS["grpo_exact"].rl, "teacher": "uniform"}, **_RL)

# the likelihood outcomes (she.training.gold_prob), each for GRPO and for the best 8-rollout SRPO variant: the same
# outcome for both arms, divided by the batch's reward std (a group's tiny spread is not blown up)
for _outcome, _what in (("gold_prob", "P(gold label | reasoning)"),
                        ("gold_logprob", "1 + max(log P(gold label | reasoning), -20) / 20")):
    for _base in ("grpo", "srpo_gated_graded_missing"):
        ROWS[f"{_base}_{_outcome}"] = Row("ablation", f"{_base} with the outcome {_what} (batch-scaled)", "rl",
                                          rl={**ROWS[_base].rl, "outcome": _outcome, "scale_rewards": "batch"}, **_RL)

# more seeds of the two rows the headline compares: `<row>_seed<k>` trains with seed k (the shared seed + k);
# the report pools a row with its seeds (arm_of) for the paired intervals
_ENUMERATED = ("grpo_exact", "srpo_exact", "srpo_exact_rated", "srpo_exact_teacher", "srpo_exact_kl", "grpo_exact_kl")
for _base in ("grpo", "srpo_gated", "srpo_gated_graded_missing", "srpo_decoupled", "srpo_likelihood", "grpo_computed",
              "srpo_likelihood_computed", "srpo_likelihood_prob_balanced", "srpo_likelihood_balanced") + _ENUMERATED:
    # the enumerated arms: ~10 min a row, three seeds; the anchored matched pair, whose gap issue 10's replicates
    # decide (eight replicates in sessions 33-36: +0.002, sd 0.008), five; GRPO and the balanced likelihood credit, the
    # pair of the noisy synthetic comparison (session 40), three; its log-likelihood form (session 41), two
    _n_seeds = (5 if _base in ("srpo_exact_kl", "grpo_exact_kl")
                else 3 if _base in _ENUMERATED + ("grpo", "srpo_likelihood_prob_balanced") else 2)
    for _k in range(1, _n_seeds + 1):
        _spec = ROWS[_base]
        ROWS[f"{_base}_seed{_k}"] = Row("seed", f"{_base} with seed + {_k}", "rl", rl={**_spec.rl, "seed_offset": _k},
                                        **_RL)


def arm_of(row: str) -> str:
    """The row a seed row repeats (``srpo_gated_seed2`` -> ``srpo_gated``); any other row is its own arm."""
    base, sep, k = row.rpartition("_seed")
    return base if sep and k.isdigit() and base in ROWS else row


ALL_ROWS = tuple(ROWS)
MAIN_ROWS = tuple(n for n, r in ROWS.items() if r.kind == "main")
ABLATION_ROWS = tuple(n for n, r in ROWS.items() if r.kind == "ablation")
# plain RL rows: one run_rl_job each (rows with identical job configs share one run, see plan_same_as)
RL_ROWS = tuple(n for n, r in ROWS.items() if r.family == "rl")
# data-pipeline rows: difficulty band -> diverse selection -> curriculum, each part removable
FULL_ROWS = tuple(n for n, r in ROWS.items() if r.family == "full")
ROW_INFO: dict[str, str] = {n: r.description for n, r in ROWS.items()}

__all__ = ["ABLATION_ROWS", "ALL_ROWS", "FULL_ROWS", "MAIN_ROWS", "RL_ROWS", "ROWS", "ROW_INFO", "Row", "arm_of",
           "majority_label"]
