"""``she compare``: pure budget rules (hand-computed), config errors, the wiring of every job with fakes, and
the whole table on the tiny model -- then a rerun that must call no job at all.

The tiny random policy never writes a correct trace, so the end-to-end test writes two scripted caches
before the run (as tests/test_baselines.py does for DPO/RM): pass@N rollouts with one right and one wrong
rollout per record, and pass rates chosen so that the difficulty band keeps exactly one pool prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from she.config import ConfigError, DataConfig  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.recipes import compare  # noqa: E402
from she.recipes.compare import (  # noqa: E402
    ALL_ROWS,
    CompareConfig,
    load_compare_config,
    majority_label,
    plan_same_as,
    rl_job_config,
    seeded_subset,
    split_stage_steps,
    strict_rl_steps,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compare-tiny.yaml"


# ------------------------------------------------------------------------------------------ pure rules


def test_budget_rules_hand_computed():
    assert compare.rl_generations(20, 2, 4) == 160
    # 20 prompts x k=4 = 80 generations = 10 steps of 2 x 4
    assert strict_rl_steps(20, 2, 4, 80) == 10
    # 81 generations round up to 11 steps: the row never spends more than the others
    assert strict_rl_steps(20, 2, 4, 81) == 9
    assert strict_rl_steps(3, 2, 2, 4) == 2
    assert split_stage_steps([None, None], 7) == [3, 4]
    assert split_stage_steps([2, None, None], 7) == [2, 2, 3]
    assert split_stage_steps([3, 4], 7) == [3, 4]
    with pytest.raises(ValueError, match="add up to 6 but the budget is 7"):
        split_stage_steps([2, 4], 7)
    with pytest.raises(ValueError, match="at least one step"):
        split_stage_steps([6, None, None], 7)
    with pytest.raises(ValueError, match="no RL step is left"):
        split_stage_steps([None], 0)
    st = compare.default_stages(9)
    assert [(s.name, s.advance.steps, s.filter.pass_rate) for s in st] == [("easy", 2, (0.5, 1.0)), ("main", 7, None)]


def test_majority_label_and_subset():
    from she.data.schema import Record

    def rec(i, label):
        return Record.from_dict({"id": str(i), "query": "q", "product": {"title": "t"}, "label": label})

    labels = ["Irrelevant", "Partial", "Exact"]
    assert majority_label([rec(0, "Exact"), rec(1, "Partial"), rec(2, "Exact")], labels) == "Exact"
    # a tie goes to the label that comes first in the taxonomy
    assert majority_label([rec(0, "Exact"), rec(1, "Partial")], labels) == "Partial"
    recs = [rec(i, "Exact") for i in range(10)]
    sub = seeded_subset(recs, 4, "s")
    assert len(sub) == 4 and [r.id for r in sub] == sorted((r.id for r in sub), key=int)  # input order kept
    assert seeded_subset(recs, 4, "s") == sub and seeded_subset(recs, None, "s") == recs


def test_row_metrics_bootstrap_by_query_hand_computed():
    from she.data.schema import Record

    recs = [Record.from_dict({"id": str(i), "query": f"q{i // 2}", "query_id": f"q{i // 2}", "product": {"title": "t"},
                              "label": lab}) for i, lab in enumerate(["Exact", "Exact", "Partial", "Partial"])]
    labels = ["Irrelevant", "Partial", "Exact"]
    # every prediction right -> every bootstrap replicate is perfect
    m = compare.row_metrics(recs, {r.id: r.label for r in recs}, labels, n_boot=50, seed=0)
    assert m["macro_f1"] == 1.0 and m["macro_f1_ci"] == [1.0, 1.0] and m["n_groups"] == 2
    # query q0 right, q1 wrong (predicted Exact): replicates draw q0q0 (acc 1), q1q1 (0) or one of each (0.5)
    m = compare.row_metrics(recs, {"0": "Exact", "1": "Exact", "2": "Exact", "3": "Exact"}, labels, n_boot=400, seed=0)
    assert m["accuracy"] == 0.5 and m["accuracy_ci"] == [0.0, 1.0]
    assert m["per_class_f1"] == {"Irrelevant": 0.0, "Partial": 0.0, "Exact": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="no prediction"):
        compare.row_metrics(recs, {"0": "Exact"}, labels, n_boot=5, seed=0)


# ----------------------------------------------------------------------------------------- config


def test_config_errors_name_the_key(tmp_path):
    def load(text: str):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return load_compare_config(p)

    with pytest.raises(ConfigError, match=r"c.yaml.rows: unknown row\(s\) \['srpo_fast'\]"):
        load("rows: [sft, srpo_fast]\n")
    with pytest.raises(ConfigError, match=r"c.yaml.rl: \['model'\] are set by she compare"):
        load("rl: {model: x}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.dpo: \['rollouts'\] are set by she compare"):
        load("dpo: {rollouts: {n: 3}}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.rl: unknown key\(s\) \['step'\]"):
        load("rl: {step: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.budget: 'loose'"):
        load("budget: loose\n")
    with pytest.raises(ConfigError, match=r"rows \['srpo_judge_only'\] need a judge"):
        load("rows: [srpo_judge_only]\n")
    with pytest.raises(ConfigError, match=r"curriculum.stages\[0\].overrides.max_steps"):
        load("curriculum: {stages: [{name: a, overrides: {max_steps: 3}}]}\n")
    # rl.examiner verifier: srpo needs no judge, and srpo_verifier_only is srpo's job
    cfg = load("rows: [grpo, srpo, srpo_no_step_reward, srpo_verifier_only]\nrl: {examiner: verifier}\n")
    assert plan_same_as(cfg, compare.selected_rows(cfg)) == {"srpo_no_step_reward": "grpo", "srpo_verifier_only": "srpo"}
    tiny = load_compare_config(CONFIG)
    # srpo runs the rl: section's estimator, srpo_gated by default: the same job as srpo_gated (and its verifier arm);
    # the tiny config's groups are of 2 already, so regrouping srpo_likelihood into groups of 2 changes nothing
    assert plan_same_as(tiny, list(ALL_ROWS)) == {"srpo_no_step_reward": "grpo", "srpo_gated": "srpo",
                                                  "srpo_gated_verifier_only": "srpo_verifier_only",
                                                  "srpo_likelihood_g2": "srpo_likelihood"}
    other = load("rows: [srpo, srpo_gated, srpo_centered, grpo, grpo_seed1]\nrl: {advantage: srpo_centered_pooled}\n")
    assert plan_same_as(other, compare.selected_rows(other)) == {}  # a seed repeat is never the same job
    # a teacher row reads rl.teacher, else the folder the run passes (its own cross-encoder); other rows none
    base = load_compare_config(CONFIG)
    kw = dict(model="S", output_dir="o", judge=None)
    with pytest.raises(UserError, match="pays a teacher's term"):
        rl_job_config(base, "srpo_exact_teacher", **kw)
    assert rl_job_config(base, "srpo_exact_teacher_seed2", teacher="CE", **kw).teacher == "CE"
    assert rl_job_config(base, "srpo_exact", teacher="CE", **kw).teacher is None
    given = dataclasses.replace(base, rl={**base.rl, "teacher": "MINE"})
    assert rl_job_config(given, "srpo_exact_teacher", teacher="CE", **kw).teacher == "MINE"
    assert rl_job_config(given, "grpo_exact", **kw).teacher is None
    assert rl_job_config(given, "srpo_exact_kl_seed1", teacher="CE", **kw).teacher == "uniform"  # names its own
    assert rl_job_config(given, "grpo_exact_kl_seed2", teacher="CE", **kw).teacher == "uniform"  # GRPO's arm too
    assert rl_job_config(given, "grpo_exact_kl", **kw).step_rewards is False  # and no step reward (alpha 0)
    assert load("rows: [srpo_exact_teacher]\n").rows == ["srpo_exact_teacher"]  # no teacher needed up front


def test_rl_job_configs_differ_only_where_the_row_says():
    cfg = CompareConfig(rl={"examiner": "hybrid", "max_steps": 7, "alpha": 0.5}, seed=3)
    kw = dict(model="S", output_dir="o", judge="J", reward_model="R")
    grpo, srpo, vo, jo, rm = (rl_job_config(cfg, r, **kw) for r in
                              ("grpo", "srpo", "srpo_verifier_only", "srpo_judge_only", "rm_grpo"))
    assert (grpo.step_rewards, srpo.step_rewards, grpo.max_steps, grpo.seed, grpo.model) == (False, True, 7, 3, "S")
    assert (srpo.examiner, srpo.judge, srpo.alpha) == ("hybrid", "J", 0.5)
    assert (vo.examiner, vo.judge) == ("verifier", None)  # no judge loaded for the verifier-only arm
    assert (jo.examiner, jo.judge_weight, jo.judge) == ("blend", 1.0, "J")
    assert (rm.reward_model, rm.step_rewards) == ("R", False)
    assert srpo.save_total_limit == 2  # RL checkpoints hold optimizer state: only the newest two are kept
    curve = CompareConfig(rl={"max_steps": 7}, eval_checkpoints=True)
    assert rl_job_config(curve, "srpo", **kw).save_total_limit is None  # the F1-over-training curve reads them all


def test_regrouped_row_keeps_the_rollouts_a_step(tmp_path):
    """srpo_likelihood_g2 spends the same rollouts a step as every RL row, in groups of 2 over more prompts."""
    kw = dict(model="S", output_dir="o", judge=None)
    cfg = CompareConfig(rl={"num_generations": 8, "prompts_per_step": 4, "max_steps": 60})
    base, g2 = (rl_job_config(cfg, r, **kw) for r in ("srpo_likelihood", "srpo_likelihood_g2"))
    assert (g2.num_generations, g2.prompts_per_step, g2.max_steps) == (2, 16, 60)
    assert dataclasses.replace(g2, num_generations=8, prompts_per_step=4) == base  # nothing else differs
    p = tmp_path / "c.yaml"
    p.write_text("rows: [srpo_likelihood_g2]\nrl: {num_generations: 3, prompts_per_step: 1}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.rl: row srpo_likelihood_g2 regroups .* 3 is not a multiple of 2"):
        load_compare_config(p)


def test_computed_rows_change_only_the_rollout_evidence():
    kw = dict(model="S", output_dir="o", judge=None)
    cfg = CompareConfig(rl={"num_generations": 8, "prompts_per_step": 4, "max_steps": 60})
    for base in ("grpo", "srpo_likelihood"):
        plain, computed = (rl_job_config(cfg, r, **kw) for r in (base, f"{base}_computed"))
        assert (plain.rollout_evidence, computed.rollout_evidence) == ("sampled", "computed")
        assert dataclasses.replace(computed, rollout_evidence="sampled") == plain


def test_exact_rows_are_grpo_and_srpo_over_enumerated_leaves():
    kw = dict(model="S", output_dir="o", judge=None)
    cfg = CompareConfig(rl={"num_generations": 8, "prompts_per_step": 4, "max_steps": 60, "share_pin": 3.0})
    grpo, srpo = (rl_job_config(cfg, r, **kw) for r in ("grpo_exact", "srpo_exact"))
    assert (grpo.advantage, srpo.advantage) == ("grpo_exact", "srpo_exact")
    assert grpo.rollout_evidence == srpo.rollout_evidence == "enumerated"
    assert grpo.num_generations == srpo.num_generations == 6 and grpo.share_pin == srpo.share_pin == 3.0
    assert srpo.reward_steps == ["Relevant"] and srpo.step_rewards and not grpo.step_rewards
    assert rl_job_config(cfg, "srpo_exact_seed1", **kw).seed == cfg.seed + 1


def test_label_only_section_errors_name_the_key(tmp_path):
    """label_only: may change the row's training sample (max_train, balance_train) and its SFT recipe; a data key
    that would move the split or the evaluation pairs, a key the driver sets, or a typo fails naming the key."""
    def load(text: str):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return load_compare_config(p)

    cfg = load("rows: [label_only_sft]\n"
               "label_only: {max_train: 50, balance_train: false, learning_rate: 3.0e-4, batch_size: 4}\n")
    assert cfg.label_only["max_train"] == 50
    for text, msg in [
        ("label_only: {max_eval: 10}", r"c.yaml.label_only.max_eval: a `data` key the label-only row cannot change"),
        ("label_only: {split_seed: 1}", r"c.yaml.label_only.split_seed: a `data` key"),
        ("label_only: {data: {max_train: 10}}", r"c.yaml.label_only.data: give max_train / balance_train directly"),
        ("label_only: {target: reasoning}", r"c.yaml.label_only: \['target'\] are set by she compare"),
        ("label_only: {output_dir: x}", r"c.yaml.label_only: \['output_dir'\] are set by she compare"),
        ("label_only: {traces_file: t.jsonl}", r"c.yaml.label_only.traces_file: the label-only target is"),
        ("label_only: {max_train: 0}", r"c.yaml.label_only.max_train: must be >= 1"),
        ("label_only: {max_train: many}", r"c.yaml.label_only.max_train: expected an integer"),
        ("label_only: {balance_train: maybe}", r"c.yaml.label_only.balance_train: expected true/false"),
        ("label_only: {learnin_rate: 0.1}", r"c.yaml.label_only: unknown key\(s\) \['learnin_rate'\]"),
        ("label_only: {learning_rate: fast}", r"c.yaml.label_only.learning_rate: expected a number"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load("rows: [label_only_sft]\n" + text + "\n")


def test_label_only_job_config_differs_only_where_the_section_says(tmp_path):
    """The label-only SFT job: the sft: section with label_only:'s keys on top (an alias in one and the field name in
    the other are one key), label_only's training-split keys in its data; the reasoning SFT job is untouched."""
    data = DataConfig(max_train=20, balance_train=True, max_eval=7)
    sft = {"epochs": 3, "learning_rate": 1e-4, "traces_file": "teacher.jsonl", "max_steps": 5}
    label_only = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "max_train": 50, "balance_train": False}

    def run_of(lo):
        cfg = CompareConfig(model="BASE", data=data, sft=sft, label_only=lo, seed=2)
        return compare.CompareRun(cfg=cfg, out=tmp_path, rows=[], train=[], evals=[], labels=[], state={},
                                  command="", same_as={})

    plain, given = run_of({}), run_of(label_only)
    assert given.sft_config("reasoning", tmp_path / "sft") == plain.sft_config("reasoning", tmp_path / "sft")
    reasoning = given.sft_config("reasoning", tmp_path / "sft")
    assert (reasoning.num_train_epochs, reasoning.traces_file, reasoning.data) == (3, "teacher.jsonl", data)
    lab = given.sft_config("label", tmp_path / "lo")
    assert (lab.target, lab.model, lab.seed, lab.traces_file) == ("label", "BASE", 2, None)
    assert (lab.num_train_epochs, lab.per_device_train_batch_size, lab.learning_rate, lab.max_steps) == (1, 4, 1e-4, 5)
    assert (lab.data.max_train, lab.data.balance_train) == (50, False)
    assert dataclasses.replace(lab.data, max_train=20, balance_train=True) == data  # nothing else of data moved
    # without the section the label-only job is today's: the sft: recipe on the shared sample
    old = plain.sft_config("label", tmp_path / "lo")
    assert (old.num_train_epochs, old.per_device_train_batch_size, old.data) == (3, 8, data)


# ------------------------------------------------------------------------------- wiring with fake jobs


def _write_fake_eval(out, records) -> None:
    """What a fake ``evaluate`` leaves behind: every pair predicted Exact, a format-valid rate of 1."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "predictions.jsonl").write_text("".join(json.dumps({"id": r.id, "label": "Exact"}) + "\n"
                                                         for r in records))
    (Path(out) / "metrics.json").write_text(json.dumps({"format_valid_rate": 1.0}))


def test_wiring_with_fake_jobs(tmp_path, monkeypatch):
    """Every job replaced by a fake that records its config: the budgets, the shared SFT start, the judge
    trained by the prm section, and the curriculum stages are what the rules say."""
    import she.evaluation.evaluate as ev_mod
    import she.sampling.curriculum as cur_mod
    import she.sampling.difficulty as diff_mod
    import she.training.dpo as dpo_mod
    import she.training.prm as prm_mod
    import she.training.reward_model as rm_mod
    import she.training.rl as rl_mod
    import she.training.sft as sft_mod

    calls: list[tuple[str, object]] = []

    def folder(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text("{}")
        return p

    def fake_sft(cfg, train, validation=None):
        calls.append(("sft", cfg))
        return folder(Path(cfg.output_dir) / "final")

    def fake_rl(cfg, train, callbacks=None):
        calls.append(("rl", (cfg, len(train))))
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "log_history.json").write_text(json.dumps(
            [{"step": s, "loss": 0.0, "reward": 0.1 * s, "entropy": 1.0, "srpo/step_reward/Type": 0.5,
              "srpo/step_reward/Brand": 1.0} for s in range(1, cfg.max_steps + 1)]))
        return folder(Path(cfg.output_dir) / "final")

    def fake_passn_job(kind):
        def run(cfg, train, progress=True):
            calls.append((kind, cfg))
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "pairs_stats.json").write_text(json.dumps({"generations": cfg.rollouts.n * cfg.rollouts.max_records}))
            return folder(out / "final")
        return run

    def fake_prm(cfg, progress=True):
        calls.append(("prm", cfg))
        folder(Path(cfg.output_dir) / "judge")
        return {}

    def fake_rates(model, records, k, cache, **kw):
        calls.append(("rates", (model, len(records), k)))
        return {r.id: 1.0 if i < 2 else 0.5 for i, r in enumerate(records)}  # the first two always solved

    def fake_eval(model, records, out, **kw):
        _write_fake_eval(out, records)
        return {}

    monkeypatch.setattr(sft_mod, "train_sft", fake_sft)
    monkeypatch.setattr(rl_mod, "run_rl_job", fake_rl)
    monkeypatch.setattr(dpo_mod, "run_dpo_job", fake_passn_job("dpo"))
    monkeypatch.setattr(rm_mod, "run_reward_model_job", fake_passn_job("rm"))
    monkeypatch.setattr(prm_mod, "run_prm_job", fake_prm)
    monkeypatch.setattr(diff_mod, "estimate_pass_rates", fake_rates)
    monkeypatch.setattr(ev_mod, "evaluate", fake_eval)
    rows = ["sft", "label_only_sft", "dpo", "grpo", "rm_grpo", "srpo", "srpo_judge_only", "srpo_full",
            "srpo_full_no_difficulty"]
    cfg = CompareConfig(model="BASE", output_dir=str(tmp_path / "c"), rows=rows, prm={"max_records": 7},
                        sft={"traces_file": "teacher.jsonl", "max_steps": 5},
                        rl={"examiner": "hybrid", "max_steps": 10, "prompts_per_step": 2, "num_generations": 4},
                        difficulty=compare.DifficultyConfig(max_records=12, k=4), diverse=compare.DiverseConfig(
                            embedder="hashing"), data=DataConfig(synthetic_queries=30), eval=compare.CompareEvalConfig(max_eval=10))
    res = compare.run_compare(cfg)
    sft_dir = str(tmp_path / "c" / "sft" / "final")
    sfts = [c for k, c in calls if k == "sft"]
    assert sorted((c.target, c.model, c.traces_file, c.max_steps) for c in sfts) == [
        ("label", "BASE", None, 5), ("reasoning", "BASE", "teacher.jsonl", 5)]  # the reasoning SFT trained once
    prm = [c for k, c in calls if k == "prm"]
    assert len(prm) == 1 and prm[0].policy == sft_dir and prm[0].max_records == 7
    judge = str(tmp_path / "c" / "prm" / "judge")
    dpo = next(c for k, c in calls if k == "dpo")
    rm = next(c for k, c in calls if k == "rm")
    # pass@N at the RL budget: n = num_generations, 10 steps x 2 prompts = 20 prompts; one shared cache
    assert (dpo.rollouts.n, dpo.rollouts.max_records, dpo.model) == (4, 20, sft_dir)
    assert dpo.rollouts == rm.rollouts and (rm.model, rm.policy) == (sft_dir, sft_dir)
    rl = {c.output_dir: c for k, (c, n) in [(k, v) for k, v in calls if k == "rl"]}
    grpo = rl[str(tmp_path / "c" / "grpo")]
    # GRPO's examiner only logs step metrics: the verifier, no judge loaded
    assert (grpo.max_steps, grpo.model, grpo.judge, grpo.step_rewards) == (10, sft_dir, None, False)
    assert rl[str(tmp_path / "c" / "rm_grpo")].reward_model == str(tmp_path / "c" / "rm" / "final")
    # strict budget: 12 pool prompts x k=4 = 48 generations = 6 steps of 2 x 4 -> 4 RL steps, split 1 + 3;
    # stage 2 starts from stage 1
    assert rl[str(tmp_path / "c" / "srpo_full" / "stage-1-main")].model == str(
        tmp_path / "c" / "srpo_full" / "stage-0-easy" / "final")
    stage_runs = [(Path(c.output_dir).parent.name, Path(c.output_dir).name, c.max_steps)
                  for k, (c, n) in [(k, v) for k, v in calls if k == "rl"] if Path(c.output_dir).name.startswith("stage")]
    # no_difficulty pays nothing for estimation: 10 steps, split 2 + 8
    assert stage_runs == [("srpo_full", "stage-0-easy", 1), ("srpo_full", "stage-1-main", 3),
                          ("srpo_full_no_difficulty", "stage-0-easy", 2), ("srpo_full_no_difficulty", "stage-1-main", 8)]
    assert [v for k, v in calls if k == "rates"] == [(sft_dir, 12, 4)]  # estimated once for every srpo_full row
    r = res["rows"]
    assert r["grpo"]["generations"] == 80 and r["dpo"]["generations"] == 80
    assert r["rm_grpo"]["generations_by_source"] == {"pass@n": 80, "rl": 80}
    assert r["srpo_full"]["generations_by_source"] == {"rl": 32, "difficulty": 48}
    assert r["srpo_full_no_difficulty"]["generations_by_source"] == {"rl": 80}
    assert r["srpo_full"]["generations"] <= r["grpo"]["generations"]
    sel = json.loads((tmp_path / "c" / "srpo_full" / "selection.json").read_text())
    # the band 0 < p < 1 drops the two always-solved prompts; 4 steps x 2 prompts = 8 are selected
    assert sel["after_band"] == 10 and sel["n_wanted"] == 8 and len(sel["ids"]) == 8
    assert set(res["plots"]) == {"reward", "step_reward", "entropy", "macro_f1"}
    assert all((tmp_path / "c" / f).stat().st_size > 1000 for f in res["plots"].values())


def test_label_only_row_trains_on_its_own_sample_of_the_training_queries(tmp_path, monkeypatch):
    """With a label_only: section the label-only job gets its own, larger sample of the training split -- only
    training queries, none evaluated or used for calibration -- while every other row (its jobs and the pairs it
    is scored on) is the same as without the section; the report gives the row's pairs next to its result."""
    import she.evaluation.evaluate as ev_mod
    import she.training.sft as sft_mod
    from she.data.sources import load_splits
    from she.recipes.compare.plan import group_of

    calls: dict[str, list] = {}

    def fake_sft(cfg, train, validation=None):
        key = f"{Path(cfg.output_dir).parent.name}/{Path(cfg.output_dir).name}"
        calls.setdefault(key, []).append((cfg, [r.id for r in train], {group_of(r) for r in train}))
        final = Path(cfg.output_dir) / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "config.json").write_text("{}")
        return final

    evaluated: dict[str, list[str]] = {}

    def fake_eval(model, records, out, **kw):
        evaluated[str(out)] = [r.id for r in records]
        _write_fake_eval(out, records)
        return {}

    monkeypatch.setattr(sft_mod, "train_sft", fake_sft)
    monkeypatch.setattr(ev_mod, "evaluate", fake_eval)
    data = DataConfig(synthetic_queries=60, max_train=20, balance_train=True, max_eval=30)
    kw = dict(model="BASE", rows=["majority", "sft", "label_only_sft"], data=data, sft={"max_steps": 5},
              eval=compare.CompareEvalConfig(max_eval=25), bootstrap=compare.BootstrapConfig(n=20))
    base = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "a"), **kw))
    res = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "b"), label_only={
        "max_train": 100, "balance_train": False, "learning_rate": 3e-4}, **kw))

    splits = load_splits(data)
    whole_train = load_splits(dataclasses.replace(data, max_train=None))["train"]
    held_out = {group_of(r) for part in ("validation", "test") for r in splits[part]}
    lo_cfg, lo_ids, lo_groups = calls["b/label_only_sft"][0]
    assert len(lo_ids) == 100 > len(splits["train"]) == 20  # more pairs than the shared sample
    assert set(lo_ids) <= {r.id for r in whole_train} and not lo_groups & held_out  # training queries only
    assert (lo_cfg.target, lo_cfg.learning_rate, lo_cfg.max_steps) == ("label", 3e-4, 5)
    assert (lo_cfg.data.max_train, lo_cfg.data.balance_train) == (100, False)
    # the other rows are unchanged: the reasoning SFT job and its sample, and every row's evaluation pairs
    (sft_a, ids_a, _), (sft_b, ids_b, _) = calls["a/sft"][0], calls["b/sft"][0]
    assert ids_a == ids_b == [r.id for r in splits["train"]]
    assert dataclasses.replace(sft_a, output_dir="x") == dataclasses.replace(sft_b, output_dir="x")
    assert calls["a/label_only_sft"][0][1] == ids_a  # without the section: the shared sample, as before
    eval_ids = [r.id for r in seeded_subset(splits["test"], 25, "0:compare-eval")]
    assert len(evaluated) == 4 and all(ids == eval_ids for ids in evaluated.values())
    for row in ("majority", "sft"):
        assert res["rows"][row]["macro_f1"] == base["rows"][row]["macro_f1"]
    # the budget next to the result: training pairs and wall time of the row, in results.json and results.md
    r = res["rows"]
    assert [r[row]["train_pairs"] for row in ("label_only_sft", "sft", "majority")] == [100, 20, None]
    assert r["label_only_sft"]["wall_time_s"] is not None and base["rows"]["label_only_sft"]["train_pairs"] == 20
    lo = res["data"]["label_only"]
    assert (lo["train_n"], lo["max_train"], lo["balance_train"]) == (100, 100, False)
    assert sum(lo["train_labels"].values()) == 100
    assert base["data"]["label_only"] is None
    md = (tmp_path / "b" / "results.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| label_only_sft |"))
    assert line.split("|")[-3].strip() == "100"  # the train pairs column, next to the train wall time
    assert "label_only_sft (Macro F1" in md and "trains on its own sample of the same training queries: 100 pairs" in md
    assert "trains on its own sample" not in (tmp_path / "a" / "results.md").read_text()


def test_rl_prompts_fresh_trains_rl_on_training_queries_the_sft_never_saw(tmp_path, monkeypatch):
    """``rl_prompts: fresh``: the RL rows get as many pairs as the SFT sample, drawn label-balanced like it, from
    training queries it does not contain (none held out); ``sft`` (the default) gives them the SFT's own pairs.
    The SFT job and the evaluation pairs do not change; the data summary names the RL sample."""
    from collections import Counter

    import she.evaluation.evaluate as ev_mod
    import she.training.rl as rl_mod
    import she.training.sft as sft_mod
    from she.data.sources import load_splits
    from she.recipes.compare.plan import group_of

    calls: dict[str, list] = {}

    def folder(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text("{}")
        return p

    def fake_sft(cfg, train, validation=None):
        calls.setdefault(f"{Path(cfg.output_dir).parent.name}/sft", []).append([r.id for r in train])
        return folder(Path(cfg.output_dir) / "final")

    def fake_rl(cfg, train, callbacks=None):
        calls.setdefault(f"{Path(cfg.output_dir).parent.name}/rl", []).append(list(train))
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "log_history.json").write_text(json.dumps([{"step": 1, "loss": 0.0, "reward": 0.0}]))
        return folder(Path(cfg.output_dir) / "final")

    monkeypatch.setattr(sft_mod, "train_sft", fake_sft)
    monkeypatch.setattr(rl_mod, "run_rl_job", fake_rl)
    monkeypatch.setattr(ev_mod, "evaluate", lambda model, records, out, **kw: _write_fake_eval(out, records) or {})
    data = DataConfig(synthetic_queries=60, max_train=18, balance_train=True, max_eval=30)
    kw = dict(model="BASE", rows=["sft", "grpo"], data=data, sft={"max_steps": 5},
              rl={"max_steps": 2, "prompts_per_step": 2, "num_generations": 2},
              eval=compare.CompareEvalConfig(max_eval=25), bootstrap=compare.BootstrapConfig(n=20))
    base = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "a"), **kw))
    res = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "b"), rl_prompts="fresh", **kw))

    splits = load_splits(data)
    whole_train = {r.id for r in load_splits(dataclasses.replace(data, max_train=None))["train"]}
    sft_ids = [r.id for r in splits["train"]]
    assert calls["a/sft"] == calls["b/sft"] == [sft_ids]  # the SFT job is the same either way
    assert [r.id for r in calls["a/rl"][0]] == sft_ids  # default: RL on the SFT's own pairs
    fresh = calls["b/rl"][0]
    assert len(fresh) == len(sft_ids) == 18 and {r.id for r in fresh} <= whole_train
    assert not {group_of(r) for r in fresh} & {group_of(r) for r in splits["train"]}  # new queries only
    assert max(Counter(r.label for r in fresh).values()) - min(Counter(r.label for r in fresh).values()) <= 1
    assert res["data"]["rl_prompts"]["train_n"] == 18 and base["data"]["rl_prompts"] is None
    # the same draw again (a resumed run must train on the same prompts)
    again = compare.run_compare(CompareConfig(output_dir=str(tmp_path / "c"), rl_prompts="fresh", **kw))
    assert [r.id for r in calls["c/rl"][0]] == [r.id for r in fresh] and again["data"]["rl_prompts"] == res["data"][
        "rl_prompts"]
    with pytest.raises(ConfigError, match="rl_prompts: 'new'"):
        compare.run_compare(CompareConfig(output_dir=str(tmp_path / "d"), rl_prompts="new", **kw))


def test_fresh_train_sample_excludes_used_queries_and_fails_when_none_is_left():
    from she.data.sources import fresh_train_sample, load_splits
    from she.errors import UserError

    data = DataConfig(synthetic_queries=20, max_train=10)
    train = load_splits(dataclasses.replace(data, max_train=None))["train"]
    used = train[:5]
    got = fresh_train_sample(data, used, 1000)  # fewer than asked: every fresh pair, each once
    assert len(got) == len({r.id for r in got}) == sum(r.group not in {u.group for u in used} for r in train)
    assert fresh_train_sample(data, used, 4) == fresh_train_sample(data, used, 4)  # seeded
    with pytest.raises(UserError, match="no training pair outside the"):
        fresh_train_sample(data, train, 3)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        fresh_train_sample(data, used, 0)


def test_resuming_a_run_from_before_a_new_config_key_does_not_call_the_config_changed(tmp_path, caplog):
    from she.config import to_dict
    from she.recipes.compare.run import STATE_FILE, _initial_state

    cfg = CompareConfig(output_dir=str(tmp_path))
    old = json.loads(json.dumps(to_dict(cfg), default=str))
    del old["label_only"]  # a state file written before the label_only section existed
    (tmp_path / STATE_FILE).write_text(json.dumps({"config": old, "jobs": {"sft": {"seconds": 1.0}}}))
    with caplog.at_level("WARNING"):
        assert _initial_state(tmp_path, cfg)["jobs"] == {"sft": {"seconds": 1.0}}
    assert "config changed" not in caplog.text
    with caplog.at_level("WARNING"):
        _initial_state(tmp_path, dataclasses.replace(cfg, label_only={"max_train": 9}))
    assert "the config changed in ['label_only']" in caplog.text


def test_strict_budget_with_too_large_pool_fails_before_training(tmp_path, monkeypatch):
    import she.training.sft as sft_mod

    monkeypatch.setattr(sft_mod, "train_sft", lambda *a, **k: pytest.fail("trained before the budget check"))
    cfg = CompareConfig(output_dir=str(tmp_path / "c"), rows=["srpo_full"], rl={"max_steps": 2},
                        difficulty=compare.DifficultyConfig(max_records=10), data=DataConfig(synthetic_queries=20))
    with pytest.raises(ValueError, match=r"budget strict leaves -3 RL steps: estimating 10 pool prompts x k=4 = 40"):
        compare.run_compare(cfg)


# ------------------------------------------------------------------------------------ the whole table


def _write_scripted_caches(out: Path, cfg: CompareConfig, train, pool_rates: dict[str, int]) -> None:
    from she.reasoning.rationale import write_rationale
    from she.training.pairs import RecordRollouts, judge_rollout, rollout_settings

    other = {"Exact": "Irrelevant", "Partial": "Exact", "Irrelevant": "Partial"}
    settings = rollout_settings(out / "sft" / "final", n=cfg.rl["num_generations"], temperature=1.0, top_p=1.0,
                                max_new_tokens=cfg.rl["max_completion_length"], prompt_style="compact")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "passn_rollouts.jsonl", "w") as f:
        for r in train:
            gold = write_rationale(r)
            wrong = re.sub(r"(?m)^Verdict: .*$", f"Verdict: {other[r.label]}", gold)
            f.write(RecordRollouts(r.id, r.label, [judge_rollout(gold, r), judge_rollout(wrong, r)], settings).to_json()
                    + "\n")
    (out / "difficulty").mkdir(exist_ok=True)
    with open(out / "difficulty" / "pass_rates.jsonl", "w") as f:
        for rid, passes in pool_rates.items():
            f.write(json.dumps({"id": rid, "gold": next(r.label for r in train if r.id == rid), "k": 2,
                                "passes": passes}) + "\n")


JOBS = [("she.training.sft", "train_sft"), ("she.training.dpo", "run_dpo_job"),
        ("she.training.reward_model", "run_reward_model_job"), ("she.training.rl", "run_rl_job"),
        ("she.training.cross_encoder", "run_cross_encoder_job"), ("she.training.prm", "run_prm_job"),
        ("she.sampling.difficulty", "estimate_pass_rates"), ("she.sampling.diverse", "diverse_select"),
        ("she.sampling.curriculum", "run_curriculum"), ("she.evaluation.evaluate", "evaluate"),
        ("she.recipes.compare.run", "evaluate_checkpoint")]


def _spy(monkeypatch, forbid: bool = False) -> dict[str, int]:
    import importlib

    counts: dict[str, int] = {}
    for mod_name, fn in JOBS:
        mod = importlib.import_module(mod_name)
        orig = getattr(mod, fn)

        def wrapper(*a, _orig=orig, _fn=fn, **k):
            if forbid:
                raise AssertionError(f"{_fn} was called on a rerun")
            counts[_fn] = counts.get(_fn, 0) + 1
            return _orig(*a, **k)

        monkeypatch.setattr(mod, fn, wrapper)
    return counts


@pytest.mark.slow
def test_whole_table_on_the_tiny_model_then_a_rerun_runs_nothing(tmp_path, tiny_model_dir, tiny_bert_factory,
                                                                monkeypatch, capsys):
    from she.data.sources import load_splits
    from she.cli import main

    pytest.importorskip("trl")
    out = tmp_path / "cmp"
    base = load_compare_config(CONFIG)
    splits = load_splits(base.data)
    bert = tiny_bert_factory(tmp_path / "bert", splits["train"] + splits["test"], hidden_size=16, intermediate_size=32,
                             max_position_embeddings=80)
    # every row but the computed- and enumerated-rollout ones: the tiny SFT writes the default schema, whose Type and Attributes come
    # from the label, so no step of it can be computed (those rows refuse it: tests/test_computed_rollouts.py)
    from she.recipes.compare.rows import ROWS

    table = [r for r in ALL_ROWS if (ROWS[r].rl or {}).get("rollout_evidence") not in ("computed", "enumerated")]
    over = {"rows": table, "model": str(tiny_model_dir), "judge": str(tiny_model_dir), "output_dir": str(out),
            "cross_encoder.model": str(bert)}
    cfg = load_compare_config(CONFIG, over)
    pool = seeded_subset(splits["train"], 2, "0:compare-pool")
    # both pool prompts solved 1 time in 2: in the band 0 < p < 1 and in the easy stage (p >= 0.5)
    _write_scripted_caches(out, cfg, splits["train"], {pool[0].id: 1, pool[1].id: 1})

    counts = _spy(monkeypatch)
    res = compare.run_compare(cfg, command="pytest")
    # SFT + label-only SFT; 5 plain RL rows + 2 + 2 + 2 curriculum stages + 1 = 12 RL runs (no_step_reward reuses
    # grpo, srpo_gated srpo, srpo_gated_verifier_only srpo_verifier_only), + 8 estimator/step-reward ablations
    # + 9 seed repeats (3 of grpo, 2 each of srpo_gated, srpo_gated_graded_missing, srpo_decoupled) + 4
    # likelihood-outcome rows + srpo_likelihood, its 2 seeds, srpo_likelihood_outcome, srpo_likelihood_prob and
    # srpo_likelihood_prob_balanced with its 3 seeds, srpo_likelihood_balanced with its 2 (srpo_likelihood_g2 is
    # srpo_likelihood's job here: the tiny groups are of 2)
    assert counts["train_sft"] == 2 and counts["run_rl_job"] == 45 and counts["run_curriculum"] == 3
    assert counts["run_dpo_job"] == counts["run_reward_model_job"] == counts["run_cross_encoder_job"] == 1
    assert counts["estimate_pass_rates"] == 1 and "run_prm_job" not in counts  # judge given: no PRM job
    assert counts["evaluate"] == 45  # every generative row but the reused ones (majority/cross-encoder: no LM)

    rows = res["rows"]
    assert list(rows) == table
    for name, r in rows.items():
        for metric in ("macro_f1", "accuracy"):
            lo, hi = r[f"{metric}_ci"]
            assert lo <= r[metric] <= hi, (name, metric, r[metric], lo, hi)
        assert r["n"] == len(splits["test"])
    labels = ["Irrelevant", "Partial", "Exact"]
    maj = majority_label(splits["train"], labels)
    assert rows["majority"]["accuracy"] == pytest.approx(sum(r.label == maj for r in splits["test"]) / len(splits["test"]))
    assert rows["srpo_no_step_reward"]["same_as"] == "grpo"
    assert rows["srpo_no_step_reward"]["macro_f1_ci"] == rows["grpo"]["macro_f1_ci"]
    # budgets: 3 steps x 2 prompts x 2 generations = 12 for every RL row; pass@2 on 6 prompts = 12;
    # srpo_full: 2 pool prompts x k=2 = 4 generations = 1 step -> 2 RL steps = 8, 12 in all
    for name in ("grpo", "srpo", "srpo_verifier_only", "srpo_judge_only", "srpo_full_no_difficulty", "dpo"):
        assert rows[name]["generations"] == 12, name
    assert rows["rm_grpo"]["generations_by_source"] == {"pass@n": 12, "rl": 12}
    assert rows["srpo_full"]["generations_by_source"] == {"rl": 8, "difficulty": 4}
    assert rows["majority"]["generations"] == rows["cross_encoder"]["generations"] == 0
    sel = json.loads((out / "srpo_full" / "selection.json").read_text())
    assert (sel["pool"], sel["after_band"], sel["n_wanted"], sel["ids"]) == (2, 2, 4, [r.id for r in pool])
    assert all(r["wall_time_s"] is not None for r in rows.values())

    md = (out / "results.md").read_text()
    for name in table:
        assert f"| {name}" in md, name
    assert "Command: `pytest`" in md and "Seed: 0" in md and "## Ablations" in md
    assert "## More seeds of the main rows" in md and "| srpo_gated - grpo | 3 | 4 |" in md
    assert "## Calibrated verdicts" in md and rows["grpo"]["calibrated"]["label_offsets"].keys() == set(labels)
    assert "calibrated" not in rows["majority"] and "calibrated" not in rows["cross_encoder"]
    assert (out / "grpo" / "eval" / "calibration.json").exists() and res["paired_calibrated"]
    paired = {(p["a"], p["b"]): p for p in res["paired"]}
    assert paired[("srpo_gated", "grpo")]["runs_a"] == ["srpo_gated", "srpo_gated_seed1", "srpo_gated_seed2"]
    assert paired[("srpo_gated", "sft")]["runs_b"] == ["sft"]
    for p in paired.values():
        assert p["lo"] <= p["diff"] <= p["hi"]
    for plot in ("reward.png", "entropy.png", "macro_f1.png", "macro_f1_over_training.png"):
        assert (out / plot).stat().st_size > 1000, plot
    # the random model writes no parseable step, so no step reward was logged and no empty plot is drawn
    assert "step_reward" not in res["plots"] and not (out / "step_reward.png").exists()
    curve = res["checkpoint_macro_f1"]["grpo"]
    assert [p[0] for p in curve] == [0, 2, 3]  # SFT start, checkpoint-2, final
    state = json.loads((out / "compare_state.json").read_text())
    assert state["done"] == table

    # a rerun (here through the CLI) calls no job and gives the same table
    monkeypatch.undo()
    _spy(monkeypatch, forbid=True)
    main(["compare", str(out / "compare_config.json")])  # the resolved config it saved is a valid config
    assert "| srpo_full_no_curriculum" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    for name in table:
        assert again["rows"][name]["macro_f1_ci"] == rows[name]["macro_f1_ci"]
        assert again["rows"][name]["generations"] == rows[name]["generations"]

    # a killed run that lost one evaluation: only that one is redone
    monkeypatch.undo()
    (out / "sft" / "eval" / "metrics.json").unlink()
    counts = _spy(monkeypatch)
    compare.run_compare(cfg, command="pytest")
    assert counts == {"evaluate": 1}


def test_a_selection_smaller_than_a_batch_fails_clearly(tmp_path, monkeypatch):
    """TRL would "train" zero steps on fewer distinct prompts than prompts_per_step; compare refuses first."""
    import she.sampling.difficulty as diff_mod
    import she.training.rl as rl_mod
    import she.training.sft as sft_mod

    def fake_sft(cfg, train, validation=None):
        (Path(cfg.output_dir) / "final").mkdir(parents=True)
        (Path(cfg.output_dir) / "final" / "config.json").write_text("{}")

    monkeypatch.setattr(sft_mod, "train_sft", fake_sft)
    monkeypatch.setattr(diff_mod, "estimate_pass_rates",
                        lambda m, records, k, c, **kw: {r.id: 0.5 if i == 0 else 0.0 for i, r in enumerate(records)})
    monkeypatch.setattr(rl_mod, "run_rl_job", lambda *a, **k: pytest.fail("RL started on a too small selection"))
    cfg = CompareConfig(output_dir=str(tmp_path / "c"), rows=["srpo_full"], rl={"max_steps": 8, "prompts_per_step": 2,
                        "num_generations": 2}, difficulty=compare.DifficultyConfig(max_records=4, k=2),
                        diverse=compare.DiverseConfig(embedder="hashing"), data=DataConfig(synthetic_queries=20))
    with pytest.raises(ValueError, match=r"srpo_full: stage 'easy' has 1 prompt\(s\) but every RL step needs "
                                         r"prompts_per_step=2"):
        compare.run_compare(cfg)


def test_no_diverse_row_with_the_same_prompts_as_srpo_full_is_flagged(tmp_path):
    """When the band holds no more prompts than wanted, diverse and random selection keep the same set: the row
    is then flagged in results.md instead of being read as 'diverse sampling made no difference'."""
    from types import SimpleNamespace

    def sel(row, ids):
        (tmp_path / row).mkdir(exist_ok=True)
        (tmp_path / row / "selection.json").write_text(json.dumps({"after_band": 3, "n_wanted": 8, "ids": ids}))

    ctx = SimpleNamespace(out=tmp_path)
    sel("srpo_full", ["a", "b", "c"])
    sel("srpo_full_no_diverse", ["c", "a", "b"])
    note = compare.CompareRun.note(ctx, "srpo_full_no_diverse")
    assert note is not None and "same 3 prompts" in note and "held 3, 8 were wanted" in note
    assert compare.CompareRun.note(ctx, "srpo_full_no_curriculum") is None
    sel("srpo_full_no_diverse", ["a", "b", "d"])
    assert compare.CompareRun.note(ctx, "srpo_full_no_diverse") is None
    (tmp_path / "srpo_full" / "selection.json").unlink()
    assert compare.CompareRun.note(ctx, "srpo_full_no_diverse") is None

    row = {"macro_f1": 0.2, "macro_f1_ci": [0.1, 0.3], "accuracy": 0.5, "accuracy_ci": [0.4, 0.6],
           "per_class_f1": {}, "description": "d"}
    s = {"rows": {"srpo_full": {**row, "kind": "main"},
                  "srpo_full_no_diverse": {**row, "kind": "ablation", "note": note}},
         "labels": ["Irrelevant", "Partial", "Exact"], "output_dir": "o", "command": "c", "seed": 0,
         "bootstrap": {"n": 10, "seed": 0, "alpha": 0.05},
         "data": {"source": "s", "taxonomy": "hd3", "split_seed": 0, "balance_train": False, "split_sizes": {},
                  "eval_n": 1, "eval_split": "test", "eval_query_groups": 1, "eval_labels": {}},
         "budget": {"mode": "strict", "rl": {"max_steps": 1, "prompts_per_step": 1, "num_generations": 2},
                    "rl_generations_per_row": 2}}
    md = compare.results_markdown(s)
    assert f"- **srpo_full_no_diverse** {note}." in md and md.index("Notes:") < md.index("## Rows")
    assert "Steps the verifier could check" not in md
    s["rows"]["srpo_full"]["step_checks"] = {"Missing": {"accuracy": 0.5}, "Type": {"accuracy": 0.25}}
    s["rows"]["srpo_full_no_diverse"]["step_checks"] = {"Type": {"accuracy": 1.0}}
    md = compare.results_markdown(s)
    assert "| row | Missing | Type |" in md
    assert "| srpo_full | 0.500 | 0.250 |" in md and "| srpo_full_no_diverse | - | 1.000 |" in md


def test_majority_of_a_balanced_sample_is_the_split_prior(tmp_path):
    """A label-balanced training sample has no majority (its tie-break would say Irrelevant); the majority
    baseline of `she compare` and `she demo` reads the split's own prior instead (issue 13)."""
    from she.config import DataConfig
    from she.data.sources import load_splits, majority_label, prior_train

    labels = ["Irrelevant", "Partial", "Exact"]
    shares = ["Exact"] * 12 + ["Partial"] * 5 + ["Irrelevant"] * 3
    rows = [{"id": str(i), "query": f"query {i}", "product": {"title": f"title {i}"}, "label": lab}
            for i, lab in enumerate(shares * 5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), format="jsonl", balance_train=True, max_train=9)
    train = load_splits(cfg)["train"]
    assert sorted(r.label for r in train) == sorted(labels * 3)  # equal thirds: the tie goes to Irrelevant
    assert majority_label(train, labels) == "Irrelevant"
    assert majority_label(prior_train(cfg, train), labels) == "Exact"
    unbalanced = DataConfig(path=str(path), format="jsonl", max_train=9)
    assert prior_train(unbalanced, train) is train


@pytest.mark.parametrize("keep", [False, True])
def test_finished_jobs_lose_their_checkpoints_unless_kept(tmp_path, monkeypatch, keep):
    """A finished job's checkpoint-N folders (resume points only) are deleted and its final folder kept, unless
    keep_checkpoints is set; a job that has not finished is never touched (its checkpoints are how it resumes)."""
    import she.evaluation.evaluate as ev_mod
    import she.training.rl as rl_mod
    import she.training.sft as sft_mod

    def fake_job(cfg, *args, **kwargs):
        out = Path(cfg.output_dir)
        for n in (10, 20):
            (out / f"checkpoint-{n}").mkdir(parents=True)
            (out / f"checkpoint-{n}" / "optimizer.pt").write_bytes(b"x" * 64)
        (out / "checkpoint-notes").mkdir()  # not a Trainer checkpoint: kept
        (out / "final").mkdir()
        (out / "final" / "config.json").write_text("{}")
        return out / "final"

    def fake_eval(model, records, out, **kw):
        _write_fake_eval(out, records)
        return {}

    monkeypatch.setattr(sft_mod, "train_sft", fake_job)
    monkeypatch.setattr(rl_mod, "run_rl_job", fake_job)
    monkeypatch.setattr(ev_mod, "evaluate", fake_eval)
    out = tmp_path / "c"
    unfinished = out / "grpo_seed1" / "checkpoint-5"  # a row not in this run, killed midway
    unfinished.mkdir(parents=True)
    cfg = CompareConfig(model="BASE", output_dir=str(out), rows=["sft", "grpo"], keep_checkpoints=keep,
                        rl={"max_steps": 2, "prompts_per_step": 2, "num_generations": 2},
                        data=DataConfig(synthetic_queries=30), eval=compare.CompareEvalConfig(max_eval=10),
                        bootstrap=compare.BootstrapConfig(n=20))
    compare.run_compare(cfg)
    if not keep:  # a job finished in an earlier run (before the clean-up existed) is cleaned on the rerun
        (out / "grpo" / "checkpoint-30").mkdir()
        compare.run_compare(cfg)
    for job in ("sft", "grpo"):
        left = sorted(p.name for p in (out / job).iterdir() if p.is_dir() and p.name != "eval")
        assert left == (["checkpoint-10", "checkpoint-20", "checkpoint-notes", "final"] if keep
                        else ["checkpoint-notes", "final"])
        assert (out / job / "final" / "config.json").exists()
    assert unfinished.is_dir()


def test_eval_evidence_reads_every_generative_row_that_way_in_its_own_folder(tmp_path, tiny_model_dir, monkeypatch):
    """``eval.evidence: marginal``: a row is evaluated and calibrated with that read-out (the evaluate and
    judge_records calls say so) into ``<row>/eval_marginal``, next to the generated reading's ``<row>/eval``."""
    import she.evaluation.evaluate as ev
    from she.data.schema import Product, Record
    from she.evaluation.generate import Judgement
    from she.recipes.compare.run import CompareRun

    with pytest.raises(ConfigError, match=r"compare-tiny.yaml.eval.evidence: 'oracle'; use one of"):
        load_compare_config(CONFIG, {"eval.evidence": "oracle"})
    labels = ["Irrelevant", "Partial", "Exact"]
    recs = [Record(id=f"t{i}", query="q", product=Product(title="t"), label=lab) for i, lab in enumerate(labels)]
    calls = []

    def fake_evaluate(model, records, out_dir, *, evidence="generated", **kw):
        calls.append(("evaluate", evidence, Path(out_dir).name))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text("{}")
        (Path(out_dir) / "predictions.jsonl").write_text("".join(
            json.dumps({"id": r.id, "label": "Exact", "probs": {"Irrelevant": 0.3, "Partial": 0.3, "Exact": 0.4}})
            + "\n" for r in records))

    def fake_judge(model, tok, records, *, evidence="generated", **kw):
        calls.append(("judge_records", evidence))
        return [Judgement(r.id, "", "Exact", {"Irrelevant": 0.4, "Partial": 0.2, "Exact": 0.4}, True, None, 0,
                          raw_label="Exact") for r in records]

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(ev, "judge_records", fake_judge)
    monkeypatch.setattr("she.models.registry.load_model_and_tokenizer", lambda path: (None, None))
    for mode, folder in (("generated", "eval"), ("marginal", "eval_marginal")):
        cfg = load_compare_config(CONFIG, {"output_dir": str(tmp_path), "eval.evidence": mode, "eval.calibrate": True})
        run = CompareRun(cfg=cfg, out=tmp_path, rows=["sft"], train=[], evals=recs, labels=labels,
                         state={"evals": {}}, command="pytest", same_as={}, calib=recs)
        got, _ = run.predictions("sft", tiny_model_dir)
        offsets = run.calibration("sft", tiny_model_dir)
        assert got == tmp_path / "sft" / folder and (got / "calibration.json").exists() and offsets is not None
        assert calls[-2:] == [("evaluate", mode, folder), ("judge_records", mode)]
    # offsets cached by another fit method are refitted, not reused; the same method reads the cache
    n_judged = sum(c[0] == "judge_records" for c in calls)
    for method, judged in (("grid", 0), ("bagged", 1), ("bagged", 0)):
        cfg = load_compare_config(CONFIG, {"output_dir": str(tmp_path), "eval.evidence": "marginal",
                                           "eval.calibrate": True, "eval.calibration_method": method})
        run = CompareRun(cfg=cfg, out=tmp_path, rows=["sft"], train=[], evals=recs, labels=labels,
                         state={"evals": {}}, command="pytest", same_as={}, calib=recs)
        run.calibration("sft", tiny_model_dir)
        n_judged, before = sum(c[0] == "judge_records" for c in calls), n_judged
        assert n_judged - before == judged
        assert json.loads((tmp_path / "sft" / "eval_marginal" / "calibration.json").read_text())["method"] == method


def test_teacher_rows_read_rl_teacher_or_the_comparisons_own_cross_encoder(tmp_path, monkeypatch):
    """srpo_exact_teacher's teacher: ``rl.teacher`` when set; else the cross_encoder row's job, trained on demand
    (once: the job skips a finished folder) and its final folder passed on; other rows get none."""
    trained = []

    def fake_train_row(self, row, needs):
        trained.append(row)
        return tmp_path / row / "final"

    monkeypatch.setattr(compare.CompareRun, "train_row", fake_train_row)

    def run_of(rl):
        cfg = CompareConfig(model="BASE", rl=rl, seed=0)
        return compare.CompareRun(cfg=cfg, out=tmp_path, rows=[], train=[], evals=[], labels=[], state={},
                                  command="", same_as={})

    own = run_of({})
    job = own.rl_config("srpo_exact_teacher_seed1", model="SFT", judge=None)
    assert job.teacher == str(tmp_path / "cross_encoder" / "final") and trained == ["cross_encoder"]
    assert own.rl_config("srpo_exact", model="SFT", judge=None).teacher is None and trained == ["cross_encoder"]
    given = run_of({"teacher": "runs/ce/final"})
    assert given.rl_config("srpo_exact_teacher", model="SFT", judge=None).teacher == "runs/ce/final"
    assert trained == ["cross_encoder"]  # a given teacher trains nothing
    assert own.rl_config("srpo_exact_kl", model="SFT", judge=None).teacher == "uniform"
    assert trained == ["cross_encoder"]  # the uniform control trains nothing either
