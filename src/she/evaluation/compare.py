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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from she.config import (
    ConfigError,
    CrossEncoderJobConfig,
    canonical_key,
    DataConfig,
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
from she.reasoning.schema import in_schema

log = logging.getLogger(__name__)

# -- rows ------------------------------------------------------------------------------------------------

MAIN_ROWS = ("majority", "label_only_sft", "sft", "dpo", "grpo", "rm_grpo", "srpo", "srpo_full", "cross_encoder")
ABLATION_ROWS = ("srpo_no_step_reward", "srpo_verifier_only", "srpo_judge_only", "srpo_full_no_difficulty",
                 "srpo_full_no_diverse", "srpo_full_no_curriculum")
ALL_ROWS = MAIN_ROWS + ABLATION_ROWS
# plain RL rows: one run_rl_job each (rows with identical job configs share one run, see plan_same_as)
RL_ROWS = ("grpo", "rm_grpo", "srpo", "srpo_no_step_reward", "srpo_verifier_only", "srpo_judge_only")
# data-pipeline rows: difficulty band -> diverse selection -> curriculum, each part removable
FULL_ROWS = ("srpo_full", "srpo_full_no_difficulty", "srpo_full_no_diverse", "srpo_full_no_curriculum")

ROW_INFO: dict[str, str] = {
    "majority": "predicts the most frequent label of the training split (before any balancing) for every pair",
    "label_only_sft": "SFT from the base model on `Verdict: <label>` only (no reasoning)",
    "sft": "SFT on reasoning traces: the shared start of every generative row below",
    "dpo": "DPO on pass@N preference pairs sampled from the SFT policy",
    "grpo": "GRPO from SFT, outcome (label) reward only",
    "rm_grpo": "GRPO whose reward is a scalar reward model trained on the same pass@N pairs",
    "srpo": "SRPO: GRPO plus per-step rewards from the examiner of the `rl:` section",
    "srpo_full": "SRPO on a difficulty-banded, diverse prompt set, trained as a curriculum",
    "cross_encoder": "BERT-style cross-encoder classifier over [query, product] (non-generative anchor)",
    "srpo_no_step_reward": "SRPO with step rewards off (the same job as grpo, reused)",
    "srpo_verifier_only": "SRPO with the offline verifier as the only step examiner",
    "srpo_judge_only": "SRPO with the judge as the step examiner (blend, judge_weight 1.0)",
    "srpo_full_no_difficulty": "srpo_full without the difficulty band (no pass-rate estimation)",
    "srpo_full_no_diverse": "srpo_full with a random (not diverse) subset of the band",
    "srpo_full_no_curriculum": "srpo_full trained in one stage on the selected prompts",
}

BUDGETS = ("strict", "rl")
STATE_FILE = "compare_state.json"

# keys of each section that the driver sets itself (a value in the config would be silently overridden)
SFT_FIXED = ("model", "output_dir", "data", "target", "seed")
RL_FIXED = ("model", "output_dir", "data", "step_rewards", "reward_model", "judge", "seed", "per_device_batch_size")
PASSN_FIXED = ("seed",)
DPO_FIXED = ("model", "output_dir", "data", "rollouts", "seed")
RM_FIXED = ("model", "policy", "output_dir", "data", "rollouts", "seed")
CE_FIXED = ("output_dir", "data", "eval_split", "seed")
PRM_FIXED = ("policy", "output_dir", "data", "seed")
CURRICULUM_FIXED = ("pass_rates",)


# -- config ----------------------------------------------------------------------------------------------


@dataclass
class CompareEvalConfig:
    split: str = "test"  # train | validation | test
    max_eval: int | None = None  # seeded subsample of that split (None = all of it)
    batch_size: int = 16
    max_new_tokens: int = 96
    bf16: bool = True


@dataclass
class BootstrapConfig:
    n: int = 1000  # bootstrap replicates (resampling whole query groups)
    seed: int = 0
    alpha: float = 0.05  # 0.05 = 95 % intervals


@dataclass
class DifficultyConfig:
    """srpo_full's difficulty band: pass rates of the SFT policy under k rollouts on a pool of train prompts."""

    max_records: int | None = 200  # the pool: a seeded subsample of train (None = all); all srpo_full rows use it
    k: int | None = None  # rollouts per prompt (None = rl.num_generations)
    low: float = 0.0
    high: float = 1.0
    inclusive: bool = False  # default keeps 0 < p < 1: the prompts with GRPO reward variance
    cache_file: str | None = None  # default <out>/difficulty/pass_rates.jsonl (resumable)
    batch_size: int = 32
    max_new_tokens: int | None = None  # None = rl.max_completion_length (a generation costs what an RL one does)
    temperature: float | None = None  # None = rl.temperature
    bf16: bool = True


@dataclass
class DiverseConfig:
    n: int | None = None  # prompts to select (None = what the RL run will see: its steps x prompts_per_step)
    embedder: str = "auto"  # auto | minilm | hashing
    n_clusters: int | None = None
    dup_threshold: float = 0.95


@dataclass
class CompareConfig:
    """``she compare CONFIG``: see the module docstring and docs/baselines.md ("she compare").

    Job sections (``sft``, ``rl``, ``passn``, ``dpo``, ``rm``, ``cross_encoder``, ``prm``, ``curriculum``)
    are mappings of the fields of the job's own config; the fields the driver sets itself (start model,
    output folder, data, seed, ...) are refused with the key named.
    """

    model: str = "smollm2-135m"  # base model: SFT and label-only SFT start here
    output_dir: str = "runs/compare"
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # every job's seed
    sft: dict[str, Any] = field(default_factory=dict)  # SFTJobConfig fields (also used by label_only_sft)
    sft_model: str | None = None  # reuse an existing SFT folder instead of training <out>/sft
    judge: str | None = None  # judge folder (`she train prm`); None = train one from `prm:` when a row needs it
    rl: dict[str, Any] = field(default_factory=dict)  # RLJobConfig fields shared by every RL row
    passn: dict[str, Any] = field(default_factory=dict)  # PassAtNConfig fields shared by dpo and rm
    dpo: dict[str, Any] = field(default_factory=dict)
    rm: dict[str, Any] = field(default_factory=dict)
    cross_encoder: dict[str, Any] = field(default_factory=dict)
    prm: dict[str, Any] | None = None  # PRMJobConfig fields; `prm: {}` = defaults
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    diverse: DiverseConfig = field(default_factory=DiverseConfig)
    curriculum: dict[str, Any] | None = None  # CurriculumConfig fields (stages); None = the default two stages
    rows: list[str] | None = None  # None = every row
    budget: str = "strict"  # strict: difficulty rollouts are paid with srpo_full's RL steps | rl: not
    eval: CompareEvalConfig = field(default_factory=CompareEvalConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    eval_checkpoints: bool = False  # also score intermediate RL checkpoints (costly)
    checkpoint_eval_max: int = 50  # eval pairs per checkpoint


def _build(cls: type, section: Mapping[str, Any] | None, where: str, fixed_keys: Sequence[str], **fixed: Any):
    """``cls`` from a config section plus the driver's own values; a section naming a driver key fails."""
    section = dict(section or {})
    bad = sorted({canonical_key(cls, k, warn=False) for k in section} & set(fixed_keys), key=str)
    if bad:
        raise ConfigError(f"{where}: {bad} are set by she compare itself and cannot be given here")
    obj = from_dict(cls, section, where)
    return dataclasses.replace(obj, **fixed) if fixed else obj


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
    if cfg.bootstrap.n < 1 or not 0 < cfg.bootstrap.alpha < 1:
        raise ConfigError(f"{where}.bootstrap: need n >= 1 and 0 < alpha < 1")
    if cfg.checkpoint_eval_max < 1:
        raise ConfigError(f"{where}.checkpoint_eval_max: must be >= 1")
    _build(SFTJobConfig, cfg.sft, f"{where}.sft", SFT_FIXED)
    rl = _build(RLJobConfig, cfg.rl, f"{where}.rl", RL_FIXED)
    if rl.max_steps < 1 or rl.prompts_per_step < 1 or rl.num_generations < 1:
        raise ConfigError(f"{where}.rl: max_steps, prompts_per_step and num_generations must be >= 1 "
                          "(they define the equal budget)")
    _build(PassAtNConfig, cfg.passn, f"{where}.passn", PASSN_FIXED)
    _build(DPOJobConfig, cfg.dpo, f"{where}.dpo", DPO_FIXED)
    _build(RewardModelJobConfig, cfg.rm, f"{where}.rm", RM_FIXED)
    _build(CrossEncoderJobConfig, cfg.cross_encoder, f"{where}.cross_encoder", CE_FIXED)
    if cfg.prm is not None:
        _build(PRMJobConfig, cfg.prm, f"{where}.prm", PRM_FIXED)
    if cfg.curriculum is not None:
        cur = _build(CurriculumConfig, cfg.curriculum, f"{where}.curriculum", CURRICULUM_FIXED)
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


# -- budgets (pure) --------------------------------------------------------------------------------------


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
        raise ValueError(f"no RL step is left for the curriculum (budget {total} steps)")
    fixed_sum = sum(s for s in fixed if s is not None)
    free = [i for i, s in enumerate(fixed) if s is None]
    rest = total - fixed_sum
    if not free:
        if rest != 0:
            raise ValueError(f"the stages' advance.steps add up to {fixed_sum} but the budget is {total} steps; "
                             "leave one stage's steps unset to take the rest")
        return list(fixed)  # type: ignore[arg-type]
    if rest < len(free):
        raise ValueError(f"{total} budget steps cannot give each of the {len(fixed)} stages at least one step "
                         f"(fixed stages take {fixed_sum})")
    share = rest // len(free)
    out = [s if s is not None else share for s in fixed]
    out[free[-1]] += rest - share * len(free)
    return out  # type: ignore[return-value]


def default_stages(total: int):
    """easy (pass rate >= 0.5, the first quarter of the steps) then main (everything selected)."""
    from she.sampling.curriculum import AdvanceRule, Stage, StageFilter

    if total < 2:
        raise ValueError(f"the default two-stage curriculum needs at least 2 RL steps, the budget leaves {total}")
    easy = max(1, total // 4)
    return [Stage("easy", StageFilter(pass_rate=(0.5, 1.0)), {}, AdvanceRule(steps=easy)),
            Stage("main", StageFilter(), {}, AdvanceRule(steps=total - easy))]


# -- what each row needs (pure given the config) -------------------------------------------------------


def _examiner_of(cfg: CompareConfig, row: str) -> str:
    rl = from_dict(RLJobConfig, {k: v for k, v in cfg.rl.items() if k not in RL_FIXED})
    if row == "srpo_verifier_only":
        return "verifier"
    if row == "srpo_judge_only":
        return "blend"
    return rl.examiner


def judge_rows(cfg: CompareConfig, rows: Sequence[str]) -> list[str]:
    """Rows whose examiner reads a judge (hybrid or blend); GRPO rows run the examiner for step metrics too."""
    return [r for r in rows if r in RL_ROWS + FULL_ROWS and _examiner_of(cfg, r) in ("hybrid", "blend")]


def rl_job_config(cfg: CompareConfig, row: str, *, model: str, output_dir: str, judge: str | None,
                  reward_model: str | None = None, max_steps: int | None = None) -> RLJobConfig:
    """The RL job of ``row``: the shared ``rl:`` section, the shared start, and the row's own change."""
    base = _build(RLJobConfig, cfg.rl, "rl", RL_FIXED)
    kw: dict[str, Any] = {"model": str(model), "output_dir": str(output_dir), "data": cfg.data, "seed": cfg.seed}
    if row in ("grpo", "srpo_no_step_reward"):
        kw["step_rewards"] = False
    elif row == "rm_grpo":
        kw.update(step_rewards=False, reward_model=str(reward_model))
    elif row == "srpo_verifier_only":
        kw.update(step_rewards=True, examiner="verifier")
    elif row == "srpo_judge_only":
        # blend with weight 1: the judge's score wherever it has one; the verifier only fills the steps the
        # judge cannot score (cut off by its max_length) -- rewards/hybrid.py has no pure judge mode
        kw.update(step_rewards=True, examiner="blend", judge_weight=1.0)
    elif row in ("srpo", *FULL_ROWS):
        kw["step_rewards"] = True
    else:
        raise ValueError(f"{row!r} is not an RL row")
    examiner = kw.get("examiner", base.examiner)
    kw["judge"] = str(judge) if examiner in ("hybrid", "blend") and judge is not None else None
    if max_steps is not None:
        kw["max_steps"] = max_steps
    if cfg.eval_checkpoints:  # the Macro-F1-over-training curve reads every checkpoint
        kw["save_total_limit"] = None
    return dataclasses.replace(base, **kw)


def _job_key(rl: RLJobConfig) -> str:
    d = to_dict(rl)
    d.pop("output_dir")
    return json.dumps(d, sort_keys=True, default=str)


def plan_same_as(cfg: CompareConfig, rows: Sequence[str]) -> dict[str, str]:
    """``{row: earlier row}`` for RL rows whose job would be identical to an earlier row's (trained once):
    srpo_no_step_reward is always grpo's job; srpo_verifier_only is srpo's when `rl.examiner` is verifier."""
    seen: dict[str, str] = {}
    out: dict[str, str] = {}
    for row in rows:
        if row not in RL_ROWS:
            continue
        key = _job_key(rl_job_config(cfg, row, model="SFT", output_dir="-", judge="JUDGE", reward_model="RM"))
        if key in seen:
            out[row] = seen[key]
        else:
            seen[key] = row
    return out


# -- small helpers -----------------------------------------------------------------------------------


def _done(folder: Path) -> bool:
    """A finished job leaves a save_pretrained folder (its config.json is written with the weights)."""
    return (folder / "config.json").exists()


def _write_json(path: Path, obj: Any) -> None:
    from she.data.validation import atomic_write_lines

    atomic_write_lines(path, [json.dumps(obj, indent=2, default=str) + "\n"])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); delete it to recompute") from None


def seeded_subset(records: Sequence[Record], n: int | None, salt: str) -> list[Record]:
    """``n`` records drawn with a seed derived from ``salt``, in input order (all when n is None or large)."""
    if n is None or len(records) <= n:
        return list(records)
    keep = set(random.Random(salt).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def group_of(record: Record) -> str:
    """The bootstrap cluster of a record: its query (rows of one query share its difficulty)."""
    return str(record.query_id) if record.query_id is not None else f"q:{record.query}"


def majority_label(records: Sequence[Record], labels: Sequence[str]) -> str:
    """The most frequent label; ties go to the label that comes first in the taxonomy."""
    counts = Counter(r.label for r in records)
    if not counts:
        raise ValueError("majority baseline: no training records")
    return max(labels, key=lambda lab: (counts.get(lab, 0), -list(labels).index(lab)))


def last_step(log_history: Sequence[Mapping[str, Any]]) -> int:
    steps = [int(h["step"]) for h in log_history if isinstance(h, Mapping) and "step" in h]
    return max(steps) if steps else 0


def row_metrics(records: Sequence[Record], predicted: Mapping[str, str | None], labels: Sequence[str], *,
                n_boot: int, seed: int, alpha: float = 0.05) -> dict[str, Any]:
    """Macro F1 / accuracy with percentile bootstrap CIs that resample whole query groups, and class-wise F1."""
    from she.evaluation.metrics import bootstrap_ci, classification_report

    missing = [r.id for r in records if r.id not in predicted]
    if missing:
        raise ValueError(f"{len(missing)} evaluation record(s) have no prediction (first: {missing[0]!r})")
    y_true = [r.label for r in records]
    y_pred = [predicted[r.id] for r in records]
    groups = [group_of(r) for r in records]
    rep = classification_report(y_true, y_pred, labels)
    out = {"macro_f1": rep["macro_f1"], "accuracy": rep["accuracy"], "n": rep["n"], "n_invalid": rep["n_invalid"],
           "n_groups": len(set(groups)), "per_class_f1": {k: v["f1"] for k, v in rep["per_class"].items()}}
    for metric in ("macro_f1", "accuracy"):
        lo, hi = bootstrap_ci(y_true, y_pred, labels, metric=metric, n_boot=n_boot, seed=seed, alpha=alpha,
                              groups=groups)
        out[f"{metric}_ci"] = [lo, hi]
    return out


# -- the driver ------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    cfg: CompareConfig
    out: Path
    rows: list[str]
    train: list[Record]
    evals: list[Record]
    labels: list[str]
    state: dict[str, Any]
    command: str
    same_as: dict[str, str]
    memo: dict[str, Any] = field(default_factory=dict)

    # state ------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(self.out / STATE_FILE, self.state)

    def job(self, name: str, done: Callable[[], bool], run: Callable[[], Any]) -> None:
        """Run a job unless its output exists; record its wall time in the state file."""
        if done():
            log.info("compare: %s already done", name)
            return
        log.info("compare: running %s", name)
        t = time.perf_counter()
        run()
        self.state["jobs"][name] = {"seconds": round(time.perf_counter() - t, 2)}
        self.save_state()

    def seconds(self, *jobs: str) -> float | None:
        vals = [self.state["jobs"].get(j, {}).get("seconds") for j in jobs]
        return None if any(v is None for v in vals) else round(sum(vals), 2)

    # shared jobs -------------------------------------------------------------------------------------
    @property
    def rl_base(self) -> RLJobConfig:
        return _build(RLJobConfig, self.cfg.rl, "rl", RL_FIXED)

    def sft_dir(self) -> Path:
        if self.cfg.sft_model:
            p = Path(self.cfg.sft_model)
            if not _done(p):
                raise FileNotFoundError(f"sft_model {p}: not a model folder (no config.json)")
            return p
        final = self.out / "sft" / "final"

        def run() -> None:
            from she.training.sft import train_sft

            train_sft(self.sft_config("reasoning", self.out / "sft"), self.train)

        self.job("sft", lambda: _done(final), run)
        return final

    def sft_config(self, target: str, output_dir: Path) -> SFTJobConfig:
        cfg = _build(SFTJobConfig, self.cfg.sft, "sft", SFT_FIXED, model=self.cfg.model, output_dir=str(output_dir),
                     data=self.cfg.data, target=target, seed=self.cfg.seed)
        if target == "label":  # teacher traces would replace the `Verdict: <label>` targets
            cfg = dataclasses.replace(cfg, traces_file=None)
        return cfg

    def judge_dir(self) -> str:
        if self.cfg.judge:
            if not (Path(self.cfg.judge) / "config.json").exists():
                raise FileNotFoundError(f"judge {self.cfg.judge}: not a judge folder (no config.json)")
            return self.cfg.judge
        folder = self.out / "prm" / "judge"

        def run() -> None:
            from she.training.prm import run_prm_job

            pcfg = _build(PRMJobConfig, self.cfg.prm, "prm", PRM_FIXED, policy=str(self.sft_dir()),
                          output_dir=str(self.out / "prm"), data=self.cfg.data, seed=self.cfg.seed)
            run_prm_job(pcfg, progress=False)

        self.job("prm", lambda: _done(folder), run)
        return str(folder)

    def passn(self) -> PassAtNConfig:
        """The pass@N settings shared by DPO and the RM; unset budget keys follow the RL budget."""
        rl = self.rl_base
        given = self.cfg.passn
        defaults = {"n": rl.num_generations, "max_records": rl.max_steps * rl.prompts_per_step,
                    "max_new_tokens": rl.max_completion_length, "temperature": rl.temperature,
                    "cache_file": str(self.out / "passn_rollouts.jsonl")}
        return _build(PassAtNConfig, {**{k: v for k, v in defaults.items() if k not in given}, **given}, "passn",
                      PASSN_FIXED, seed=self.cfg.seed)

    def rm_dir(self) -> Path:
        final = self.out / "rm" / "final"

        def run() -> None:
            from she.training.reward_model import run_reward_model_job

            sft = str(self.sft_dir())
            rcfg = _build(RewardModelJobConfig, self.cfg.rm, "rm", RM_FIXED, model=sft, policy=sft,
                          output_dir=str(self.out / "rm"), data=self.cfg.data, rollouts=self.passn(),
                          seed=self.cfg.seed)
            run_reward_model_job(rcfg, self.train, progress=False)

        self.job("rm", lambda: _done(final), run)
        return final

    # srpo_full pipeline ------------------------------------------------------------------------------
    def pool(self) -> list[Record]:
        return seeded_subset(self.train, self.cfg.difficulty.max_records, f"{self.cfg.seed}:compare-pool")

    def difficulty_k(self) -> int:
        return self.cfg.difficulty.k or self.rl_base.num_generations

    def difficulty_generations(self) -> int:
        return len(self.pool()) * self.difficulty_k()

    def full_steps(self, row: str) -> int:
        rl = self.rl_base
        if self.cfg.budget == "strict" and row != "srpo_full_no_difficulty":
            return strict_rl_steps(rl.max_steps, rl.prompts_per_step, rl.num_generations,
                                   self.difficulty_generations())
        return rl.max_steps

    def stages(self, row: str):
        """The curriculum of a srpo_full row with every stage's length filled in; without a difficulty
        estimate there are no pass rates, so stage filters on them are dropped (and said so)."""
        from she.sampling.curriculum import AdvanceRule, CurriculumConfig

        total = self.full_steps(row)
        if self.cfg.curriculum is None:
            stages = default_stages(total)
        else:
            cur = _build(CurriculumConfig, self.cfg.curriculum, "curriculum", CURRICULUM_FIXED)
            lengths = split_stage_steps([st.advance.steps for st in cur.stages], total)
            stages = [dataclasses.replace(st, advance=AdvanceRule(steps=n, plateau=st.advance.plateau))
                      for st, n in zip(cur.stages, lengths)]
        if row == "srpo_full_no_difficulty":
            stages = [dataclasses.replace(st, filter=dataclasses.replace(st.filter, pass_rate=None)) for st in stages]
        return stages

    def run_folders(self, row: str) -> list[Path]:
        """The training folders of a row, in training order: one per curriculum stage for the srpo_full rows
        that have a curriculum, else ``<out>/<row>``. Readers of log histories and checkpoints walk them in
        this order and chain their step counts."""
        if row in FULL_ROWS and row != "srpo_full_no_curriculum":
            from she.sampling.curriculum import stage_dir

            return [stage_dir(self.out / row, i, st) for i, st in enumerate(self.stages(row))]
        return [self.out / row]

    def pass_rates(self) -> dict[str, float]:
        """Pass rates of the pool under the SFT policy (estimated once; report at <out>/difficulty/report.json)."""
        report_path = self.out / "difficulty" / "report.json"
        d = self.cfg.difficulty
        k = self.difficulty_k()

        def run() -> None:
            from she.sampling.difficulty import difficulty_report, estimate_pass_rates, pass_rate_band

            rl = self.rl_base
            pool = self.pool()
            cache = d.cache_file or str(self.out / "difficulty" / "pass_rates.jsonl")
            rates = estimate_pass_rates(str(self.sft_dir()), pool, k, cache, batch_size=d.batch_size,
                                        temperature=d.temperature if d.temperature is not None else rl.temperature,
                                        max_new_tokens=d.max_new_tokens or rl.max_completion_length,
                                        taxonomy=self.cfg.data.taxonomy, bf16=d.bf16, seed=self.cfg.seed,
                                        progress=False)
            kept = pass_rate_band(rates, d.low, d.high, d.inclusive)
            rep = difficulty_report(rates, kept, k, self.out / "difficulty" / "histogram.png")
            rep.update(k=k, generations=len(pool) * k, cache_file=cache, pass_rates=rates,
                       band={"low": d.low, "high": d.high, "inclusive": d.inclusive})
            _write_json(report_path, rep)

        self.job("difficulty", report_path.exists, run)
        rep = _read_json(report_path)
        if rep.get("k") != k or set(rep.get("pass_rates", {})) != {r.id for r in self.pool()}:
            raise ValueError(f"{report_path} was computed for another pool or k; delete the difficulty folder "
                             "or use another output_dir")
        return {str(i): float(p) for i, p in rep["pass_rates"].items()}

    def selection(self, row: str) -> tuple[list[Record], dict[str, float] | None]:
        """The prompts of a srpo_full row (saved to <out>/<row>/selection.json, reused on a rerun)."""
        from she.sampling.difficulty import filter_by_pass_rate

        rl = self.rl_base
        path = self.out / row / "selection.json"
        use_difficulty = row != "srpo_full_no_difficulty"
        rates = self.pass_rates() if use_difficulty else None
        by_id = {r.id: r for r in self.train}
        if path.exists():
            sel = _read_json(path)
            unknown = [i for i in sel.get("ids", []) if i not in by_id]
            if unknown or not sel.get("ids"):
                raise ValueError(f"{path}: its ids are not training records of this data ({unknown[:3]}); delete it "
                                 "to select again")
            return [by_id[i] for i in sel["ids"]], rates
        d = self.cfg.difficulty
        pool = self.pool()
        cand = filter_by_pass_rate(pool, rates, d.low, d.high, d.inclusive) if rates is not None else pool
        if not cand:
            raise ValueError(f"{row}: the difficulty band keeps none of the {len(pool)} pool prompts (every pass rate "
                             f"is outside {d.low}..{d.high}); widen difficulty.low/high or enlarge the pool")
        n = self.cfg.diverse.n or self.full_steps(row) * rl.prompts_per_step
        report: dict[str, Any] = {"pool": len(pool), "after_band": len(cand), "n_wanted": n}
        if row == "srpo_full_no_diverse":
            chosen = seeded_subset(cand, n, f"{self.cfg.seed}:compare-random")
            report["selection"] = "seeded random subset"
        else:
            from she.sampling.diverse import diverse_select

            dv = self.cfg.diverse
            chosen, rep = diverse_select(cand, n, embedder=dv.embedder, n_clusters=dv.n_clusters,
                                         dup_threshold=dv.dup_threshold, seed=self.cfg.seed)
            report["selection"] = "diverse_select"
            report["diverse"] = rep
        report["ids"] = [r.id for r in chosen]
        if len(cand) <= n:
            report["whole_band"] = True
            log.warning("%s: the band holds %d prompts and %d are wanted, so every one is kept and the selection "
                        "method does not matter; enlarge difficulty.max_records for a diverse-vs-random contrast",
                        row, len(cand), n)
        _write_json(path, report)
        return chosen, rates

    def note(self, row: str) -> str | None:
        """Why a row cannot show the effect it ablates, when its inputs turned out identical to srpo_full's."""
        if row != "srpo_full_no_diverse":
            return None
        mine, full = (_read_json(p) if p.exists() else None
                      for p in (self.out / row / "selection.json", self.out / "srpo_full" / "selection.json"))
        if not mine or not full or sorted(mine.get("ids", [])) != sorted(full.get("ids", [])):
            return None
        return (f"selected the same {len(mine['ids'])} prompts as srpo_full (the band held {mine.get('after_band')}, "
                f"{mine.get('n_wanted')} were wanted), so it cannot show an effect of diverse sampling at this size")

    # rows ------------------------------------------------------------------------------------------
    def model_of(self, row: str) -> tuple[Path | None, list[str]]:
        """Run (or skip) the jobs of ``row``; returns its model folder and the job names it is charged with."""
        if row == "majority":
            return None, []
        if row == "cross_encoder":
            final = self.out / "cross_encoder" / "final"

            def run_ce() -> None:
                from she.training.cross_encoder import run_cross_encoder_job

                ccfg = _build(CrossEncoderJobConfig, self.cfg.cross_encoder, "cross_encoder", CE_FIXED,
                              output_dir=str(self.out / "cross_encoder"), data=self.cfg.data, eval_split="none",
                              seed=self.cfg.seed)
                run_cross_encoder_job(ccfg, self.train, None)

            self.job("cross_encoder", lambda: _done(final), run_ce)
            return final, ["cross_encoder"]
        if row == "label_only_sft":
            final = self.out / "label_only_sft" / "final"

            def run_label() -> None:
                from she.training.sft import train_sft

                train_sft(self.sft_config("label", self.out / "label_only_sft"), self.train)

            self.job("label_only_sft", lambda: _done(final), run_label)
            return final, ["label_only_sft"]
        sft = self.sft_dir()
        if row == "sft":
            return sft, ["sft"] if not self.cfg.sft_model else []
        if row == "dpo":
            final = self.out / "dpo" / "final"

            def run_dpo() -> None:
                from she.training.dpo import run_dpo_job

                dcfg = _build(DPOJobConfig, self.cfg.dpo, "dpo", DPO_FIXED, model=str(sft),
                              output_dir=str(self.out / "dpo"), data=self.cfg.data, rollouts=self.passn(),
                              seed=self.cfg.seed)
                run_dpo_job(dcfg, self.train, progress=False)

            self.job("dpo", lambda: _done(final), run_dpo)
            return final, ["dpo"]
        if row in self.same_as:
            return self.model_of(self.same_as[row])
        judge = self.judge_dir() if row in judge_rows(self.cfg, [row]) else None
        if row in RL_ROWS:
            rm = str(self.rm_dir()) if row == "rm_grpo" else None
            final = self.out / row / "final"

            def run_rl() -> None:
                from she.training.rl import run_rl_job

                run_rl_job(rl_job_config(self.cfg, row, model=str(sft), output_dir=str(self.out / row), judge=judge,
                                         reward_model=rm), self.train)

            self.job(row, lambda: _done(final), run_rl)
            return final, (["rm", row] if row == "rm_grpo" else [row])
        if row in FULL_ROWS:
            return self.full_row(row, sft, judge)
        raise ValueError(f"unknown row {row!r}")

    def check_batches(self, row: str, records: Sequence[Record], rates: Mapping[str, float] | None, stages) -> None:
        """Every RL run needs at least ``prompts_per_step`` distinct prompts: TRL's sampler drops an incomplete
        batch, so a smaller set would "train" zero steps without an error."""
        from she.sampling.curriculum import apply_stage_filter

        need = self.rl_base.prompts_per_step
        parts = [("the selection", list(records))] if not stages else [
            (f"stage {st.name!r}", apply_stage_filter(records, st, rates, seed=self.cfg.seed)) for st in stages]
        for what, recs in parts:
            if len(recs) < need:
                raise ValueError(f"{row}: {what} has {len(recs)} prompt(s) but every RL step needs "
                                 f"prompts_per_step={need}; enlarge difficulty.max_records, widen the band or the "
                                 "stage filters")

    def full_row(self, row: str, sft: Path, judge: str | None) -> tuple[Path, list[str]]:
        from she.sampling.curriculum import CurriculumConfig, stage_dir

        steps = self.full_steps(row)
        jobs = ["difficulty", row] if row != "srpo_full_no_difficulty" else [row]
        rl_cfg = rl_job_config(self.cfg, row, model=str(sft), output_dir=str(self.out / row), judge=judge,
                               max_steps=steps)
        if row == "srpo_full_no_curriculum":
            final = self.out / row / "final"

            def run_one() -> None:
                from she.training.rl import run_rl_job

                records, _ = self.selection(row)
                run_rl_job(rl_cfg, records)

            if not _done(final):  # selection (and the pass rates it needs) timed apart from the RL job
                self.check_batches(row, *self.selection(row), None)
            self.job(row, lambda: _done(final), run_one)
            return final, jobs
        stages = self.stages(row)
        final = stage_dir(self.out / row, len(stages) - 1, stages[-1]) / "final"

        def run_cur() -> None:
            from she.sampling.curriculum import run_curriculum

            records, rates = self.selection(row)
            run_curriculum(rl_cfg, CurriculumConfig(stages=stages), records, pass_rates=rates)

        if not _done(final):
            self.check_batches(row, *self.selection(row), stages)
        self.job(row, lambda: _done(final), run_cur)
        return final, jobs

    def log_history(self, row: str) -> list[dict[str, Any]]:
        """The row's trainer log (curriculum stages concatenated, steps made cumulative); [] for non-RL rows."""
        if row not in RL_ROWS + FULL_ROWS:
            return []
        row = self.same_as.get(row, row)
        hist: list[dict[str, Any]] = []
        offset = 0
        for f in self.run_folders(row):
            p = f / "log_history.json"
            if not p.exists():
                continue
            part = [h for h in _read_json(p) if isinstance(h, dict)]
            hist += [{**h, "step": h["step"] + offset} if "step" in h else h for h in part]
            offset += last_step(part)
        return hist

    def generations(self, row: str) -> dict[str, int]:
        """Policy generations the row's method spent (evaluation excluded), by source."""
        row_ref = self.same_as.get(row, row)
        rl = self.rl_base
        out: dict[str, int] = {}
        if row_ref in ("dpo", "rm_grpo"):
            stats = self.out / ("dpo" if row_ref == "dpo" else "rm") / "pairs_stats.json"
            if stats.exists():
                out["pass@n"] = int(_read_json(stats)["generations"])
            else:  # not trained yet (or its folder was removed): what the settings will spend
                p = self.passn()
                out["pass@n"] = p.n * (len(self.train) if p.max_records is None else min(p.max_records, len(self.train)))
        if row_ref in RL_ROWS + FULL_ROWS:
            steps = last_step([h for h in self.log_history(row_ref) if "loss" in h or "reward" in h])
            out["rl"] = rl_generations(steps, rl.prompts_per_step, rl.num_generations)
        if row_ref in FULL_ROWS and row_ref != "srpo_full_no_difficulty":
            out["difficulty"] = self.difficulty_generations()
        return out

    # evaluation --------------------------------------------------------------------------------------
    def predictions(self, row: str, model: Path | None) -> tuple[Path, dict[str, Any]]:
        """``(eval folder, metrics.json)`` of a row, evaluating only when metrics.json is missing."""
        from she.data.validation import atomic_write_lines
        from she.evaluation.metrics import classification_report

        if row in self.same_as:
            return self.predictions(self.same_as[row], model)
        ev = self.out / row / "eval"
        mpath = ev / "metrics.json"
        if not mpath.exists():
            t = time.perf_counter()
            ecfg = self.cfg.eval
            if row == "majority":
                src = self.train
                if self.cfg.data.balance_train:  # a label-balanced sample has no majority: use the split's prior
                    from she.data.sources import load_splits

                    src = load_splits(dataclasses.replace(self.cfg.data, balance_train=False, max_train=None))["train"]
                lab = majority_label(src, self.labels)
                preds = [{"id": r.id, "label": lab, "gold": r.label} for r in self.evals]
            elif row == "cross_encoder":
                from she.training.cross_encoder import CrossEncoderJudge

                preds = CrossEncoderJudge.from_pretrained(model).predict(self.evals, ecfg.batch_size)
            else:
                from she.evaluation.evaluate import evaluate

                evaluate(str(model), self.evals, ev, taxonomy=self.cfg.data.taxonomy, batch_size=ecfg.batch_size,
                         max_new_tokens=ecfg.max_new_tokens, bf16=ecfg.bf16, title=f"she compare: {row}",
                         progress=False)
                preds = None
            if preds is not None:
                m = classification_report([r.label for r in self.evals], [p["label"] for p in preds], self.labels)
                m["model"] = str(model) if model is not None else "majority"
                atomic_write_lines(ev / "predictions.jsonl", (json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
                atomic_write_lines(mpath, [json.dumps(m, indent=2)])
            self.state["evals"][row] = {"seconds": round(time.perf_counter() - t, 2)}
            self.save_state()
        return ev, _read_json(mpath)

    def result(self, row: str, model: Path | None, jobs: list[str]) -> dict[str, Any]:
        ev, m = self.predictions(row, model)
        preds: dict[str, str | None] = {}
        from she.data.validation import iter_jsonl

        for _, d in iter_jsonl(ev / "predictions.jsonl"):
            preds[str(d["id"])] = d.get("label")
        if set(preds) != {r.id for r in self.evals}:
            raise ValueError(f"{ev}/predictions.jsonl covers other records than this evaluation set; delete {ev} "
                             "to evaluate again")
        res = row_metrics(self.evals, preds, self.labels, n_boot=self.cfg.bootstrap.n, seed=self.cfg.bootstrap.seed,
                          alpha=self.cfg.bootstrap.alpha)
        sa = m.get("step_accuracy")
        gens = self.generations(row)
        res.update({
            "kind": "main" if row in MAIN_ROWS else "ablation",
            "description": ROW_INFO[row],
            "same_as": self.same_as.get(row),
            "note": self.note(row),
            "model": str(model) if model is not None else None,
            "eval_dir": str(ev),
            "format_valid_rate": m.get("format_valid_rate"),
            "step_accuracy": sa.get("accuracy") if isinstance(sa, dict) else None,
            "step_checks": m.get("step_checks"),
            "generations": sum(gens.values()),
            "generations_by_source": gens,
            # majority trains nothing; a reused sft_model was trained elsewhere (unknown: None)
            "wall_time_s": self.seconds(*jobs) if jobs else (0.0 if row == "majority" else None),
            "jobs": jobs,
            "eval_seconds": self.state["evals"].get(self.same_as.get(row, row), {}).get("seconds"),
        })
        return res


def _initial_state(out: Path, cfg: CompareConfig) -> dict[str, Any]:
    path = out / STATE_FILE
    now = json.loads(json.dumps(to_dict(cfg), default=str))  # as it reads back from JSON (tuples are lists)
    fresh = {"version": 1, "config": now, "jobs": {}, "evals": {}, "done": [], "rows": {}}
    if not path.exists():
        return fresh
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("jobs"), dict):
        raise ValueError(f"{path}: not a compare state file (no 'jobs' mapping); delete it to start over")
    old = {k: v for k, v in (state.get("config") or {}).items() if k not in ("rows", "eval_checkpoints")}
    new = {k: v for k, v in now.items() if k not in ("rows", "eval_checkpoints")}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        log.warning("%s: the config changed in %s since the last run; finished jobs are reused as they are "
                    "(use another output_dir for a clean comparison)", path, changed)
    for key in ("evals", "rows"):
        state.setdefault(key, {})
    state.setdefault("done", [])
    state["config"] = now
    return state


def _compare_schema(cfg: CompareConfig, *args, **kwargs) -> str:
    """Every row writes the schema of the shared SFT start: ``sft_model``'s ``she.json``, else ``sft.schema``."""
    from she.training.sft import schema_of

    if cfg.sft_model:
        return schema_of(cfg.sft_model)
    return str(cfg.sft.get("schema", "default"))


@in_schema(_compare_schema)
def run_compare(cfg: CompareConfig, *, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison; returns the results dict also written to ``<out>/results.json``."""
    from she.data.labels import get_taxonomy
    from she.data.sources import load_splits

    check_compare_config(cfg)
    rows = selected_rows(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(cfg.data)
    evals = seeded_subset(splits[cfg.eval.split], cfg.eval.max_eval, f"{cfg.seed}:compare-eval")
    if not evals:
        raise ValueError(f"the {cfg.eval.split} split is empty: nothing to evaluate on")
    ctx = _Ctx(cfg=cfg, out=out, rows=rows, train=splits["train"], evals=evals,
               labels=list(get_taxonomy(cfg.data.taxonomy).labels), state=_initial_state(out, cfg),
               command=command or "run_compare(...) (Python API)", same_as=plan_same_as(cfg, rows))
    preflight(ctx)
    _write_json(out / "compare_config.json", to_dict(cfg))
    ctx.save_state()
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        model, jobs = ctx.model_of(row)
        results[row] = ctx.result(row, model, jobs)
        ctx.state["rows"][row] = results[row]
        if row not in ctx.state["done"]:
            ctx.state["done"].append(row)
        ctx.save_state()
    curves = checkpoint_curves(ctx) if cfg.eval_checkpoints else {}
    summary = {
        "command": ctx.command, "seed": cfg.seed, "output_dir": str(out), "budget": budget_summary(ctx),
        "data": data_summary(ctx, splits), "bootstrap": dataclasses.asdict(cfg.bootstrap), "labels": ctx.labels,
        "order": rows, "rows": results, "jobs": ctx.state["jobs"],
    }
    if curves:
        summary["checkpoint_macro_f1"] = curves
    summary["plots"] = write_plots(ctx, results, curves)
    _write_json(out / "results.json", summary)
    (out / "results.md").write_text(results_markdown(summary))
    return summary


def preflight(ctx: _Ctx) -> None:
    """Fail in seconds, not hours: budgets, stage lengths and folders that must exist are checked first."""
    cfg = ctx.cfg
    if cfg.sft_model and not _done(Path(cfg.sft_model)) and any(r not in ("majority", "cross_encoder") for r in ctx.rows):
        raise FileNotFoundError(f"sft_model {cfg.sft_model}: not a model folder (no config.json)")
    if cfg.judge and judge_rows(cfg, ctx.rows) and not (Path(cfg.judge) / "config.json").exists():
        raise FileNotFoundError(f"judge {cfg.judge}: not a judge folder (no config.json)")
    for row in ctx.rows:
        if row not in FULL_ROWS:
            continue
        steps = ctx.full_steps(row)
        if steps < 1:
            rl = ctx.rl_base
            raise ValueError(
                f"{row}: budget strict leaves {steps} RL steps: estimating {len(ctx.pool())} pool prompts x k="
                f"{ctx.difficulty_k()} = {ctx.difficulty_generations()} generations costs more than "
                f"{rl_generations(rl.max_steps, rl.prompts_per_step, rl.num_generations)}; lower "
                "difficulty.max_records or k, raise rl.max_steps, or set budget: rl")
        if row != "srpo_full_no_curriculum":
            try:
                ctx.stages(row)
            except ValueError as e:
                raise ValueError(f"{row}: {e}") from None


def budget_summary(ctx: _Ctx) -> dict[str, Any]:
    rl = ctx.rl_base
    d: dict[str, Any] = {
        "mode": ctx.cfg.budget,
        "rl_generations_per_row": rl_generations(rl.max_steps, rl.prompts_per_step, rl.num_generations),
        "rl": {"max_steps": rl.max_steps, "prompts_per_step": rl.prompts_per_step,
               "num_generations": rl.num_generations, "max_completion_length": rl.max_completion_length},
    }
    if any(r in ("dpo", "rm_grpo") for r in ctx.rows):
        p = ctx.passn()
        d["passn"] = {"n": p.n, "max_records": p.max_records, "max_new_tokens": p.max_new_tokens,
                      "cache_file": p.cache_file}
    if any(r in FULL_ROWS for r in ctx.rows):
        d["difficulty"] = {"pool": len(ctx.pool()), "k": ctx.difficulty_k(),
                           "generations": ctx.difficulty_generations()}
        d["srpo_full_steps"] = {r: ctx.full_steps(r) for r in ctx.rows if r in FULL_ROWS}
    prm_metrics = ctx.out / "prm" / "metrics.json"
    if prm_metrics.exists():
        d["judge_labelling_generations"] = _read_json(prm_metrics).get("labelling", {}).get("generations_total")
    return d


def data_summary(ctx: _Ctx, splits: Mapping[str, list[Record]]) -> dict[str, Any]:
    dc = ctx.cfg.data
    source = (f"{dc.path} (format {dc.format}" + (f", cuts {list(dc.cuts)}" if dc.format == "home-depot" else "") + ")"
              if dc.path else f"synthetic ({dc.synthetic_queries} queries x {dc.synthetic_products_per_query} products, "
              f"seed {dc.split_seed})")
    return {
        "source": source, "taxonomy": dc.taxonomy, "split_seed": dc.split_seed, "balance_train": dc.balance_train,
        "max_train": dc.max_train, "max_eval": dc.max_eval,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "eval_split": ctx.cfg.eval.split, "eval_n": len(ctx.evals),
        "eval_query_groups": len({group_of(r) for r in ctx.evals}),
        "eval_labels": dict(Counter(r.label for r in ctx.evals).most_common()),
        "train_labels": dict(Counter(r.label for r in ctx.train).most_common()),
    }


# -- checkpoints over training ------------------------------------------------------------------------


def evaluate_checkpoint(model_dir: str | Path, records: Sequence[Record], *, taxonomy: str, prompt_style: str,
                        batch_size: int, max_new_tokens: int, bf16: bool) -> float:
    """Macro F1 of one checkpoint folder (a Trainer checkpoint has no she.json, so the prompt style is given)."""
    from she.evaluation.evaluate import score
    from she.evaluation.generate import generate_judgements
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(model_dir))
    js = generate_judgements(model, tok, list(records), taxonomy=taxonomy, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, bf16=bf16, progress=False, prompt_style=prompt_style)
    return float(score(list(records), js, taxonomy)["macro_f1"])


def _checkpoints(ctx: _Ctx, row: str) -> list[tuple[int, Path]]:
    """(cumulative step, folder) of every intact checkpoint of a row, plus its final folder."""
    from she.training.checkpoints import list_checkpoints, verify_checkpoint

    points: list[tuple[int, Path]] = []
    offset = 0
    for f in ctx.run_folders(row):
        for ck in list_checkpoints(f):
            ok, why = verify_checkpoint(ck, check_hashes=False)
            if ok:
                points.append((offset + int(ck.name.split("-")[1]), ck))
            else:
                log.warning("compare: skipping checkpoint %s (%s)", ck, why)
        p = f / "log_history.json"
        offset += last_step(_read_json(p)) if p.exists() else 0
        if _done(f / "final"):  # the end of every stage (and of the run)
            points.append((offset, f / "final"))
    # a checkpoint at the last step and the final folder hold the same weights: keep the final folder
    by_step: dict[int, Path] = {}
    for s, p in points:
        by_step[s] = p
    return sorted(by_step.items())


def checkpoint_curves(ctx: _Ctx) -> dict[str, list[list[float]]]:
    """Macro F1 over training of every RL row on the first ``checkpoint_eval_max`` eval pairs; cached per row
    in ``<out>/<row>/checkpoint_evals.json`` (a rerun scores only new checkpoints). Step 0 is the SFT start."""
    cfg = ctx.cfg
    subset = ctx.evals[: cfg.checkpoint_eval_max]
    style = ctx.rl_base.prompt_style
    kw = dict(taxonomy=cfg.data.taxonomy, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
              bf16=cfg.eval.bf16)
    rl_rows = [r for r in ctx.rows if r in RL_ROWS + FULL_ROWS and r not in ctx.same_as]
    if not rl_rows:
        return {}
    start_cache = ctx.out / "sft" / "checkpoint_evals.json"
    start = _read_json(start_cache) if start_cache.exists() else {}
    sft = str(ctx.sft_dir())
    if sft not in start:
        from she.evaluation.evaluate import prompt_style_of

        start[sft] = {"step": 0, "macro_f1": evaluate_checkpoint(sft, subset, prompt_style=prompt_style_of(sft), **kw)}
        _write_json(start_cache, start)
    curves: dict[str, list[list[float]]] = {}
    for row in rl_rows:
        cache_path = ctx.out / row / "checkpoint_evals.json"
        cache = _read_json(cache_path) if cache_path.exists() else {}
        for step, folder in _checkpoints(ctx, row):
            key = str(folder)
            if key not in cache:
                cache[key] = {"step": step, "macro_f1": evaluate_checkpoint(folder, subset, prompt_style=style, **kw)}
                _write_json(cache_path, cache)
        curves[row] = [[0, start[sft]["macro_f1"]]] + sorted([v["step"], v["macro_f1"]] for v in cache.values())
    return curves


# -- report ----------------------------------------------------------------------------------------------


def _series(hist: Sequence[Mapping[str, Any]], fn: Callable[[Mapping[str, Any]], float | None]) -> list[tuple[float, float]]:
    out = []
    for h in hist:
        if "step" not in h:
            continue
        v = fn(h)
        if v is not None and math.isfinite(v):
            out.append((float(h["step"]), float(v)))
    return out


def _mean_step_reward(h: Mapping[str, Any]) -> float | None:
    vals = [float(v) for k, v in h.items() if k.startswith("srpo/step_reward/") and v is not None]
    return sum(vals) / len(vals) if vals else None


def write_plots(ctx: _Ctx, results: Mapping[str, Mapping[str, Any]], curves: Mapping[str, Any]) -> dict[str, str]:
    """reward / step_reward / entropy curves (one line per RL row that ran its own job), the Macro F1 bars,
    and the Macro F1 over training when checkpoints were scored. Returns {name: file}."""
    from she.evaluation.report import plot_curves

    written: dict[str, str] = {}
    rl_rows = [r for r in ctx.rows if r in RL_ROWS + FULL_ROWS and r not in ctx.same_as]
    hists = {r: ctx.log_history(r) for r in rl_rows}
    specs = {
        "reward": ("outcome reward (TRL `reward`) per RL row", lambda h: h.get("reward")),
        "step_reward": ("mean step reward (srpo/step_reward/*)", _mean_step_reward),
        "entropy": ("policy entropy", lambda h: h.get("entropy")),
    }
    for name, (title, fn) in specs.items():
        series = {r: _series(h, fn) for r, h in hists.items()}
        series = {r: s for r, s in series.items() if s}
        if series:
            plot_curves(series, ctx.out / f"{name}.png", title)
            written[name] = f"{name}.png"
    if results:
        plot_macro_f1_bars(results, ctx.out / "macro_f1.png")
        written["macro_f1"] = "macro_f1.png"
    if curves:
        plot_curves({r: [tuple(p) for p in pts] for r, pts in curves.items()}, ctx.out / "macro_f1_over_training.png",
                    f"Macro F1 on {min(ctx.cfg.checkpoint_eval_max, len(ctx.evals))} eval pairs over training")
        written["macro_f1_over_training"] = "macro_f1_over_training.png"
    return written


def plot_macro_f1_bars(results: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    vals = [results[n]["macro_f1"] for n in names]
    lo = [v - results[n]["macro_f1_ci"][0] for n, v in zip(names, vals)]
    hi = [results[n]["macro_f1_ci"][1] - v for n, v in zip(names, vals)]
    colors = ["tab:blue" if results[n].get("kind") == "main" else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("Macro F1 (95 % CI, query-group bootstrap)")
    ax.set_ylim(0, max([1e-3] + [results[n]["macro_f1_ci"][1] for n in names]) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _table(rows: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    head = ("| row | Macro F1 [95% CI] | accuracy [95% CI] | " + " | ".join(f"F1 {lab}" for lab in labels)
            + " | step acc. | format valid | generations | train wall (s) |")
    lines = [head, "|" + "---|" * (7 + len(labels))]
    for name, r in rows.items():
        name_cell = f"{name} (= {r['same_as']})" if r.get("same_as") else name
        lines.append(
            f"| {name_cell} | {_f(r['macro_f1'])} [{_f(r['macro_f1_ci'][0])}, {_f(r['macro_f1_ci'][1])}] | "
            f"{_f(r['accuracy'])} [{_f(r['accuracy_ci'][0])}, {_f(r['accuracy_ci'][1])}] | "
            + " | ".join(_f(r["per_class_f1"].get(lab)) for lab in labels)
            + f" | {_f(r.get('step_accuracy'))} | {_f(r.get('format_valid_rate'))} | {r.get('generations', 0):,} | "
            f"{_f(r.get('wall_time_s'), 0)} |")
    return lines


def results_markdown(s: Mapping[str, Any]) -> str:
    """results.md: main table, ablation table, what each row is, budget, data, command, seed, plots."""
    rows = s["rows"]
    labels = s["labels"]
    b = s["budget"]
    d = s["data"]
    main = {k: v for k, v in rows.items() if v["kind"] == "main"}
    abl = {k: v for k, v in rows.items() if v["kind"] == "ablation"}
    bs = s["bootstrap"]
    parts = [f"# she compare: {s['output_dir']}", "",
             f"Command: `{s['command']}`  ", f"Seed: {s['seed']} (every job); bootstrap: {bs['n']} replicates over "
             f"query groups, seed {bs['seed']}, {100 * (1 - bs['alpha']):.0f} % percentile intervals.", "",
             f"Data: {d['source']}, taxonomy {d['taxonomy']}, split seed {d['split_seed']}, balance_train "
             f"{d['balance_train']}; split sizes {d['split_sizes']}; evaluated on {d['eval_n']} {d['eval_split']} "
             f"pairs from {d['eval_query_groups']} queries, labels {d['eval_labels']}.", "",
             f"Budget ({b['mode']}): every RL row gets {b['rl']['max_steps']} steps x {b['rl']['prompts_per_step']} "
             f"prompts x {b['rl']['num_generations']} generations = {b['rl_generations_per_row']:,} policy rollouts."]
    if "passn" in b:
        parts.append(f"DPO / reward model: pass@{b['passn']['n']} on {b['passn']['max_records']} training prompts "
                     "(the same rollouts for both).")
    if "difficulty" in b:
        parts.append(f"srpo_full: difficulty estimation on {b['difficulty']['pool']} prompts x k={b['difficulty']['k']} "
                     f"= {b['difficulty']['generations']:,} generations; RL steps per row {b['srpo_full_steps']}"
                     + (" (strict: the estimation is paid with RL steps)." if b["mode"] == "strict" else "."))
    if b.get("judge_labelling_generations"):
        parts.append(f"The judge's training labels cost {b['judge_labelling_generations']:,} policy generations "
                     "(shared by every row that uses the judge; not in the per-row column).")
    parts += ["", "`generations`: policy samples the method spent before evaluation (RL rollouts, pass@N, "
              "difficulty estimation). `train wall (s)`: wall time of the row's own jobs (the shared SFT excluded; "
              "`-` when a job ran in an earlier invocation that did not record it).", "",
              "## Main results", "", *_table(main, labels), ""]
    if abl:
        parts += ["## Ablations", "", *_table(abl, labels), ""]
    checked = {k: v["step_checks"] for k, v in rows.items() if v.get("step_checks")}
    if checked:
        keys = list(dict.fromkeys(key for c in checked.values() for key in c))
        parts += ["## Steps the verifier could check", "",
                  "Share of generated steps the verifier marked correct, among those it could check on these "
                  "pairs (from the gold label, or from the strings for a coverage `Missing` step; `evaluate.step_checks`).",
                  "", "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        parts += [f"| {k} | " + " | ".join(_f(c[key]["accuracy"]) if key in c else "-" for key in keys) + " |"
                  for k, c in checked.items()] + [""]
    notes = [f"- **{k}** {v['note']}." for k, v in rows.items() if v.get("note")]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    parts += ["## Rows", ""] + [f"- **{k}**: {v['description']}" for k, v in rows.items()] + [""]
    plots = s.get("plots", {})
    if plots:
        parts += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(parts)


__all__ = [
    "ABLATION_ROWS",
    "ALL_ROWS",
    "BootstrapConfig",
    "CompareConfig",
    "CompareEvalConfig",
    "DifficultyConfig",
    "DiverseConfig",
    "FULL_ROWS",
    "MAIN_ROWS",
    "RL_ROWS",
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
    "split_stage_steps",
    "strict_rl_steps",
]
