"""Planning of ``she compare``, pure given the config: which rows run, the equal budgets, the RL job of each
row and which rows share one run; the checks that need no data or model; seeded subsets.

The budget rule (docs/baselines.md): every RL row gets ``max_steps x prompts_per_step x num_generations``
policy rollouts (:func:`rl_generations`); with ``budget: strict`` the difficulty estimation of ``srpo_full`` is
paid for with RL steps (:func:`strict_rl_steps`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from she.config import (
    ConfigError,
    CrossEncoderJobConfig,
    DPOJobConfig,
    PassAtNConfig,
    PRMJobConfig,
    RewardModelJobConfig,
    RLJobConfig,
    SFTJobConfig,
    from_dict,
    load_config,
    to_dict,
)
from she.data.schema import Record
from she.errors import UserError
from she.models.metadata import EVIDENCE_MODES
from she.recipes.compare.config import (
    CE_FIXED,
    CURRICULUM_FIXED,
    DPO_FIXED,
    PASSN_FIXED,
    PRM_FIXED,
    RL_FIXED,
    RM_FIXED,
    SFT_FIXED,
    CompareConfig,
    build_section,
    label_only_parts,
    label_only_section,
)
from she.recipes.compare.rows import ALL_ROWS, RL_ROWS, ROWS

BUDGETS = ("strict", "rl")
RL_PROMPTS = ("sft", "fresh")  # CompareConfig.rl_prompts

# -- rows and checks --------------------------------------------------------------------------------------


def _examiner_of(cfg: CompareConfig, row: str) -> str:
    rl = from_dict(RLJobConfig, {k: v for k, v in cfg.rl.items() if k not in RL_FIXED})
    return (ROWS[row].rl or {}).get("examiner", rl.examiner)


def judge_rows(cfg: CompareConfig, rows: Sequence[str]) -> list[str]:
    """Rows whose examiner reads a judge (hybrid or blend); GRPO rows run the examiner for step metrics too."""
    return [r for r in rows if ROWS[r].rl is not None and _examiner_of(cfg, r) in ("hybrid", "blend")]


def selected_rows(cfg: CompareConfig, where: str = "config") -> list[str]:
    """The rows to run, in the canonical order (main rows, then ablations), whatever order the config uses."""
    if cfg.rows is None:
        return list(ALL_ROWS)
    unknown = [r for r in cfg.rows if r not in ALL_ROWS]
    if unknown:
        raise ConfigError(f"{where}.rows: unknown row(s) {unknown}; choose from {list(ALL_ROWS)}")
    if not cfg.rows:
        raise ConfigError(f"{where}.rows: an empty list runs nothing")
    return [r for r in ALL_ROWS if r in set(cfg.rows)]


def check_compare_config(cfg: CompareConfig, where: str = "config") -> None:
    """Every check that needs no data or model: bad keys, rows, budget mode, section types, stage names."""
    from she.sampling.curriculum import CurriculumConfig, check_curriculum

    rows = selected_rows(cfg, where)
    if cfg.budget not in BUDGETS:
        raise ConfigError(f"{where}.budget: {cfg.budget!r}; use one of {list(BUDGETS)}")
    if cfg.eval.split not in ("train", "validation", "test"):
        raise ConfigError(f"{where}.eval.split: {cfg.eval.split!r}; use train, validation or test")
    if cfg.eval.evidence not in EVIDENCE_MODES:
        raise ConfigError(f"{where}.eval.evidence: {cfg.eval.evidence!r}; use one of {list(EVIDENCE_MODES)}")
    if cfg.bootstrap.n < 1 or not 0 < cfg.bootstrap.alpha < 1:
        raise ConfigError(f"{where}.bootstrap: need n >= 1 and 0 < alpha < 1")
    if cfg.rl_prompts not in RL_PROMPTS:
        raise ConfigError(f"{where}.rl_prompts: {cfg.rl_prompts!r}; use one of {list(RL_PROMPTS)}")
    if cfg.checkpoint_eval_max < 1:
        raise ConfigError(f"{where}.checkpoint_eval_max: must be >= 1")
    build_section(SFTJobConfig, cfg.sft, f"{where}.sft", SFT_FIXED)
    label_only_parts(cfg.label_only, f"{where}.label_only")
    build_section(SFTJobConfig, label_only_section(cfg.sft, cfg.label_only), f"{where}.sft + label_only", SFT_FIXED)
    rl = build_section(RLJobConfig, cfg.rl, f"{where}.rl", RL_FIXED)
    if rl.max_steps < 1 or rl.prompts_per_step < 1 or rl.num_generations < 1:
        raise ConfigError(f"{where}.rl: max_steps, prompts_per_step and num_generations must be >= 1 "
                          "(they define the equal budget)")
    for row in selected_rows(cfg, where):
        g = (ROWS[row].rl or {}).get("regroup_generations")
        if g is not None and (rl.prompts_per_step * rl.num_generations) % g:
            raise ConfigError(f"{where}.rl: row {row} regroups each step's rollouts into groups of {g}, but "
                              f"prompts_per_step x num_generations = {rl.prompts_per_step * rl.num_generations} "
                              f"is not a multiple of {g}")
    build_section(PassAtNConfig, cfg.passn, f"{where}.passn", PASSN_FIXED)
    build_section(DPOJobConfig, cfg.dpo, f"{where}.dpo", DPO_FIXED)
    build_section(RewardModelJobConfig, cfg.rm, f"{where}.rm", RM_FIXED)
    build_section(CrossEncoderJobConfig, cfg.cross_encoder, f"{where}.cross_encoder", CE_FIXED)
    if cfg.prm is not None:
        build_section(PRMJobConfig, cfg.prm, f"{where}.prm", PRM_FIXED)
    if cfg.curriculum is not None:
        cur = build_section(CurriculumConfig, cfg.curriculum, f"{where}.curriculum", CURRICULUM_FIXED)
        for i, st in enumerate(cur.stages):
            if "max_steps" in st.overrides:
                raise ConfigError(f"{where}.curriculum.stages[{i}].overrides.max_steps: stage lengths come from "
                                  "advance.steps (or an equal share of the budget)")
        check_curriculum(cur, f"{where}.curriculum")
    for key, v in (("difficulty.max_records", cfg.difficulty.max_records), ("difficulty.k", cfg.difficulty.k),
                   ("diverse.n", cfg.diverse.n), ("eval.max_eval", cfg.eval.max_eval)):
        if v is not None and v < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1 or null, got {v}")
    if cfg.diverse.embedder not in ("auto", "minilm", "hashing"):
        raise ConfigError(f"{where}.diverse.embedder: {cfg.diverse.embedder!r}; use auto, minilm or hashing")
    needs = judge_rows(cfg, rows)
    if needs and cfg.judge is None and cfg.prm is None:
        raise ConfigError(f"{where}: rows {needs} need a judge: set judge: <folder from `she train prm`> "
                          "or a prm: section (prm: {} for the defaults)")


def load_compare_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> CompareConfig:
    cfg = load_config(CompareConfig, path, overrides)
    check_compare_config(cfg, str(path) if path else "config")
    return cfg


# -- the RL job of a row, and rows that share one ---------------------------------------------------------


def rl_job_config(cfg: CompareConfig, row: str, *, model: str, output_dir: str, judge: str | None,
                  reward_model: str | None = None, max_steps: int | None = None,
                  teacher: str | None = None) -> RLJobConfig:
    """The RL job of ``row``: the shared ``rl:`` section, the shared start, and the row's own change
    (:attr:`she.recipes.compare.rows.Row.rl`). ``teacher``: the folder of a row that pays a teacher's term when
    ``rl.teacher`` is not set (the comparison's own cross-encoder, :func:`teacher_rows`)."""
    base = build_section(RLJobConfig, cfg.rl, "rl", RL_FIXED)
    spec = ROWS.get(row)
    if spec is None or spec.rl is None:
        raise ValueError(f"{row!r} is not an RL row")
    change = dict(spec.rl)
    seed = cfg.seed + int(change.pop("seed_offset", 0))
    if "regroup_generations" in change:  # the same rollouts a step, spread over more prompts (equal budget)
        g = int(change.pop("regroup_generations"))
        per_step = base.prompts_per_step * base.num_generations
        if per_step % g:  # check_compare_config says it first, with the config's name
            raise ValueError(f"{row}: {per_step} rollouts a step cannot be regrouped into groups of {g}")
        change.update(num_generations=g, prompts_per_step=per_step // g)
    # the shared rl: section's teacher (a cross-encoder folder) reaches only the rows that ask for it
    # (a row may also name its teacher itself: `uniform`, the KL anchor's control)
    wanted = change.pop("teacher", None)
    if wanted is True and not (base.teacher or teacher):
        raise UserError(f"row {row!r} pays a teacher's term: set rl.teacher to a cross-encoder folder, or let the "
                        "comparison train its own (the cross_encoder row's job)")
    chosen = (base.teacher or teacher) if wanted is True else wanted
    kw: dict[str, Any] = {"model": str(model), "output_dir": str(output_dir), "data": cfg.data, "seed": seed,
                          "teacher": chosen, **change}
    if spec.reward_model:
        kw["reward_model"] = str(reward_model)
    examiner = kw.get("examiner", base.examiner)
    kw["judge"] = str(judge) if examiner in ("hybrid", "blend") and judge is not None else None
    if max_steps is not None:
        kw["max_steps"] = max_steps
    if cfg.eval_checkpoints:  # the Macro-F1-over-training curve reads every checkpoint
        kw["save_total_limit"] = None
    job = dataclasses.replace(base, **kw)
    # the estimator spelled out: rows that run the same estimator share a job, and grpo rows run grpo whatever
    # the rl: section's advantage
    from she.training.rl import resolved_advantage

    return dataclasses.replace(job, advantage=resolved_advantage(job))


def _job_key(rl: RLJobConfig) -> str:
    d = to_dict(rl)
    d.pop("output_dir")
    return json.dumps(d, sort_keys=True, default=str)


def teacher_rows(cfg: CompareConfig, rows: Sequence[str]) -> list[str]:
    """The rows that pay a teacher's term and so need a teacher folder: ``rl.teacher``, else the comparison's own
    cross-encoder (trained on the same training sample as the SFT; the ``cross_encoder`` row's job)."""
    return [r for r in rows if (ROWS[r].rl or {}).get("teacher") is True]


def plan_same_as(cfg: CompareConfig, rows: Sequence[str]) -> dict[str, str]:
    """``{row: earlier row}`` for RL rows whose job would be identical to an earlier row's (trained once):
    srpo_no_step_reward is always grpo's job; srpo_verifier_only is srpo's when `rl.examiner` is verifier."""
    seen: dict[str, str] = {}
    out: dict[str, str] = {}
    for row in rows:
        if row not in RL_ROWS:
            continue
        key = _job_key(rl_job_config(cfg, row, model="SFT", output_dir="-", judge="JUDGE", reward_model="RM",
                                     teacher="TEACHER"))
        if key in seen:
            out[row] = seen[key]
        else:
            seen[key] = row
    return out


# -- budgets ------------------------------------------------------------------------------------------------


def rl_generations(steps: int, prompts_per_step: int, num_generations: int) -> int:
    """Policy rollouts of an RL run: every step samples ``num_generations`` completions for each of
    ``prompts_per_step`` prompts."""
    return steps * prompts_per_step * num_generations


def strict_rl_steps(max_steps: int, prompts_per_step: int, num_generations: int, extra_generations: int) -> int:
    """RL steps left when ``extra_generations`` (e.g. difficulty estimation) come out of the same budget.

    The extra generations are converted to RL steps and rounded *up*, so the row never spends more than
    ``rl_generations(max_steps, ...)`` in total. Example: 20 steps x 2 prompts x 4 generations = 160; a
    pool of 20 prompts x k=4 = 80 generations = 10 steps; 10 steps remain.
    """
    per_step = prompts_per_step * num_generations
    return max_steps - math.ceil(extra_generations / per_step)


def split_stage_steps(fixed: Sequence[int | None], total: int) -> list[int]:
    """Stage lengths that add up to ``total``: fixed lengths stay, the others share the rest equally
    (the remainder goes to the last of them). Raises when that is impossible: an RL row may not get
    more or fewer steps than its budget."""
    if total < 1:
        raise UserError(f"no RL step is left for the curriculum (budget {total} steps)")
    fixed_sum = sum(s for s in fixed if s is not None)
    free = [i for i, s in enumerate(fixed) if s is None]
    rest = total - fixed_sum
    if not free:
        if rest != 0:
            raise UserError(f"the stages' advance.steps add up to {fixed_sum} but the budget is {total} steps; "
                            "leave one stage's steps unset to take the rest")
        return list(fixed)  # type: ignore[arg-type]
    if rest < len(free):
        raise UserError(f"{total} budget steps cannot give each of the {len(fixed)} stages at least one step "
                        f"(fixed stages take {fixed_sum})")
    share = rest // len(free)
    out = [s if s is not None else share for s in fixed]
    out[free[-1]] += rest - share * len(free)
    return out  # type: ignore[return-value]


def default_stages(total: int):
    """easy (pass rate >= 0.5, the first quarter of the steps) then main (everything selected)."""
    from she.sampling.curriculum import AdvanceRule, Stage, StageFilter

    if total < 2:
        raise UserError(f"the default two-stage curriculum needs at least 2 RL steps, the budget leaves {total}")
    easy = max(1, total // 4)
    return [Stage("easy", StageFilter(pass_rate=(0.5, 1.0)), {}, AdvanceRule(steps=easy)),
            Stage("main", StageFilter(), {}, AdvanceRule(steps=total - easy))]

# -- records ------------------------------------------------------------------------------------------------


def seeded_subset(records: Sequence[Record], n: int | None, salt: str) -> list[Record]:
    """``n`` records drawn with a seed derived from ``salt``, in input order (all when n is None or large)."""
    if n is None or len(records) <= n:
        return list(records)
    keep = set(random.Random(salt).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def group_of(record: Record) -> str:
    """The bootstrap cluster of a record: its query (rows of one query share its difficulty)."""
    return str(record.query_id) if record.query_id is not None else f"q:{record.query}"


def last_step(log_history: Sequence[Mapping[str, Any]]) -> int:
    steps = [int(h["step"]) for h in log_history if isinstance(h, Mapping) and "step" in h]
    return max(steps) if steps else 0


__all__ = ["BUDGETS", "RL_PROMPTS", "check_compare_config", "default_stages", "group_of", "judge_rows", "last_step",
           "load_compare_config", "plan_same_as", "rl_generations", "rl_job_config", "seeded_subset", "selected_rows",
           "split_stage_steps", "strict_rl_steps"]
