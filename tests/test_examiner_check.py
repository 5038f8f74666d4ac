"""Check the examiner before paying it (issue 10, part 3): gold traces vs constant traces, per gold class."""

import pytest

from she.data.synthetic import generate
from she.reasoning.parse import parse_trace
from she.reasoning.schema import builtin_schema, coverage_schema
from she.rewards.check import check_examiner, choice_hedges, constant_trace, format_check, trace_totals, with_step
from she.rewards.hybrid import VerifierExaminer

SCHEMA = builtin_schema("hd3")


@pytest.fixture(scope="module")
def records():
    recs = generate(n_queries=30, products_per_query=3, seed=3)
    assert {r.label for r in recs} == {"Exact", "Partial", "Irrelevant"}
    return recs


def test_trace_totals_by_hand():
    # steps: free (None -> neutral 0.5 in reward, no flaw), 1.0, 0.25 (flaw 0.5), 0.0 (flaw 1), label (left out)
    t = trace_totals([None, 1.0, 0.25, 0.0, 1.0], ["free", "choice", "attributes", "free", "label"])
    assert t == {"reward": 0.5 + 1.0 + 0.25 + 0.0, "flaw": 0.5 + 1.0}
    t = trace_totals([None, 1.0, 0.25, 0.0, 0.25], ["free", "choice", "attributes", "free", "label"],
                     include_label_step=True)
    assert t == {"reward": 0.5 + 1.0 + 0.25 + 0.0 + 0.25, "flaw": 0.5 + 1.0 + 0.5}
    t = trace_totals([None, 1.0, 0.25, 0.0, 0.25], ["free", "choice", "attributes", "free", "label"],
                     include_label_step=True, paid=[False, True, False, False, True])  # reward_steps: two of them
    assert t == {"reward": 1.0 + 0.25, "flaw": 0.5}


def test_the_check_pays_rated_verdicts_as_the_trainer_does(records):
    """Under rl.rated_verdict the verdict step is paid, so the check counts it: on Irrelevant pairs rated 1.67 (just
    under the 1.75 cut) a constant Partial verdict agrees more with the raters (1 - 1/3 / 2) than the gold Irrelevant
    (1 - 2/3 / 2); the steps before it still keep the gold trace ahead (the check passes)."""
    import dataclasses

    recs = [dataclasses.replace(r, score={"Exact": 3.0, "Partial": 2.0, "Irrelevant": 5 / 3}[r.label]) for r in records]
    examiner = VerifierExaminer(rated=True)
    paid = check_examiner(examiner, recs, SCHEMA, criterion="reward", include_label_step=True)
    before = check_examiner(examiner, recs, SCHEMA, criterion="reward")
    irr, irr0 = paid["classes"]["Irrelevant"], before["classes"]["Irrelevant"]
    assert irr["gold"]["reward"] - irr0["gold"]["reward"] == pytest.approx(1 - (2 / 3) / 2, abs=1e-5)
    assert irr["constant"]["Partial"]["reward"] - irr0["constant"]["Partial"]["reward"] == pytest.approx(
        1 - (1 / 3) / 2, abs=1e-5)
    exact, exact0 = paid["classes"]["Exact"], before["classes"]["Exact"]  # rated 3.0: Irrelevant agrees 0
    assert exact["constant"]["Irrelevant"]["reward"] == pytest.approx(exact0["constant"]["Irrelevant"]["reward"])
    assert paid["ok"], format_check(paid)


def test_constant_trace_follows_the_constant_label(records):
    r = next(x for x in records if x.label == "Partial")
    parsed = parse_trace(constant_trace(r, "Exact", SCHEMA), SCHEMA)
    assert parsed.label == "Exact" and parsed.step("type").conclusion == "same"


@pytest.mark.parametrize("schema", [builtin_schema("hd3"), coverage_schema("hd3")])
def test_the_fixed_verifier_never_pays_a_constant_trace(records, schema):
    for criterion in ("flaw", "reward"):
        rep = check_examiner(VerifierExaminer(), records, schema, criterion=criterion)
        assert rep["ok"], format_check(rep)
        assert set(rep["classes"]) == {"Exact", "Partial", "Irrelevant"}


class MajorityLovingJudge:
    """A judge that likes every `Type: same` / `Attributes: none` line and doubts everything else."""

    def score_steps(self, parsed, record):
        out = []
        for s in parsed.steps:
            if s.key == "Type":
                out.append(1.0 if s.conclusion == "same" else 0.2)
            elif s.key == "Attributes":
                out.append(1.0 if s.conclusion == {} else 0.2)
            else:
                out.append(None)
        return out


def test_a_judge_that_pays_the_majority_path_fails_the_check(records):
    rep = check_examiner(MajorityLovingJudge(), records, SCHEMA, criterion="flaw")
    assert not rep["ok"]
    failing = {(g, lab) for g, lab, *_ in rep["failures"]}
    assert ("Partial", "Exact") in failing and ("Irrelevant", "Exact") in failing
    text = format_check(rep)
    assert "FAIL: on Partial pairs the constant 'Exact' trace" in text


def test_bad_input(records):
    with pytest.raises(ValueError, match="criterion"):
        check_examiner(VerifierExaminer(), records, SCHEMA, criterion="best")
    unlabelled = [records[0].__class__(id="u", query="q", product=records[0].product)]
    with pytest.raises(ValueError, match="labelled"):
        check_examiner(VerifierExaminer(), unlabelled, SCHEMA)


def test_rl_job_refuses_a_failing_examiner_before_loading_a_model(records, tmp_path, monkeypatch):
    from she.config import RLJobConfig
    from she.training import rl

    monkeypatch.setattr(rl, "build_examiner", lambda cfg: MajorityLovingJudge())
    monkeypatch.setattr("she.models.registry.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("a model was loaded before the examiner check"))
    cfg = RLJobConfig(model="tiny", output_dir=str(tmp_path / "rl"), report_to="none")
    with pytest.raises(ValueError, match="constant 'Exact' trace"):
        rl.run_rl_job(cfg, records)
    assert (tmp_path / "rl" / "examiner_check.json").exists()
    # warn: the same check is logged and written, and training would go on (here: to the model loader)
    cfg.examiner_check = "warn"
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):
        rl.run_rl_job(cfg, records)
    # vanilla GRPO pays no step reward: nothing to check
    assert rl.run_examiner_check(RLJobConfig(step_rewards=False), MajorityLovingJudge(), records) is None


def test_resolve_class_weights(records):
    from she.config import RLJobConfig
    from she.training.rl import resolve_class_weights

    assert resolve_class_weights(RLJobConfig(), records) is None
    w = resolve_class_weights(RLJobConfig(class_weights="balanced"), records)
    n = {lab: sum(r.label == lab for r in records) for lab in w}
    assert sum(w[lab] * n[lab] for lab in w) == pytest.approx(len(records))  # mean weight over rows = 1
    assert resolve_class_weights(RLJobConfig(class_weights={"Exact": 1, "Partial": 2, "Irrelevant": 2}), records) == {
        "Exact": 1.0, "Partial": 2.0, "Irrelevant": 2.0}
    with pytest.raises(ValueError, match="no weight"):
        resolve_class_weights(RLJobConfig(class_weights={"Exact": 1}), records)
    with pytest.raises(ValueError, match="balanced"):
        resolve_class_weights(RLJobConfig(class_weights="inverse"), records)


def test_judge_steps_filter_and_auc_floor(records, tmp_path):
    import json

    from she.rewards.hybrid import HybridExaminer
    from she.training.rl import judge_steps_above_floor

    class Half:
        def score_steps(self, parsed, record):
            return [0.1] * len(parsed.steps)

    r = next(x for x in records if x.label == "Partial")
    parsed = parse_trace(constant_trace(r, "Partial", SCHEMA), SCHEMA)
    all_judged = HybridExaminer(judge=Half()).examine(parsed, r)
    only_type = HybridExaminer(judge=Half(), judge_steps=["Product"]).examine(parsed, r)
    keys = [s.key for s in parsed.steps]
    assert all_judged.sources[keys.index("Query")] == "judge"
    assert only_type.sources[keys.index("Query")] == "neutral" and only_type.scores[keys.index("Query")] == 0.5
    assert only_type.sources[keys.index("Product")] == "judge"
    # the floor reads metrics.json next to the judge folder
    (tmp_path / "judge").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"after": {"by_step": {
        "Type": {"auc": 0.55}, "Attributes": {"auc": 0.71}, "Query": {"auc": None}}}}))
    assert judge_steps_above_floor(str(tmp_path / "judge"), 0.6) == ["Attributes"]
    assert judge_steps_above_floor(str(tmp_path / "judge"), None) is None
    assert judge_steps_above_floor(str(tmp_path / "nowhere" / "judge"), 0.6) is None


def test_resolved_advantage():
    from she.config import RLJobConfig
    from she.training.rl import resolved_advantage

    assert resolved_advantage(RLJobConfig()) == "srpo_gated"
    assert resolved_advantage(RLJobConfig(advantage="srpo_centered")) == "srpo_centered"
    assert resolved_advantage(RLJobConfig(advantage="srpo_centered", step_rewards=False)) == "grpo"


def test_with_step_rewrites_one_line():
    text = "Query: a\nType: same\nVerdict: Exact"
    assert with_step(text, "Type", "related") == "Query: a\nType: related\nVerdict: Exact"
    assert with_step(text, "Similarity", "low") == text  # no such line: unchanged
    assert with_step("Types: x\nType: same", "Type", "accessory") == "Types: x\nType: accessory"


class HedgeFriendlyJudge:
    """Scores ``Type`` 1 where it matches the truthful trace, else 0 -- but 0.5 for ``related`` (a "near miss"
    everywhere, as a distance-graded bucket's middle value is): under the gated flaw threshold 0.5 it is free."""

    def __init__(self, truth):
        self.truth = truth

    def score_steps(self, parsed, record):
        t = self.truth[record.id]
        return [(1.0 if s.conclusion == t else 0.5 if s.conclusion == "related" else 0.0) if s.key == "Type"
                else None for s in parsed.steps]


def test_a_free_hedge_fails_the_check_under_the_gated_criterion_only(records):
    truth = {r.id: parse_trace(constant_trace(r, r.label, SCHEMA), SCHEMA).step("type").conclusion for r in records}
    judge = HedgeFriendlyJudge(truth)
    rows = {h["value"]: h for h in choice_hedges(judge, records, SCHEMA, criterion="flaw")}
    assert rows["related"]["hedge"] and rows["related"]["flaw"] == 0.0 and rows["related"]["reward"] == 0.5
    assert not rows["same"]["hedge"] and rows["same"]["flaw"] == 1.0
    assert rows["related"]["n"] == sum(t != "related" for t in truth.values())
    rep = check_examiner(judge, records, SCHEMA, criterion="flaw")
    assert not rep["ok"] and "'Type: related' where it is wrong" in format_check(rep)
    # a centred (reward) estimator pays it 0.5 against the truth's 1.0: worse, so no hedge there
    assert not any(h["hedge"] for h in choice_hedges(judge, records, SCHEMA, criterion="reward"))
