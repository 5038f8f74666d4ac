"""``she compare CONFIG``: the paper-style comparison -- every baseline and ablation from one SFT checkpoint,
at equal generation budgets, resumable, with bootstrap confidence intervals.

The driver only *orchestrates* jobs that already exist (``train_sft``, ``run_dpo_job``,
``run_reward_model_job``, ``run_rl_job``, ``run_curriculum``, ``run_cross_encoder_job``, ``run_prm_job``,
``estimate_pass_rates``, ``diverse_select``, ``evaluate``); it adds no training code. What it does add:

* **One start.** Every generative row starts from the same SFT checkpoint (``<out>/sft/final``, trained
  once, or ``sft_model:``), so the rows differ only in what happens after SFT.
* **Equal budgets** (:func:`rl_generations`, :func:`strict_rl_steps`). Every RL row gets
  ``max_steps x prompts_per_step x num_generations`` policy rollouts; the DPO/RM pass@N sampling defaults
  to the same number of generations (``n = num_generations``, ``max_records = max_steps x
  prompts_per_step``); the difficulty estimation of ``srpo_full`` is counted in its ``generations`` and,
  with ``budget: strict`` (default), paid for with RL steps.
* **Resumability.** Each job writes to ``<out>/<job>/``; a job whose final folder exists is skipped, an
  evaluation whose ``metrics.json`` exists is skipped, and ``compare_state.json`` (atomic) records job
  wall times and finished rows after every job and row. Jobs themselves resume from their checkpoints.
* **Outputs.** ``results.json``, ``results.md`` (table with Macro F1 and accuracy with 95 % bootstrap CIs
  over query groups, class-wise F1, step accuracy, format-valid rate, generations, wall time; the
  ablations; command, seed, data), ``reward.png``, ``step_reward.png``, ``entropy.png``,
  ``macro_f1.png`` and, with ``eval_checkpoints: true``, ``macro_f1_over_training.png``.

docs/baselines.md ("she compare") explains each row and the budget rule.

The package reads bottom to top: :mod:`~she.recipes.compare.config` (the YAML sections),
:mod:`~she.recipes.compare.rows` (the table ``name -> Row``), :mod:`~she.recipes.compare.plan` (budgets,
checks, the RL job of each row, shared runs), :mod:`~she.recipes.compare.report` (metrics, plots,
results.md) and :mod:`~she.recipes.compare.run` (the driver).
"""

from she.recipes.compare.config import (
    BootstrapConfig,
    CompareConfig,
    CompareEvalConfig,
    DifficultyConfig,
    DiverseConfig,
)
from she.recipes.compare.plan import (
    check_compare_config,
    default_stages,
    judge_rows,
    load_compare_config,
    plan_same_as,
    rl_generations,
    rl_job_config,
    seeded_subset,
    selected_rows,
    split_stage_steps,
    strict_rl_steps,
)
from she.recipes.compare.report import results_markdown, row_metrics
from she.recipes.compare.rows import ABLATION_ROWS, ALL_ROWS, FULL_ROWS, MAIN_ROWS, RL_ROWS, ROWS, Row, majority_label
from she.recipes.compare.run import CompareRun, evaluate_checkpoint, run_compare

__all__ = [
    "ABLATION_ROWS",
    "ALL_ROWS",
    "BootstrapConfig",
    "CompareConfig",
    "CompareEvalConfig",
    "CompareRun",
    "DifficultyConfig",
    "DiverseConfig",
    "FULL_ROWS",
    "MAIN_ROWS",
    "RL_ROWS",
    "ROWS",
    "Row",
    "check_compare_config",
    "default_stages",
    "evaluate_checkpoint",
    "judge_rows",
    "load_compare_config",
    "majority_label",
    "plan_same_as",
    "results_markdown",
    "rl_generations",
    "rl_job_config",
    "row_metrics",
    "run_compare",
    "seeded_subset",
    "selected_rows",
    "split_stage_steps",
    "strict_rl_steps",
]
