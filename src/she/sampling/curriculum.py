"""Multi-stage RL curriculum: a sequence of RL jobs, each on its own slice of the data with its own rewards.

Why stages: a judge that starts RL from a small SFT checkpoint gets almost no reward signal on the hardest
pairs (every rollout fails: zero group variance, see :mod:`she.sampling.difficulty`) and is easily pushed
around by a dense step reward before it has a stable output format. Typical schedule (configs/curriculum-demo.yaml):

1. *format / easy*: prompts the policy already solves often, a format reward on, outcome-only advantages
   (``alpha: 0``) -- lock in the output format cheaply;
2. *main*: the informative band ``0 < pass rate < 1``, step rewards on (``alpha: 1``);
3. *hard*: the rare hard cases (negation, typos, Partial/Substitute labels), partial credit on.

A stage is an ordinary :func:`she.training.rl.run_rl_job` run in ``<output_dir>/stage-<i>-<name>``,
starting from the previous stage's ``final`` folder, so every stage is resumable on its own and leaves a
normal model folder. ``curriculum_state.json`` (written atomically) records which stages are done, so a
rerun skips them and the current stage resumes from its own last checkpoint.

A stage ends after ``advance.steps`` optimizer steps, or earlier when ``advance.plateau`` sees the logged
metric stop improving (:class:`PlateauCallback`, which sets ``control.should_training_stop``).

YAML (``she train curriculum --config X.yaml``)::

    rl: {model: runs/sft/final, output_dir: runs/curriculum, ...}   # an RLJobConfig
    curriculum:
      pass_rates: runs/pass_rates.jsonl    # optional: cache from `she data filter`
      stages:
        - name: easy
          filter: {pass_rate: [0.5, 1.0], max_records: 200}
          overrides: {alpha: 0.0, format_weight: 0.2}
          advance: {steps: 20}
        - name: main
          filter: {pass_rate: [0.25, 0.75]}
          advance: {steps: 100, plateau: {metric: reward, patience: 10, min_delta: 0.01}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from she.config import ConfigError, RLJobConfig, canonical_key, from_dict, to_dict
from she.data.schema import Record
from she.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "curriculum_state.json"
# RLJobConfig fields a stage may not override: the driver sets them (model chaining, stage folders, data)
NOT_OVERRIDABLE = ("model", "output_dir", "data", "resume")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class StageFilter:
    """Which training records a stage sees. Every set condition must hold (they are ANDed).

    ``pass_rate: [lo, hi]`` keeps ``lo <= p <= hi`` (inclusive: with k rollouts rates are ``j/k``, so
    ``[0.25, 0.75]`` is the open band for k=4). ``labels`` / ``query_types`` (``query_meta["query_type"]``)
    keep those values. ``max_records`` then draws that many round-robin over (label, query type) strata
    (:func:`she.sampling.diverse.stratified_sample`, seeded with the RL seed).
    """

    pass_rate: tuple[float, float] | None = None
    labels: list[str] | None = None
    query_types: list[str] | None = None
    max_records: int | None = None


@dataclass
class PlateauRule:
    """Advance when ``metric`` (a key of the Trainer log, e.g. ``reward``, ``srpo/outcome_reward``) has not
    improved by more than ``min_delta`` for ``patience`` consecutive logged values (early stopping)."""

    metric: str = "reward"
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "max"  # max | min


@dataclass
class AdvanceRule:
    """``steps``: the stage length (its ``max_steps``). ``plateau``: stop earlier on a plateau. With
    neither, the stage runs the RL config's ``max_steps`` (or ``overrides.max_steps``)."""

    steps: int | None = None
    plateau: PlateauRule | None = None


@dataclass
class Stage:
    name: str = ""
    filter: StageFilter = field(default_factory=StageFilter)
    overrides: dict[str, Any] = field(default_factory=dict)  # RLJobConfig fields: alpha, format_weight, ...
    advance: AdvanceRule = field(default_factory=AdvanceRule)


@dataclass
class CurriculumConfig:
    stages: list[Stage] = field(default_factory=list)
    pass_rates: str | None = None  # pass-rate cache (JSONL) from `she data filter`, for `filter.pass_rate`


@dataclass
class CurriculumJobConfig:
    """``she train curriculum``: an RL job config plus the stages."""

    rl: RLJobConfig = field(default_factory=RLJobConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


# ------------------------------------------------------------------------------------------ validation


def check_curriculum(cur: CurriculumConfig, where: str = "curriculum") -> None:
    """Raise :class:`ConfigError` naming the stage and key for anything that would fail later."""
    if not cur.stages:
        raise ConfigError(f"{where}.stages: at least one stage is needed")
    seen: set[str] = set()
    for i, st in enumerate(cur.stages):
        w = f"{where}.stages[{i}]"
        if not st.name or not _NAME.fullmatch(st.name):
            raise ConfigError(f"{w}.name: {st.name!r} must be a non-empty name of letters, digits, '_', '-', '.'")
        if st.name in seen:
            raise ConfigError(f"{w}.name: stage name {st.name!r} is used twice")
        seen.add(st.name)
        f = st.filter
        if f.pass_rate is not None:
            lo, hi = f.pass_rate
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"{w}.filter.pass_rate: need 0 <= lo <= hi <= 1, got {list(f.pass_rate)}")
        for key in ("labels", "query_types"):
            v = getattr(f, key)
            if v is not None and not v:
                raise ConfigError(f"{w}.filter.{key}: an empty list would keep nothing")
        if f.max_records is not None and f.max_records < 1:
            raise ConfigError(f"{w}.filter.max_records: must be >= 1, got {f.max_records}")
        bad = sorted(set(st.overrides) & set(NOT_OVERRIDABLE))
        if bad:
            raise ConfigError(f"{w}.overrides: {bad} are set by the curriculum driver and cannot be overridden")
        from_dict(RLJobConfig, st.overrides, f"{w}.overrides")  # unknown keys / wrong types fail here
        a = st.advance
        if a.steps is not None and a.steps < 1:
            raise ConfigError(f"{w}.advance.steps: must be >= 1, got {a.steps}")
        if a.steps is not None and "max_steps" in st.overrides:
            raise ConfigError(f"{w}: set the stage length once, advance.steps or overrides.max_steps")
        if a.plateau is not None:
            if a.plateau.patience < 1:
                raise ConfigError(f"{w}.advance.plateau.patience: must be >= 1, got {a.plateau.patience}")
            if a.plateau.mode not in ("max", "min"):
                raise ConfigError(f"{w}.advance.plateau.mode: use max or min, got {a.plateau.mode!r}")
            if a.plateau.min_delta < 0:
                raise ConfigError(f"{w}.advance.plateau.min_delta: must be >= 0, got {a.plateau.min_delta}")


def load_curriculum_job(path: str | Path | None, overrides: dict[str, Any] | None = None) -> CurriculumJobConfig:
    from she.config import load_config

    cfg = load_config(CurriculumJobConfig, path, overrides)
    check_curriculum(cfg.curriculum, f"{path or 'config'}: curriculum")
    return cfg


# ------------------------------------------------------------------------------------------ pure logic


def apply_stage_filter(records: Sequence[Record], stage: Stage, pass_rates: Mapping[str, float] | None = None,
                       seed: int = 0) -> list[Record]:
    """The records of ``stage`` (input order). Raises when a condition cannot be checked or keeps nothing.

    A record without a pass rate under a ``pass_rate`` filter is an error, not a silent drop.
    """
    from she.data.labels import get_taxonomy
    from she.sampling.diverse import stratified_sample

    f = stage.filter
    out = list(records)
    if f.pass_rate is not None:
        if pass_rates is None:
            raise UserError(f"stage {stage.name!r} filters on pass_rate but no pass rates were given "
                            "(curriculum.pass_rates: the cache from `she data filter`)")
        missing = [r.id for r in out if r.id not in pass_rates]
        if missing:
            raise UserError(f"stage {stage.name!r}: {len(missing)} record(s) have no pass rate "
                            f"(first: {missing[0]!r}); estimate them with `she data filter`")
        lo, hi = f.pass_rate
        out = [r for r in out if lo <= pass_rates[r.id] <= hi]
    if f.labels is not None:
        known = {lab for r in records for lab in get_taxonomy(r.taxonomy).labels}
        unknown = sorted(set(f.labels) - known)
        if unknown:
            raise UserError(f"stage {stage.name!r}: filter.labels {unknown} are not labels of the data "
                            f"({sorted(known)})")
        wanted = set(f.labels)
        out = [r for r in out if r.label in wanted]
    if f.query_types is not None:
        wanted = set(f.query_types)
        out = [r for r in out if r.query_meta.get("query_type") in wanted]
    if f.max_records is not None and len(out) > f.max_records:
        out = stratified_sample(out, f.max_records, lambda r: (r.label, r.query_meta.get("query_type")), seed=seed)
    if not out:
        raise UserError(f"stage {stage.name!r}: the filter {dataclasses.asdict(f)} keeps no record "
                        f"of {len(records)}")
    return out


def plateaued(history: Sequence[float], patience: int, min_delta: float = 0.0, mode: str = "max") -> bool:
    """True when the last ``patience`` values brought no improvement over the best before them.

    An improvement is a value better than the running best by more than ``min_delta``. Example
    (max, patience 2, min_delta 0): ``[0.1, 0.3, 0.3, 0.2]`` -> the best 0.3 is at index 1, two values
    since then without improvement -> True; ``[0.1, 0.3, 0.2]`` -> only one -> False.
    """
    best: float | None = None
    since = 0
    for v in history:
        better = best is None or (v > best + min_delta if mode == "max" else v < best - min_delta)
        if better:
            best, since = v, 0
        else:
            since += 1
    return best is not None and since >= patience


def stage_max_steps(stage: Stage, rl_cfg: RLJobConfig) -> int:
    if stage.advance.steps is not None:
        return stage.advance.steps
    return int(stage.overrides.get("max_steps", rl_cfg.max_steps))


def should_advance(stage: Stage, step_in_stage: int, metric_history: Sequence[float]) -> bool:
    """Whether ``stage`` is over: its step budget is spent or its plateau rule fires on ``metric_history``
    (the values of ``stage.advance.plateau.metric`` logged so far in this stage, oldest first)."""
    a = stage.advance
    if a.steps is not None and step_in_stage >= a.steps:
        return True
    if a.plateau is not None:
        p = a.plateau
        return plateaued(metric_history, p.patience, p.min_delta, p.mode)
    return False


def stage_config(rl_cfg: RLJobConfig, stage: Stage, index: int, model: str) -> RLJobConfig:
    """The RL config of stage ``index``: the base config, the stage's overrides, its folder and start model."""
    over = from_dict(RLJobConfig, stage.overrides, f"stage {stage.name}.overrides")
    kw = {canonical_key(RLJobConfig, k, warn=False): getattr(over, k) for k in stage.overrides}
    kw.update(model=str(model), output_dir=str(stage_dir(rl_cfg.output_dir, index, stage)),
              max_steps=stage_max_steps(stage, rl_cfg))
    return dataclasses.replace(rl_cfg, **kw)


def stage_dir(output_dir: str | Path, index: int, stage: Stage) -> Path:
    return Path(output_dir) / f"stage-{index}-{stage.name}"


# -------------------------------------------------------------------------------------- trainer hook


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class PlateauCallback(_callback_base()):  # type: ignore[misc]
    """Stops a stage's trainer when :func:`should_advance` says so.

    Stateless: the history is read from ``state.log_history``, which a resumed trainer restores from its
    checkpoint, so a stage interrupted mid-plateau resumes with the same history. Also asks for a
    checkpoint at the stopping step, so an interruption right after the stop resumes there.
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stopped_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        p = self.stage.advance.plateau
        hist = [float(h[p.metric]) for h in state.log_history if p is not None and p.metric in h]
        if should_advance(self.stage, state.global_step, hist) and state.global_step < state.max_steps:
            log.info("stage %s: %s plateaued at step %d; advancing", self.stage.name, p.metric if p else "-",
                     state.global_step)
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
        return control


# ------------------------------------------------------------------------------------------- the driver


def _read_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg}); delete it to restart the curriculum") from None
    if not isinstance(d, dict) or not isinstance(d.get("done"), list):
        raise UserError(f"{path}: field 'done' is missing or not a list; delete it to restart the curriculum")
    return d


def _write_state(path: Path, state: dict[str, Any]) -> None:
    from she.data.validation import atomic_write_lines

    atomic_write_lines(path, [json.dumps(state, indent=2) + "\n"])


def run_curriculum(rl_cfg: RLJobConfig, curriculum: CurriculumConfig, train_records: Sequence[Record],
                   pass_rates: Mapping[str, float] | None = None, *, callbacks: list | None = None,
                   run_job: Callable[..., Path] | None = None) -> list[Path]:
    """Run the stages in order; returns every stage's ``final`` folder.

    Stage i trains from stage i-1's ``final`` (stage 0 from ``rl_cfg.model``). Every stage's record set is
    computed before anything trains, so a filter that keeps nothing in stage 3 fails in seconds, not
    hours. With ``rl_cfg.resume`` (default) stages listed as done in ``curriculum_state.json`` whose
    ``final`` folder exists are skipped; a rerun whose done stages no longer match the curriculum's stage
    names raises rather than mixing two curricula. ``callbacks`` are added to every stage's trainer;
    ``run_job`` replaces :func:`run_rl_job` (tests).
    """
    from she.training.rl import run_rl_job

    check_curriculum(curriculum)
    run_job = run_job or run_rl_job
    if pass_rates is None and curriculum.pass_rates:
        from she.sampling.difficulty import load_pass_rates

        pass_rates = load_pass_rates(curriculum.pass_rates)
    subsets = [apply_stage_filter(train_records, st, pass_rates, seed=rl_cfg.seed) for st in curriculum.stages]
    out = Path(rl_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    names = [st.name for st in curriculum.stages]
    state = _read_state(state_path) if rl_cfg.resume else None
    if state is not None:
        for j, name in enumerate(state["done"]):
            if j >= len(names) or names[j] != name:
                raise UserError(f"{state_path}: done stages {state['done']} do not match this curriculum's stages "
                                f"{names}; use another output_dir or delete the state file")
    else:
        state = {"stages": names, "done": [], "current": 0, "history": []}
    state["stages"] = names
    (out / "curriculum_config.json").write_text(json.dumps(to_dict(curriculum), indent=2))

    finals: list[Path] = []
    model = rl_cfg.model
    for i, (st, recs) in enumerate(zip(curriculum.stages, subsets)):
        sdir = stage_dir(out, i, st)
        final = sdir / "final"
        if i < len(state["done"]) and (final / "config.json").exists():
            log.info("stage %d (%s) already done: %s", i, st.name, final)
            finals.append(final)
            model = str(final)
            continue
        if i < len(state["done"]):
            log.warning("stage %d (%s) is marked done but %s is missing; running it again", i, st.name, final)
            state["done"] = state["done"][:i]
        state["current"] = i
        _write_state(state_path, state)
        cfg_i = stage_config(rl_cfg, st, i, model)
        cbs = list(callbacks or [])
        plateau = PlateauCallback(st) if st.advance.plateau is not None else None
        if plateau is not None:
            cbs.append(plateau)
        log.info("stage %d (%s): %d records, up to %d steps, from %s", i, st.name, len(recs), cfg_i.max_steps, model)
        final = Path(run_job(cfg_i, list(recs), callbacks=cbs))
        steps = _last_step(sdir)
        state["done"].append(st.name)
        state["history"] = [h for h in state.get("history", []) if h.get("stage") != st.name] + [{
            "stage": st.name, "index": i, "records": len(recs), "model_in": str(model), "final": str(final),
            "steps": steps, "plateau_stop": plateau.stopped_at if plateau is not None else None,
        }]
        state["current"] = i + 1
        _write_state(state_path, state)
        finals.append(final)
        model = str(final)
    return finals


def _last_step(stage_folder: Path) -> int | None:
    p = stage_folder / "log_history.json"
    if not p.exists():
        return None
    try:
        hist = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    steps = [h["step"] for h in hist if isinstance(h, dict) and "step" in h]
    return max(steps) if steps else None


def run_curriculum_job(cfg: CurriculumJobConfig) -> list[Path]:
    """Load the RL config's training split and run the curriculum on it."""
    from she.data.sources import load_splits

    return run_curriculum(cfg.rl, cfg.curriculum, load_splits(cfg.rl.data)["train"])


__all__ = [
    "AdvanceRule",
    "CurriculumConfig",
    "CurriculumJobConfig",
    "PlateauCallback",
    "PlateauRule",
    "Stage",
    "StageFilter",
    "apply_stage_filter",
    "check_curriculum",
    "load_curriculum_job",
    "plateaued",
    "run_curriculum",
    "run_curriculum_job",
    "should_advance",
    "stage_config",
    "stage_dir",
    "stage_max_steps",
]
