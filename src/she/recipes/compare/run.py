"""The ``she compare`` driver: runs (or skips) the shared jobs and every row of the table
(:mod:`she.recipes.compare.rows`) under the plan (:mod:`she.recipes.compare.plan`), evaluates each row, keeps
``compare_state.json`` for resuming, and writes the report (:mod:`she.recipes.compare.report`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from she.config import DataConfig, PassAtNConfig, PRMJobConfig, RewardModelJobConfig, RLJobConfig, SFTJobConfig, to_dict
from she.data.schema import Record
from she.errors import UserError
from she.models.metadata import schema_of
from she.reasoning.schema import StepSchema, resolve_schema
from she.recipes.compare.config import (
    CURRICULUM_FIXED,
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
from she.recipes.compare.plan import (
    check_compare_config,
    default_stages,
    group_of,
    judge_rows,
    last_step,
    plan_same_as,
    rl_generations,
    rl_job_config,
    seeded_subset,
    selected_rows,
    split_stage_steps,
    strict_rl_steps,
    teacher_rows,
)
from she.recipes.compare.report import paired_results, results_markdown, row_metrics, write_plots
from she.recipes.compare.rows import FULL_ROWS, RL_ROWS, ROWS
from she.runtime import release_memory

log = logging.getLogger(__name__)

STATE_FILE = "compare_state.json"


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
        raise UserError(f"{path}: invalid JSON ({e.msg}); delete it to recompute") from None


def _release(after: str) -> None:
    """Between jobs of different shapes: hand the finished one's free heap back to the OS and log what that did
    (a compare process otherwise keeps every job's peak, docs/benchmarks.md "Allocator")."""
    before, now = release_memory()
    if before is not None and now is not None:
        log.info("compare: after %s, resident memory %.2f -> %.2f GB", after, before / 1e9, now / 1e9)


# -- the driver ------------------------------------------------------------------------------------------


@dataclass
class CompareRun:
    """One ``she compare`` run: the shared jobs (SFT start, judge, reward model, srpo_full's data pipeline),
    the rows of :data:`she.recipes.compare.rows.ROWS`, their evaluation, and the resumable state file."""

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
    calib: list[Record] = field(default_factory=list)  # validation pairs the calibration offsets are fitted on

    # state ------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(self.out / STATE_FILE, self.state)

    def job(self, name: str, done: Callable[[], bool], run: Callable[[], Any]) -> None:
        """Run a job unless its output exists; record its wall time in the state file."""
        if done():
            log.info("compare: %s already done", name)
            if not (self.cfg.keep_checkpoints or self.cfg.eval_checkpoints):
                self.drop_checkpoints(name)  # a run killed before its clean-up, or one from before it existed
            return
        log.info("compare: running %s", name)
        t = time.perf_counter()
        run()
        self.state["jobs"][name] = {"seconds": round(time.perf_counter() - t, 2)}
        self.save_state()
        if not (self.cfg.keep_checkpoints or self.cfg.eval_checkpoints):
            self.drop_checkpoints(name)
        _release(name)

    def drop_checkpoints(self, name: str) -> None:
        """A finished job resumes from nothing: its ``checkpoint-N`` folders (weights + AdamW state, ~1.6 GB each
        for a 135M model) go, its ``final`` folder stays. Kept with ``keep_checkpoints`` or ``eval_checkpoints``."""
        from she.training.checkpoints import remove_checkpoints

        removed = remove_checkpoints(self.out / name)
        if removed:
            log.info("compare: %s finished; removed its %d checkpoint folder(s) (keep_checkpoints: true keeps them)",
                     name, len(removed))

    def seconds(self, *jobs: str) -> float | None:
        vals = [self.state["jobs"].get(j, {}).get("seconds") for j in jobs]
        return None if any(v is None for v in vals) else round(sum(vals), 2)

    # shared jobs -------------------------------------------------------------------------------------
    @property
    def schema(self) -> StepSchema:
        """The step schema every generative row writes (:func:`compare_schema`). The jobs read it from their
        start model's ``she.json``; the driver passes it where a folder has none (a Trainer checkpoint)."""
        return resolve_schema(compare_schema(self.cfg), self.cfg.data.taxonomy)

    @property
    def rl_base(self) -> RLJobConfig:
        return build_section(RLJobConfig, self.cfg.rl, "rl", RL_FIXED)

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
        """The SFT job of the shared start (``reasoning``) or of the label-only row (``label``: the ``sft:`` section
        with the ``label_only:`` section on top, and the data of :meth:`label_only_data`)."""
        if target != "label":
            return build_section(SFTJobConfig, self.cfg.sft, "sft", SFT_FIXED, model=self.cfg.model,
                                 output_dir=str(output_dir), data=self.cfg.data, target=target, seed=self.cfg.seed)
        cfg = build_section(SFTJobConfig, label_only_section(self.cfg.sft, self.cfg.label_only), "sft + label_only",
                            SFT_FIXED, model=self.cfg.model, output_dir=str(output_dir), data=self.label_only_data(),
                            target=target, seed=self.cfg.seed)
        return dataclasses.replace(cfg, traces_file=None)  # teacher traces would replace the `Verdict: <label>` targets

    def label_only_data(self) -> DataConfig:
        """``data`` with the label_only section's training-split keys (max_train, balance_train) applied."""
        over, _ = label_only_parts(self.cfg.label_only)
        return dataclasses.replace(self.cfg.data, **over)

    def label_only_train(self) -> list[Record]:
        """The training pairs of the label-only row: the shared training split unless the ``label_only:`` section
        changes its sample. The split is the same (by query, ``split_seed``) and only its train part is drawn
        again, so every pair comes from a training query; the evaluation and calibration pairs are untouched."""
        over, _ = label_only_parts(self.cfg.label_only)
        if not over:
            return self.train
        if "label_only_train" not in self.memo:
            from she.data.sources import load_splits

            recs = load_splits(self.label_only_data())["train"]
            held = {group_of(r) for r in self.calib}
            if self.cfg.eval.split != "train":
                held |= {group_of(r) for r in self.evals}
            leaked = [r.id for r in recs if group_of(r) in held]
            if leaked:  # cannot happen with a query-disjoint split; refuse rather than score a leak
                raise UserError(f"label_only: {len(leaked)} training pair(s) share a query with the evaluation or "
                                f"calibration pairs (first: {leaked[0]!r}); the split must be by query")
            self.memo["label_only_train"] = recs
        return self.memo["label_only_train"]

    def train_pairs(self, row: str) -> int | None:
        """Labelled pairs the row's own supervised job trained on (SFT, label-only SFT, cross-encoder); None for
        rows whose budget is their generations, for majority, and for an SFT start trained elsewhere."""
        if row == "label_only_sft":
            return len(self.label_only_train())
        if (row == "sft" and not self.cfg.sft_model) or row == "cross_encoder":
            return len(self.train)
        return None

    def judge_dir(self) -> str:
        if self.cfg.judge:
            if not (Path(self.cfg.judge) / "config.json").exists():
                raise FileNotFoundError(f"judge {self.cfg.judge}: not a judge folder (no config.json)")
            return self.cfg.judge
        folder = self.out / "prm" / "judge"

        def run() -> None:
            from she.training.prm import run_prm_job

            pcfg = build_section(PRMJobConfig, self.cfg.prm, "prm", PRM_FIXED, policy=str(self.sft_dir()),
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
        return build_section(PassAtNConfig, {**{k: v for k, v in defaults.items() if k not in given}, **given}, "passn",
                      PASSN_FIXED, seed=self.cfg.seed)

    def rm_dir(self) -> Path:
        final = self.out / "rm" / "final"

        def run() -> None:
            from she.training.reward_model import run_reward_model_job

            sft = str(self.sft_dir())
            rcfg = build_section(RewardModelJobConfig, self.cfg.rm, "rm", RM_FIXED, model=sft, policy=sft,
                          output_dir=str(self.out / "rm"), data=self.cfg.data, rollouts=self.passn(),
                          seed=self.cfg.seed)
            run_reward_model_job(rcfg, self.train, progress=False)

        self.job("rm", lambda: _done(final), run)
        return final

    def rl_train(self) -> list[Record]:
        """The prompts of every RL row (``rl_prompts``): the SFT's training pairs, or as many fresh ones from the
        training queries the SFT sample does not contain (:func:`~she.data.sources.fresh_train_sample`)."""
        if self.cfg.rl_prompts == "sft":
            return self.train
        if "rl_train" not in self.memo:
            from she.data.sources import fresh_train_sample

            recs = fresh_train_sample(self.cfg.data, self.train, len(self.train), f"{self.cfg.seed}:rl-fresh")
            log.info("compare: rl_prompts fresh: %d pairs from %d training queries the SFT sample does not contain",
                     len(recs), len({group_of(r) for r in recs}))
            self.memo["rl_train"] = recs
        return self.memo["rl_train"]

    # srpo_full pipeline ------------------------------------------------------------------------------
    def pool(self) -> list[Record]:
        return seeded_subset(self.rl_train(), self.cfg.difficulty.max_records, f"{self.cfg.seed}:compare-pool")

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
            cur = build_section(CurriculumConfig, self.cfg.curriculum, "curriculum", CURRICULUM_FIXED)
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
            raise UserError(f"{report_path} was computed for another pool or k; delete the difficulty folder "
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
                raise UserError(f"{path}: its ids are not training records of this data ({unknown[:3]}); delete it "
                                "to select again")
            return [by_id[i] for i in sel["ids"]], rates
        d = self.cfg.difficulty
        pool = self.pool()
        cand = filter_by_pass_rate(pool, rates, d.low, d.high, d.inclusive) if rates is not None else pool
        if not cand:
            raise UserError(f"{row}: the difficulty band keeps none of the {len(pool)} pool prompts (every pass rate "
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
    def rl_config(self, row: str, *, model: Path | str, judge: str | None, reward_model: Path | str | None = None,
                  max_steps: int | None = None) -> RLJobConfig:
        teacher = self.teacher_dir() if teacher_rows(self.cfg, [row]) else None
        return rl_job_config(self.cfg, row, model=str(model), output_dir=str(self.out / row), judge=judge,
                             reward_model=None if reward_model is None else str(reward_model), max_steps=max_steps,
                             teacher=teacher)

    def teacher_dir(self) -> str:
        """The teacher of the rows that pay one: ``rl.teacher``, else the comparison's own cross-encoder (the
        ``cross_encoder`` row's job, trained here if it has not been)."""
        if self.rl_base.teacher:
            return self.rl_base.teacher
        return str(self.train_row("cross_encoder", {"row": "cross_encoder"}))

    def train_row(self, row: str, needs: dict[str, Any]) -> Path:
        """The one job of a ``job`` or ``rl`` row (:data:`ROWS`), unless its final folder exists."""
        spec = ROWS[row]
        final = self.out / row / "final"
        self.job(row, lambda: _done(final), lambda: spec.run(self, spec.config(self, needs)))
        return final

    def model_of(self, row: str) -> tuple[Path | None, list[str]]:
        """Run (or skip) the jobs of ``row``; returns its model folder and the job names it is charged with."""
        spec = ROWS[row]
        if spec.family == "majority":
            return None, []
        if not spec.from_sft:
            return self.train_row(row, {"row": row}), [row]
        sft = self.sft_dir()
        if spec.family == "sft":
            return sft, ["sft"] if not self.cfg.sft_model else []
        if spec.family == "job":
            return self.train_row(row, {"row": row, "sft": sft}), [row]
        if row in self.same_as:
            return self.model_of(self.same_as[row])
        judge = self.judge_dir() if row in judge_rows(self.cfg, [row]) else None
        if spec.family == "rl":
            rm = self.rm_dir() if spec.reward_model else None
            final = self.train_row(row, {"row": row, "sft": sft, "judge": judge, "reward_model": rm})
            return final, [*spec.charged, row]
        return self.full_row(row, sft, judge)

    def check_batches(self, row: str, records: Sequence[Record], rates: Mapping[str, float] | None, stages) -> None:
        """Every RL run needs at least ``prompts_per_step`` distinct prompts: TRL's sampler drops an incomplete
        batch, so a smaller set would "train" zero steps without an error."""
        from she.sampling.curriculum import apply_stage_filter

        need = self.rl_base.prompts_per_step
        parts = [("the selection", list(records))] if not stages else [
            (f"stage {st.name!r}", apply_stage_filter(records, st, rates, seed=self.cfg.seed)) for st in stages]
        for what, recs in parts:
            if len(recs) < need:
                raise UserError(f"{row}: {what} has {len(recs)} prompt(s) but every RL step needs "
                                f"prompts_per_step={need}; enlarge difficulty.max_records, widen the band or the "
                                "stage filters")

    def full_row(self, row: str, sft: Path, judge: str | None) -> tuple[Path, list[str]]:
        from she.sampling.curriculum import CurriculumConfig, stage_dir

        steps = self.full_steps(row)
        jobs = ["difficulty", row] if row != "srpo_full_no_difficulty" else [row]
        rl_cfg = self.rl_config(row, model=sft, judge=judge, max_steps=steps)
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
        ev = self.eval_dir(row)
        mpath = ev / "metrics.json"
        if not mpath.exists():
            t = time.perf_counter()
            ecfg = self.cfg.eval
            predict = ROWS[row].predict
            if predict is not None:
                preds = predict(self, model)
            else:
                from she.evaluation.evaluate import evaluate

                evaluate(str(model), self.evals, ev, taxonomy=self.cfg.data.taxonomy, batch_size=ecfg.batch_size,
                         max_new_tokens=ecfg.max_new_tokens, bf16=ecfg.bf16, title=f"she compare: {row}",
                         progress=False, calibrated=False,  # the row's own labels; calibration is reported apart
                         evidence=ecfg.evidence)
                preds = None
            if preds is not None:
                m = classification_report([r.label for r in self.evals], [p["label"] for p in preds], self.labels)
                m["model"] = str(model) if model is not None else "majority"
                atomic_write_lines(ev / "predictions.jsonl", (json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
                atomic_write_lines(mpath, [json.dumps(m, indent=2)])
            self.state["evals"][row] = {"seconds": round(time.perf_counter() - t, 2)}
            self.save_state()
            _release(f"{row} evaluation")
        return ev, _read_json(mpath)

    def eval_dir(self, row: str) -> Path:
        """``<row>/eval``, or ``<row>/eval_<mode>`` for a verdict read another way (``eval.evidence``)."""
        mode = self.cfg.eval.evidence
        return self.out / row / ("eval" if mode == "generated" else f"eval_{mode}")

    def calibration(self, row: str, model: Path | None) -> dict[str, float] | None:
        """Per-class verdict offsets of a generative row fitted on the validation pairs (``eval.calibrate``),
        cached in ``<row>/eval/calibration.json``; None for rows that generate nothing or when off."""
        from she.data.validation import atomic_write_lines

        if not self.cfg.eval.calibrate or ROWS[row].predict is not None or model is None or not self.calib:
            return None
        if row in self.same_as:
            return self.calibration(self.same_as[row], model)
        path = self.eval_dir(row) / "calibration.json"
        method = self.cfg.eval.calibration_method  # offsets cached by another method (files before it: grid) are refitted
        if not path.exists() or _read_json(path).get("method", "grid") != method:
            from she.evaluation.calibration import fit_label_offsets
            from she.evaluation.evaluate import judge_records
            from she.models.metadata import model_step_schema, prompt_style_of
            from she.models.registry import load_model_and_tokenizer

            t = time.perf_counter()
            ecfg = self.cfg.eval
            lm, tok = load_model_and_tokenizer(str(model))
            js = judge_records(lm, tok, self.calib, evidence=ecfg.evidence, taxonomy=self.cfg.data.taxonomy,
                               batch_size=ecfg.batch_size, max_new_tokens=ecfg.max_new_tokens, bf16=ecfg.bf16,
                               progress=False, prompt_style=prompt_style_of(str(model)),
                               schema=model_step_schema(str(model), self.cfg.data.taxonomy, compare_schema(self.cfg)))
            offsets = fit_label_offsets([j.probs for j in js], [j.raw_label for j in js],
                                        [r.label for r in self.calib], self.labels, method=method,
                                        groups=[r.query for r in self.calib])
            atomic_write_lines(path, [json.dumps({"label_offsets": offsets, "method": method,
                                                  "n": len(self.calib),
                                                  "seconds": round(time.perf_counter() - t, 2)}, indent=2)])
        return _read_json(path)["label_offsets"]

    def predicted(self, row: str, model: Path | None,
                  offsets: dict[str, float] | None = None) -> tuple[Path, dict[str, Any], dict[str, str | None]]:
        """The row's evaluation folder, metrics and ``{record id: predicted label}`` (evaluating when needed)."""
        ev, m = self.predictions(row, model)
        key = f"predicted:{ev}:{sorted((offsets or {}).items())}"
        if key not in self.memo:  # result() and the paired intervals read the same file
            from she.data.validation import iter_jsonl
            from she.evaluation.calibration import apply_offsets

            preds: dict[str, str | None] = {}
            for _, d in iter_jsonl(ev / "predictions.jsonl"):
                preds[str(d["id"])] = apply_offsets(d.get("probs"), d.get("label"), offsets)
            if set(preds) != {r.id for r in self.evals}:
                raise UserError(f"{ev}/predictions.jsonl covers other records than this evaluation set; delete "
                                f"{ev} to evaluate again")
            self.memo[key] = preds
        return ev, m, self.memo[key]

    def result(self, row: str, model: Path | None, jobs: list[str]) -> dict[str, Any]:
        ev, m, preds = self.predicted(row, model)
        res = row_metrics(self.evals, preds, self.labels, n_boot=self.cfg.bootstrap.n, seed=self.cfg.bootstrap.seed,
                          alpha=self.cfg.bootstrap.alpha)
        offsets = self.calibration(row, model)
        if offsets is not None:
            cal = row_metrics(self.evals, self.predicted(row, model, offsets)[2], self.labels,
                              n_boot=self.cfg.bootstrap.n, seed=self.cfg.bootstrap.seed, alpha=self.cfg.bootstrap.alpha)
            res["calibrated"] = {"label_offsets": offsets, **cal}
        sa = m.get("step_accuracy")
        gens = self.generations(row)
        res.update({
            "kind": ROWS[row].kind,
            "description": ROWS[row].description,
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
            "train_pairs": self.train_pairs(row),
            "jobs": jobs,
            "eval_seconds": self.state["evals"].get(self.same_as.get(row, row), {}).get("seconds"),
        })
        return res


# config keys that change what is run or kept, not what a finished job computed
_NOT_RESULTS = ("rows", "eval_checkpoints", "keep_checkpoints")


def _initial_state(out: Path, cfg: CompareConfig) -> dict[str, Any]:
    path = out / STATE_FILE
    now = json.loads(json.dumps(to_dict(cfg), default=str))  # as it reads back from JSON (tuples are lists)
    fresh = {"version": 1, "config": now, "jobs": {}, "evals": {}, "done": [], "rows": {}}
    if not path.exists():
        return fresh
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("jobs"), dict):
        raise UserError(f"{path}: not a compare state file (no 'jobs' mapping); delete it to start over")
    old = {k: v for k, v in (state.get("config") or {}).items() if k not in _NOT_RESULTS}
    new = {k: v for k, v in now.items() if k not in _NOT_RESULTS}
    # a key added to the config since that run (e.g. label_only) left at its default changes nothing
    default = json.loads(json.dumps(to_dict(CompareConfig()), default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                     and not (k not in old and new.get(k) == default.get(k)))
    if changed:
        log.warning("%s: the config changed in %s since the last run; finished jobs are reused as they are "
                    "(use another output_dir for a clean comparison)", path, changed)
    for key in ("evals", "rows"):
        state.setdefault(key, {})
    state.setdefault("done", [])
    state["config"] = now
    return state


def compare_schema(cfg: CompareConfig) -> str:
    """Every row writes the schema of the shared SFT start: ``sft_model``'s ``she.json``, else ``sft.schema``."""
    if cfg.sft_model:
        return schema_of(cfg.sft_model)
    return str(cfg.sft.get("schema", "default"))


def run_compare(cfg: CompareConfig, *, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison; returns the results dict also written to ``<out>/results.json``."""
    from she.data.labels import get_taxonomy
    from she.data.sources import load_splits

    check_compare_config(cfg)
    resolve_schema(compare_schema(cfg), cfg.data.taxonomy)  # a bad schema fails before any job runs
    rows = selected_rows(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(cfg.data)
    evals = seeded_subset(splits[cfg.eval.split], cfg.eval.max_eval, f"{cfg.seed}:compare-eval")
    if not evals:
        raise UserError(f"the {cfg.eval.split} split is empty: nothing to evaluate on")
    ctx = CompareRun(cfg=cfg, out=out, rows=rows, train=splits["train"], evals=evals,
               labels=list(get_taxonomy(cfg.data.taxonomy).labels), state=_initial_state(out, cfg),
               command=command or "run_compare(...) (Python API)", same_as=plan_same_as(cfg, rows),
               calib=seeded_subset(splits.get("validation") or [], cfg.eval.calibration_max,
                                   f"{cfg.seed}:compare-calibration") if cfg.eval.calibrate else [])
    preflight(ctx)
    _write_json(out / "compare_config.json", to_dict(cfg))
    ctx.save_state()
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, dict[str, str | None]] = {}
    preds_cal: dict[str, dict[str, str | None]] = {}
    for row in rows:
        model, jobs = ctx.model_of(row)
        results[row] = ctx.result(row, model, jobs)
        preds[row] = ctx.predicted(row, model)[2]
        cal = results[row].get("calibrated")
        preds_cal[row] = ctx.predicted(row, model, cal["label_offsets"])[2] if cal else preds[row]
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
    summary["paired"] = paired_results(ctx.evals, preds, cfg.paired, ctx.labels, n_boot=cfg.bootstrap.n,
                                       seed=cfg.bootstrap.seed, alpha=cfg.bootstrap.alpha)
    if cfg.eval.calibrate:
        summary["paired_calibrated"] = paired_results(ctx.evals, preds_cal, cfg.paired, ctx.labels,
                                                      n_boot=cfg.bootstrap.n, seed=cfg.bootstrap.seed,
                                                      alpha=cfg.bootstrap.alpha)
    if curves:
        summary["checkpoint_macro_f1"] = curves
    summary["plots"] = write_plots(ctx, results, curves)
    _write_json(out / "results.json", summary)
    (out / "results.md").write_text(results_markdown(summary))
    return summary


def preflight(ctx: CompareRun) -> None:
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
            raise UserError(
                f"{row}: budget strict leaves {steps} RL steps: estimating {len(ctx.pool())} pool prompts x k="
                f"{ctx.difficulty_k()} = {ctx.difficulty_generations()} generations costs more than "
                f"{rl_generations(rl.max_steps, rl.prompts_per_step, rl.num_generations)}; lower "
                "difficulty.max_records or k, raise rl.max_steps, or set budget: rl")
        if row != "srpo_full_no_curriculum":
            try:
                ctx.stages(row)
            except ValueError as e:
                raise UserError(f"{row}: {e}") from None


def budget_summary(ctx: CompareRun) -> dict[str, Any]:
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


def data_summary(ctx: CompareRun, splits: Mapping[str, list[Record]]) -> dict[str, Any]:
    dc = ctx.cfg.data
    source = (f"{dc.path} (format {dc.format}" + (f", cuts {list(dc.cuts)}" if dc.format == "home-depot" else "") + ")"
              if dc.path else f"synthetic ({dc.synthetic_queries} queries x {dc.synthetic_products_per_query} products, "
              f"seed {dc.split_seed}" + (f", label noise {dc.synthetic_label_noise}" if dc.synthetic_label_noise else "") + ")")
    return {
        "source": source, "taxonomy": dc.taxonomy, "split_seed": dc.split_seed, "balance_train": dc.balance_train,
        "max_train": dc.max_train, "max_eval": dc.max_eval,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "eval_split": ctx.cfg.eval.split, "eval_n": len(ctx.evals),
        "eval_query_groups": len({group_of(r) for r in ctx.evals}),
        "eval_labels": dict(Counter(r.label for r in ctx.evals).most_common()),
        "train_labels": dict(Counter(r.label for r in ctx.train).most_common()),
        "train_n": len(ctx.train),
        "label_only": label_only_summary(ctx),
        "rl_prompts": rl_prompts_summary(ctx),
    }


def rl_prompts_summary(ctx: CompareRun) -> dict[str, Any] | None:
    """The RL rows' own prompt sample when it is not the SFT's (None otherwise, or when no RL row is run)."""
    if ctx.cfg.rl_prompts == "sft" or not any(r in RL_ROWS + FULL_ROWS for r in ctx.rows):
        return None
    recs = ctx.rl_train()
    return {"rl_prompts": ctx.cfg.rl_prompts, "train_n": len(recs),
            "train_query_groups": len({group_of(r) for r in recs}),
            "train_labels": dict(Counter(r.label for r in recs).most_common())}


def label_only_summary(ctx: CompareRun) -> dict[str, Any] | None:
    """The label-only row's own training sample (None when it trains on the shared split or is not run)."""
    over, _ = label_only_parts(ctx.cfg.label_only)
    if not over or "label_only_sft" not in ctx.rows:
        return None
    recs = ctx.label_only_train()
    lo = ctx.label_only_data()
    return {"max_train": lo.max_train, "balance_train": lo.balance_train, "train_n": len(recs),
            "train_query_groups": len({group_of(r) for r in recs}),
            "train_labels": dict(Counter(r.label for r in recs).most_common())}


# -- checkpoints over training ------------------------------------------------------------------------


def evaluate_checkpoint(model_dir: str | Path, records: Sequence[Record], *, taxonomy: str, prompt_style: str,
                        batch_size: int, max_new_tokens: int, bf16: bool, schema: StepSchema | None = None) -> float:
    """Macro F1 of one checkpoint folder (a Trainer checkpoint has no she.json, so the prompt style and the step
    schema are given; ``schema`` None = the built-in one)."""
    from she.evaluation.evaluate import score
    from she.evaluation.generate import generate_judgements
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(model_dir))
    js = generate_judgements(model, tok, list(records), taxonomy=taxonomy, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, bf16=bf16, progress=False, prompt_style=prompt_style,
                             schema=schema)
    return float(score(list(records), js, taxonomy)["macro_f1"])


def _checkpoints(ctx: CompareRun, row: str) -> list[tuple[int, Path]]:
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
    if not any(ck.name.startswith("checkpoint-") for _, ck in points):
        log.warning("compare: %s has no intermediate checkpoint (a job that finished without eval_checkpoints or "
                    "keep_checkpoints lost them): its curve has the start and the end only", row)
    # a checkpoint at the last step and the final folder hold the same weights: keep the final folder
    by_step: dict[int, Path] = {}
    for s, p in points:
        by_step[s] = p
    return sorted(by_step.items())


def checkpoint_curves(ctx: CompareRun) -> dict[str, list[list[float]]]:
    """Macro F1 over training of every RL row on the first ``checkpoint_eval_max`` eval pairs; cached per row
    in ``<out>/<row>/checkpoint_evals.json`` (a rerun scores only new checkpoints). Step 0 is the SFT start."""
    cfg = ctx.cfg
    subset = ctx.evals[: cfg.checkpoint_eval_max]
    style = ctx.rl_base.prompt_style
    kw = dict(taxonomy=cfg.data.taxonomy, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
              bf16=cfg.eval.bf16, schema=ctx.schema)
    rl_rows = [r for r in ctx.rows if r in RL_ROWS + FULL_ROWS and r not in ctx.same_as]
    if not rl_rows:
        return {}
    start_cache = ctx.out / "sft" / "checkpoint_evals.json"
    start = _read_json(start_cache) if start_cache.exists() else {}
    sft = str(ctx.sft_dir())
    if sft not in start:
        from she.models.metadata import prompt_style_of

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


__all__ = ["STATE_FILE", "CompareRun", "checkpoint_curves", "compare_schema", "evaluate_checkpoint", "run_compare"]
