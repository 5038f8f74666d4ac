"""SRPOTrainer: hybrid examiner rules (pure), advantages of the TRL hook checked against an independent
computation and against hand-computed numbers, vanilla GRPO == TRL's own advantage, and a 2-step run.

The tiny random model cannot write a reasoning trace, so most trainer tests feed *scripted* completions
through TRL's ``rollout_func`` (the completions are real token ids of the policy's tokenizer; everything
after generation -- rewards, log-probs, loss -- is TRL's normal path). One test uses real sampling to
show that unparsable completions degrade to the outcome advantage.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from she.algorithms.advantages import AdvantageOptions, pad_step_rewards, srpo_advantages  # noqa: E402
from she.data.schema import Record  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.data.synthetic import generate  # noqa: E402
from she.reasoning.parse import parse_trace  # noqa: E402
from she.reasoning.prompts import user_message  # noqa: E402
from she.reasoning.rationale import write_rationale  # noqa: E402
from she.reasoning.schema import default_schema  # noqa: E402
from she.reasoning.segmentation import token_steps_for_completion  # noqa: E402
from she.rewards.hybrid import (  # noqa: E402
    HybridExaminer,
    StepScores,
    VerifierExaminer,
    check_scores,
    combine_step_scores,
    examine_batch,
    format_reward,
    outcome_reward,
)
from she.rewards.verifier import verify_steps  # noqa: E402
from she.training.srpo import (  # noqa: E402
    SRPOTrainer,
    apply_trace_rules,
    build_grpo_config,
    completion_lengths,
    credit_span,
    local_srpo_advantages,
    make_prompt_dataset,
    process_slice,
)

G = 4
SCHEMA = default_schema("hd3")


# ------------------------------------------------------------------------------------- pure rules


def test_outcome_reward_exact_and_partial_credit():
    assert outcome_reward("Exact", "Exact", "hd3") == 1.0
    assert outcome_reward("Partial", "Exact", "hd3") == 0.0
    assert outcome_reward(None, "Exact", "hd3") == 0.0
    assert outcome_reward("Complement", "Exact", "hd3") == 0.0  # not an hd3 label: wrong, not a crash
    # hd3: K = 3 -> one grade off = 1 - 1/2
    assert outcome_reward("Partial", "Exact", "hd3", ordinal_partial_credit=True) == 0.5
    assert outcome_reward("Irrelevant", "Exact", "hd3", ordinal_partial_credit=True) == 0.0
    # esci4: K = 4 -> Substitute (2) vs Exact (3): 1 - 1/3; Complement (1) vs Exact: 1 - 2/3
    assert outcome_reward("Substitute", "Exact", "esci4", True) == pytest.approx(2 / 3)
    assert outcome_reward("Complement", "Exact", "esci4", True) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="gold"):
        outcome_reward("Exact", None, "hd3")
    with pytest.raises(ValueError, match="unknown label"):
        outcome_reward("Exact", "Great", "hd3")


def test_format_reward():
    good = parse_trace("Query: drill\nProduct: drill\nType: same\nAttributes: none\nVerdict: Exact", SCHEMA)
    bad = parse_trace("Type: same\nVerdict: Exact", SCHEMA)
    assert (format_reward(good), format_reward(bad)) == (1.0, 0.0)


def test_combine_verifier_first_and_blend():
    v = [1.0, None, 0.0, None]
    j = [0.2, 0.9, None, None]
    s = combine_step_scores(v, j, mode="verifier_first", neutral=0.5)
    assert s.scores == [1.0, 0.9, 0.0, 0.5]
    assert s.sources == ["verifier", "judge", "verifier", "neutral"]
    s = combine_step_scores(v, j, mode="blend", weight=0.25, neutral=None)
    assert s.scores == [pytest.approx(0.25 * 0.2 + 0.75 * 1.0), 0.9, 0.0, None]
    assert s.sources == ["blend", "judge", "verifier", "none"]
    s = combine_step_scores(v, None, neutral=0.5)  # no judge consulted
    assert s.scores == [1.0, 0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="mode"):
        combine_step_scores(v, j, mode="average")
    with pytest.raises(ValueError, match="judge has 1"):
        combine_step_scores(v, [0.5])


def test_check_scores_rejects_bad_examiner_output():
    assert check_scores([0, 1, None, 0.5], 4, "x") == [0.0, 1.0, None, 0.5]
    with pytest.raises(ValueError, match="2 score"):
        check_scores([0.1, 0.2], 3, "judge")
    with pytest.raises(ValueError, match="outside"):
        check_scores([1.5], 1, "judge")
    with pytest.raises(ValueError, match="outside"):
        check_scores([float("nan")], 1, "judge")
    with pytest.raises(ValueError, match="expected a number"):
        check_scores(["yes"], 1, "judge")


def _record(label="Exact", **facts) -> Record:
    return Record.from_dict({"id": "r1", "query": "dewalt drill", "product": {"title": "DeWalt 20V drill"},
                             "label": label, "facts": facts})


TRACE = "Query: drill; brand=dewalt\nProduct: drill; brand=DeWalt\nType: same\nAttributes: brand=match\nVerdict: Exact"


def test_verifier_examiner_maps_verdicts():
    parsed = parse_trace(TRACE, SCHEMA)
    rec = _record(type_relation="same", brand="match")
    # Query: no negation fact -> unknown; Product: no rule; Type/Attributes/Verdict: checked against facts
    assert VerifierExaminer().score_steps(parsed, rec) == [None, None, 1.0, 1.0, 1.0]
    wrong = parse_trace(TRACE.replace("Type: same", "Type: related"), SCHEMA)
    assert VerifierExaminer().score_steps(wrong, rec) == [None, None, 0.0, 1.0, 1.0]


@dataclass
class FakeJudge:
    """Scores every step 0.7; records which traces it was asked about."""

    calls: list = field(default_factory=list)

    def score_steps_batch(self, items):
        self.calls.append(len(items))
        return [[0.7] * len(p.steps) for p, _ in items]

    def score_steps(self, parsed, record):  # pragma: no cover - the batch method is preferred
        raise AssertionError("score_steps_batch should have been used")


def test_hybrid_examiner_consults_the_judge_only_when_needed():
    rec_full = _record(type_relation="same", brand="match")
    parsed = parse_trace(TRACE, SCHEMA)
    judge = FakeJudge()
    hyb = HybridExaminer(judge=judge, mode="verifier_first")
    out = hyb.examine_batch([(parsed, rec_full)])
    assert out[0].scores == [0.7, 0.7, 1.0, 1.0, 1.0]
    assert out[0].sources == ["judge", "judge", "verifier", "verifier", "verifier"]
    assert judge.calls == [1]
    # a trace the verifier scores completely never reaches the judge; an empty trace neither
    only_checked = parse_trace("Type: same\nVerdict: Exact", SCHEMA)
    empty = parse_trace("hello", SCHEMA)
    judge.calls.clear()
    out = hyb.examine_batch([(only_checked, rec_full), (empty, rec_full)])
    assert judge.calls == [] and out[0].sources == ["verifier", "verifier"] and out[1] == StepScores([], [])
    # without a judge the neutral score fills the gaps
    assert HybridExaminer(neutral=0.5).score_steps(parsed, rec_full) == [0.5, 0.5, 1.0, 1.0, 1.0]


def test_examine_batch_labels_sources_for_plain_examiners():
    parsed = parse_trace(TRACE, SCHEMA)
    rec = _record(type_relation="same", brand="match")
    out = examine_batch(VerifierExaminer(), [(parsed, rec)])[0]
    assert out.sources == ["none", "none", "verifier", "verifier", "verifier"]

    class Constant:
        def score_steps(self, parsed, record):
            return [0.25] * len(parsed.steps)

    assert examine_batch(Constant(), [(parsed, rec)])[0].sources == ["examiner"] * 5


# --------------------------------------------------------------------------- gathering / slicing


def test_completion_lengths_uses_the_mask_and_falls_back_for_masked_rows():
    ids = torch.tensor([[5, 6, 9, 0, 0], [5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # row 2: truncated and masked
    assert completion_lengths(ids, mask, pad_token_id=0) == [3, 5, 3]


def test_local_advantages_of_a_group_split_over_two_processes():
    """Simulate 2 processes holding 2 rows each of ONE group of 4 (TRL's sampler allows that).

    Process 0 got the two right answers, process 1 the two wrong ones. Computed per process, every
    advantage would be 0; over the gathered group they are +-0.5 / (std + 1e-4) with std = sqrt(1/3).
    Process 1's rows have T=3, process 0's T=5: the gathered maps are padded to 5 with -1 / 0.
    """
    outcome_all = torch.tensor([1.0, 1.0, 0.0, 0.0])
    steps_all = [[1.0], [1.0], [0.0], []]  # the last rollout has no rewarded step
    token_step_all = torch.tensor([[0, 0, -1, -1, -1], [0, -1, -1, -1, -1], [0, 0, 0, -1, -1], [-1, -1, -1, -1, -1]])
    mask_all = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    correct = outcome_all > 0.5
    a_out = 0.5 / ((1 / 3) ** 0.5 + 1e-4)
    # pooled steps {1, 1, 0}: mean 2/3, unbiased std sqrt(1/3)
    q_hi = (1 / 3) / ((1 / 3) ** 0.5 + 1e-4)
    q_lo = (-2 / 3) / ((1 / 3) ** 0.5 + 1e-4)
    pooled = {"estimator": "srpo_centered_pooled", "options": AdvantageOptions(alpha=1.0)}
    adv1, _ = local_srpo_advantages(outcome_all, steps_all, token_step_all, mask_all, correct, 4,
                                    process_index=1, local_shape=(2, 3), **pooled)
    expected1 = torch.tensor([[-a_out + q_lo, -a_out + q_lo, -a_out + q_lo], [-a_out, -a_out, 0.0]])
    assert torch.allclose(adv1, expected1, atol=1e-5)
    adv0, stats = local_srpo_advantages(outcome_all, steps_all, token_step_all, mask_all, correct, 4,
                                        process_index=0, local_shape=(2, 5), **pooled)
    step_abs = stats["srpo/step_advantage_abs_mean"]
    expected0 = torch.tensor([[a_out + q_hi, a_out + q_hi, a_out, a_out, 0.0], [a_out + q_hi, a_out, 0, 0, 0]])
    assert torch.allclose(adv0, expected0, atol=1e-5)
    # |step part| over the 4+2+3+2 = 11 completion tokens: 3 tokens carry q_hi, 3 carry |q_lo|
    assert step_abs == pytest.approx((3 * q_hi + 3 * abs(q_lo)) / 11, abs=1e-5)
    assert process_slice(1, 2) == slice(2, 4)


# ------------------------------------------------------------------------------ trainer fixtures


def _replace_line(text: str, key: str, value: str) -> str:
    new, n = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
    assert n == 1, (key, text)
    return new


def _flip_first_attribute(text: str) -> str:
    line = re.search(r"(?m)^Attributes: (.*)$", text).group(1)
    attr, val = line.split(";")[0].strip().split("=")
    flipped = {"match": "mismatch", "mismatch": "match", "unspecified": "mismatch"}[val]
    return _replace_line(text, "Attributes", line.replace(f"{attr}={val}", f"{attr}={flipped}", 1))


def scripted_variants(r: Record) -> list[str]:
    """G = 4 completions per record, with known outcome and verifier step scores (Verdict excluded):

    0: the gold rationale                         outcome 1, steps Type=1 Attributes=1
    1: wrong type relation and wrong label        outcome 0, steps Type=0 Attributes=1
    2: one attribute check flipped, right label   outcome 1, steps Type=1 Attributes=0
    3: not a trace                                outcome 0, no steps
    """
    gold = write_rationale(r)
    wrong_type = "same" if r.facts.type_relation != "same" else "different"
    wrong_label = "Exact" if r.label != "Exact" else "Irrelevant"
    v1 = _replace_line(_replace_line(gold, "Type", wrong_type), "Verdict", wrong_label)
    return [gold, v1, _flip_first_attribute(gold), "I am not sure, maybe."]


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Records whose gold trace has attribute checks and no negation (so Query/Product are unscored)."""
    out = []
    for r in generate(n_queries=6, products_per_query=3, seed=1):
        if r.facts.negation != "yes" and "=" in re.search(r"(?m)^Attributes: (.*)$", write_rationale(r)).group(1):
            out.append(r)
    assert len(out) >= 4
    return out[:4]


def rollout_of(texts_by_user_message: dict, eos: bool = True):
    """A TRL ``rollout_func`` that answers each prompt with its scripted texts in turn (G per prompt)."""
    def rollout(prompts, trainer):
        tok = trainer.processing_class
        seen: dict[str, int] = defaultdict(int)
        prompt_ids, completion_ids = [], []
        for p in prompts:
            key = p[-1]["content"]
            text = texts_by_user_message[key][seen[key] % G]
            seen[key] += 1
            ptext = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            prompt_ids.append(tok(ptext, add_special_tokens=False)["input_ids"])
            completion_ids.append(tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def make_rollout_func(records: list[Record]):
    return rollout_of({user_message(r): scripted_variants(r) for r in records})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from she.models.registry import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir)


def make_trainer(tiny, records, tmp_path, *, scripted=True, max_steps=1, **kwargs) -> SRPOTrainer:
    model, tok = tiny
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=48,
                             max_steps=max_steps, learning_rate=1e-3, seed=0)
    return SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                       processing_class=tok, rollout_func=make_rollout_func(records) if scripted else None, **kwargs)


def batch_rows(trainer: SRPOTrainer, ids: list[int]) -> list[dict]:
    """What TRL's RepeatSampler feeds the hook: G consecutive copies of each prompt row."""
    return [dict(trainer.train_dataset[i]) for i in ids for _ in range(G)]


def independent_advantages(tok, records_by_id, rows, out, alpha=1.0) -> tuple[torch.Tensor, list[float], list[list[float]]]:
    """SRPO advantages recomputed from the hook's output without the trainer's code: decode, parse, verify."""
    score = {"correct": 1.0, "incorrect": 0.0}
    outcomes, steps, token_steps = [], [], []
    ids_t, mask = out["completion_ids"], out["completion_mask"]
    for row, ids, m in zip(rows, ids_t.tolist(), mask.tolist()):
        ids = ids[: sum(m)]
        text = tok.decode(ids, skip_special_tokens=True)
        rec = records_by_id[row["record_id"]]
        parsed = parse_trace(text, SCHEMA)
        outcomes.append(1.0 if parsed.label == rec.label else 0.0)
        kept = [(s, score[v.verdict]) for s, v in zip(parsed.steps, verify_steps(parsed, rec))
                if s.kind != "label" and v.verdict in score]
        steps.append([q for _, q in kept])
        spans = [credit_span(text, s.span) for s, _ in kept]  # a step's credit covers its line break
        ts = token_steps_for_completion(tok, ids, spans, text=text, skip_special_tokens=True)
        token_steps.append(ts + [-1] * (ids_t.shape[1] - len(ts)))
    values, smask = pad_step_rewards(steps)
    adv = srpo_advantages(torch.tensor(outcomes), values, smask, torch.tensor(token_steps), mask, G, alpha=alpha)
    return adv, outcomes, steps


# ---------------------------------------------------------------------------------- trainer tests


def test_make_prompt_dataset_and_config(records, tmp_path):
    ds = make_prompt_dataset(records, include_record_json=True)
    assert ds.column_names == ["prompt", "record_id", "record"]
    assert ds[0]["prompt"][0]["role"] == "system" and ds[0]["record_id"] == records[0].id
    assert Record.from_dict(json.loads(ds[0]["record"])).label == records[0].label
    with pytest.raises(ValueError, match="twice"):
        make_prompt_dataset([records[0], records[0]])
    cfg = build_grpo_config(tmp_path, num_generations=4)
    assert cfg.use_cpu == (not torch.cuda.is_available()) and cfg.per_device_train_batch_size == 4
    assert cfg.report_to == [] and cfg.bf16 is False


def test_srpo_hook_matches_independent_computation_and_hand_values(tiny, records, tmp_path):
    t = make_trainer(tiny, records, tmp_path, advantage="srpo_centered_pooled")
    rows = batch_rows(t, [0, 1])
    t.model.train()
    out = t._generate_and_score_completions(rows)
    adv, mask = out["advantages"], out["completion_mask"]
    assert adv.shape == mask.shape == out["completion_ids"].shape

    ref, outcomes, steps = independent_advantages(t.processing_class, t.records_by_id, rows, out)
    assert outcomes == [1.0, 0.0, 1.0, 0.0] * 2
    assert steps == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], []] * 2
    assert torch.allclose(adv, ref, atol=1e-6)

    # hand values (module docstring of she.algorithms.advantages): outcome rewards [1, 0, 1, 0] ->
    # +-0.5 / (sqrt(1/3) + 1e-4); pooled step rewards {1,1,0,1,1,0}: mean 2/3, unbiased std sqrt(4/15)
    a_out = 0.5 / ((1 / 3) ** 0.5 + 1e-4)
    std_q = (4 / 15) ** 0.5 + 1e-4
    q_hi, q_lo = (1 / 3) / std_q, (-2 / 3) / std_q
    ts = t.last_batch.token_step
    for row, (a, q_type) in {0: (a_out, q_hi), 1: (-a_out, q_lo), 2: (a_out, q_hi)}.items():
        type_tokens = ts[row] == 0  # rewarded step 0 = Type (Query/Product are unscored)
        assert type_tokens.any()
        assert torch.allclose(adv[row][type_tokens], torch.full((int(type_tokens.sum()),), a + q_type), atol=1e-5)
        outside = (ts[row] == -1) & mask[row].bool()  # Query/Product/Verdict lines, newlines, EOS
        assert torch.allclose(adv[row][outside], torch.full((int(outside.sum()),), a), atol=1e-5)
    assert torch.all(adv[mask == 0] == 0)
    # the step signal really changed the advantage relative to TRL's outcome-only one
    assert not torch.allclose(adv, t.last_batch.trl_advantages[:, None] * mask)
    # TRL's own reward function saw the same outcome rewards
    assert list(t._logs["rewards"]["outcome"])[-8:] == outcomes

    m = {k: v[-1] for k, v in t._metrics["train"].items() if k.startswith("srpo/")}
    assert m["srpo/step_reward/Type"] == pytest.approx(4 / 6)  # rows 0, 2 right; row 1 wrong (x2 groups)
    assert m["srpo/step_reward/Attributes"] == pytest.approx(4 / 6)
    assert m["srpo/label_accuracy"] == 0.5 and m["srpo/format_ok"] == 0.75
    # examined steps per group: 4 + 4 + 4 + 0 = 12; Query and Product (6 of 12) have no verifier rule
    assert m["srpo/step_source/verifier"] == 0.5 and m["srpo/step_source/none"] == 0.5


def test_vanilla_mode_is_trls_own_advantage(tiny, records, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    captured = {}
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        captured["adv"] = out["advantages"].clone()
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", spy)
    t = make_trainer(tiny, records, tmp_path, step_rewards=False)
    rows = batch_rows(t, [2, 3])
    t.model.train()
    out = t._generate_and_score_completions(rows)
    mask = out["completion_mask"]
    assert torch.equal(out["advantages"], captured["adv"][:, None] * mask.float())
    a_out = 0.5 / ((1 / 3) ** 0.5 + 1e-4)  # TRL's own numbers for rewards [1, 0, 1, 0]
    assert torch.allclose(captured["adv"], torch.tensor([a_out, -a_out, a_out, -a_out] * 2), atol=1e-5)
    # step metrics are still logged in vanilla mode (same examiner), the advantage ignores them
    assert "srpo/step_reward/Type" in t._metrics["train"]

    # SRPO with alpha = 0 gives the same advantage up to float rounding (its own group normalisation)
    t0 = make_trainer(tiny, records, tmp_path / "a0", alpha=0.0)
    out0 = t0._generate_and_score_completions(rows)
    assert torch.equal(out0["completion_ids"], out["completion_ids"])
    assert torch.allclose(out0["advantages"], out["advantages"], atol=1e-6)


def test_record_json_column_needs_no_records_by_id(tiny, records, tmp_path):
    model, tok = tiny
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=G, max_completion_length=48)
    t = SRPOTrainer(model, args, make_prompt_dataset(records, include_record_json=True), processing_class=tok,
                    rollout_func=make_rollout_func(records))
    t.model.train()
    t._generate_and_score_completions(batch_rows(t, [1]))
    assert [r.outcome for r in t.last_batch.rollouts] == [1.0, 0.0, 1.0, 0.0]
    assert {r.gold for r in t.last_batch.rollouts} == {records[1].label}


def test_unparsable_real_samples_fall_back_to_the_outcome_advantage(tiny, records, tmp_path):
    torch.manual_seed(0)
    t = make_trainer(tiny, records, tmp_path, scripted=False)
    rows = batch_rows(t, [0, 1])
    t.model.train()
    out = t._generate_and_score_completions(rows)
    assert out["advantages"].shape == out["completion_ids"].shape and out["completion_ids"].shape[1] <= 48
    assert t.last_batch.step_rewards == [[]] * 8  # a random model writes no step lines
    trl_adv = t.last_batch.trl_advantages
    assert torch.allclose(out["advantages"], trl_adv[:, None] * out["completion_mask"], atol=1e-6)


def test_two_training_steps_use_token_level_advantages(tiny, records, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    seen = []
    original = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append(tuple(inputs["advantages"].shape) + tuple(inputs["completion_mask"].shape))
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    t = make_trainer(tiny, records, tmp_path, max_steps=2, critical={"first_error_weight": 2.0})
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    assert len(seen) == 2 and all(len(s) == 4 and s[:2] == s[2:] for s in seen)  # (B, T) == mask shape
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("srpo/step_reward/Type" in h and "rewards/outcome/mean" in h for h in logs)
    # what shows entropy collapse and off-policy drift: TRL's own metrics, relied on by docs/srpo.md
    assert all("entropy" in h and "clip_ratio/region_mean" in h for h in logs)
    assert all(1 / G - 1e-9 <= h["srpo/path_diversity"] <= 1.0 for h in logs)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, t.model.parameters()))
    from she.evaluation.report import rl_curves

    written = rl_curves(t.state.log_history, tmp_path)
    assert set(written) == {"reward", "step_reward", "policy", "collapse", "shares", "advantage"}
    assert all(p.stat().st_size > 0 for p in written.values())


def test_setup_errors(tiny, records, tmp_path):
    model, tok = tiny
    args = build_grpo_config(tmp_path, num_generations=G)
    ds = make_prompt_dataset(records)
    with pytest.raises(ValueError, match="records_by_id"):
        SRPOTrainer(model, args, ds, processing_class=tok)
    with pytest.raises(ValueError, match="not in records_by_id"):
        SRPOTrainer(model, args, ds, records_by_id={records[0].id: records[0]}, processing_class=tok)
    with pytest.raises(ValueError, match="reward_funcs"):
        SRPOTrainer(model, args, ds, records_by_id={r.id: r for r in records}, reward_funcs=[len])
    with pytest.raises(ValueError, match="credit_mode"):
        SRPOTrainer(model, args, ds, records_by_id={r.id: r for r in records}, credit_mode="sum")
    batch_args = build_grpo_config(tmp_path, num_generations=G, scale_rewards="batch")
    with pytest.raises(ValueError, match="scale_rewards"):
        SRPOTrainer(model, batch_args, ds, records_by_id={r.id: r for r in records}, processing_class=tok,
                    advantage="srpo_centered_pooled")


# ------------------------------------------------------------------ issue 10: trace rules C, D and collapse logs


def test_credit_span_and_trace_rules_by_hand():
    text = "Type: same\nAttributes: none\r\nVerdict: Exact"
    assert credit_span(text, (0, 10)) == (0, 11)  # the newline belongs to the step
    assert credit_span(text, (11, 27)) == (11, 29)  # \r\n too
    assert credit_span(text, (29, 43)) == (29, 43)  # end of text: nothing to add
    keys, scores, srcs = ["Type", "Attributes", "Type"], [1.0, None, 1.0], ["verifier", "none", "verifier"]
    assert apply_trace_rules(keys, scores, srcs, truncated=False) == ([1.0, None, 0.0], ["verifier", "none", "duplicate"])
    assert apply_trace_rules(keys, scores, srcs, truncated=True) == ([0.0] * 3, ["cut"] * 3)


def _trainer_with(tiny, records, tmp_path, texts, eos=True, **kwargs):
    model, tok = tiny
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=G, max_completion_length=200,
                             max_steps=1, learning_rate=1e-3, seed=0)
    return SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                       processing_class=tok, rollout_func=rollout_of(texts, eos), **kwargs)


def _duplicated(gold: str) -> str:
    lines = gold.split("\n")
    k = next(i for i, x in enumerate(lines) if x.startswith("Verdict:"))
    return "\n".join(lines[:k] + [x for x in lines if x.startswith(("Type:", "Attributes:"))] + lines[k:])


@pytest.mark.parametrize("advantage", ["srpo_centered", "srpo_centered_pooled", "srpo_gated"])
def test_repeated_steps_earn_no_more_than_the_verdict(tiny, records, tmp_path, advantage):
    """Issue 10 C: a rollout writing Type and Attributes twice must not earn more on the repeats than on its
    verdict (before the fix: +1.18 on every duplicated token against +0.87 on the Verdict)."""
    r = records[0]
    gold = write_rationale(r)
    texts = {user_message(r): [_duplicated(gold), gold, _replace_line(gold, "Verdict", "Exact" if r.label != "Exact"
                                                                      else "Irrelevant"), gold]}
    t = _trainer_with(tiny, [r], tmp_path, texts, advantage=advantage)
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0]))
    row = t.last_batch.rollouts[0]
    assert row.step_sources[-2:] == ["duplicate", "duplicate"] and row.step_scores[-2:] == [0.0, 0.0]
    ts, adv = t.last_batch.token_step[0], out["advantages"][0]
    n_rewarded = len(row.rewards)
    dup = (ts == n_rewarded - 1) | (ts == n_rewarded - 2)
    verdict = (ts == -1) & out["completion_mask"][0].bool()
    assert dup.any() and verdict.any()
    assert adv[dup].max() < adv[verdict].min()


def test_cut_trace_earns_no_step_credit(tiny, records, tmp_path):
    """Issue 10 D: a completion cut by the length limit (no EOS) -- its steps all score 0 (source ``cut``)."""
    r = records[0]
    gold = write_rationale(r)
    cut = gold[: gold.index("Attributes:") + len("Attributes: ") + 3]  # "Attributes: bra" -- cut mid-line
    texts = {user_message(r): [cut, cut, cut, cut]}
    t = _trainer_with(tiny, [r], tmp_path, texts, eos=False, advantage="srpo_gated")
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0]))
    for row in t.last_batch.rollouts:
        assert row.truncated and set(row.step_sources) == {"cut"} and set(row.step_scores) == {0.0}
    # every verdict wrong (none written): outcome advantage 0, step penalties only -> nothing positive
    assert (out["advantages"] <= 0).all() and (out["advantages"] < 0).any()
    assert t._metrics["train"]["srpo/truncated"][-1] == 1.0


def test_collapse_metrics_logged_and_computed_right(tiny, records, tmp_path):
    t = make_trainer(tiny, records, tmp_path)  # default estimator: srpo_gated
    assert t.advantage == "srpo_gated"
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0, 1]))
    rows = t.last_batch.rollouts
    m = {k: v[-1] for k, v in t._metrics["train"].items()}
    labels = [r.label for r in rows]
    for lab in ("Exact", "Partial", "Irrelevant"):
        assert m[f"srpo/pred_share/{lab}"] == pytest.approx(labels.count(lab) / 8)
    assert m["srpo/pred_share/none"] == pytest.approx(sum(x is None for x in labels) / 8)
    for gold in {r.gold for r in rows}:
        of = [r for r in rows if r.gold == gold]
        assert m[f"srpo/recall/{gold}"] == pytest.approx(sum(r.label == gold for r in of) / len(of))
    assert m["srpo/zero_var_groups"] == 0.0  # scripted groups mix right and wrong answers
    assert m["srpo/pos_adv_mass_wrong"] == 0.0  # gated: nothing positive in wrong-verdict rollouts
    wrong = torch.tensor([not r.correct for r in rows])
    assert (out["advantages"][wrong] <= 0).all()
    assert 0.0 < m["srpo/step_share"] < 1.0


def test_collapse_metrics_by_hand():
    from she.training.srpo import RolloutScore, collapse_metrics

    def row(label, gold):
        return RolloutScore("", label, gold, float(label == gold), label == gold, True, [], [], [])

    rows = [row("Exact", "Exact"), row("Exact", "Exact"), row("Exact", "Partial"), row("Partial", "Partial")]
    m = collapse_metrics(rows, ("Irrelevant", "Partial", "Exact"), 2)
    assert m["srpo/pred_share/Exact"] == 0.75 and m["srpo/pred_share/Partial"] == 0.25
    assert m["srpo/recall/Exact"] == 1.0 and m["srpo/recall/Partial"] == 0.5 and "srpo/recall/Irrelevant" not in m
    # F1 Exact = 2*2/(2+3) = 0.8, F1 Partial = 2*1/(2+1) = 2/3; Irrelevant absent from gold and predictions
    assert m["srpo/train_macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # group 0 all Exact (entropy 0, outcomes equal); group 1 Exact/Partial (entropy ln 2, outcomes 0/1)
    assert m["srpo/verdict_entropy"] == pytest.approx(0.5 * math.log(2))
    assert m["srpo/zero_var_groups"] == 0.5


def test_class_weights_scale_grpo(tiny, records, tmp_path):
    w = {"Exact": 2.0, "Partial": 0.5, "Irrelevant": 1.0}
    t = make_trainer(tiny, records, tmp_path, step_rewards=False, class_weights=w)
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0, 1]))
    weights = torch.tensor([w[r.gold] for r in t.last_batch.rollouts])
    want = t.last_batch.trl_advantages[:, None] * weights[:, None] * out["completion_mask"]
    assert torch.allclose(out["advantages"], want, atol=1e-5)


def test_batch_scaled_outcome_matches_trls_formula(tiny, records, tmp_path):
    """scale_rewards="batch": (r - group mean) / (std of the whole batch + 1e-4), as TRL computes it; the gated
    estimator uses it as its outcome term."""
    from she.algorithms.advantages import outcome_advantage

    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    want = (r - r.view(-1, 4).mean(1).repeat_interleave(4)) / (r.std() + 1e-4)
    assert torch.allclose(outcome_advantage(r, 4, batch_scale=True), want)
    model, tok = tiny
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=48,
                             max_steps=1, scale_rewards="batch")
    t = SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                    processing_class=tok, rollout_func=make_rollout_func(records), alpha=0.0)
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0, 1]))  # alpha 0: the outcome term alone
    trl = t.last_batch.trl_advantages  # TRL's own batch-scaled advantage
    assert torch.allclose(out["advantages"], trl[:, None] * out["completion_mask"], atol=1e-5)


def test_reward_steps_limits_which_steps_earn_a_step_reward(tiny, records, tmp_path):
    t = make_trainer(tiny, records, tmp_path, reward_steps=["Attributes"])
    t.model.train()
    t._generate_and_score_completions(batch_rows(t, [0, 1]))
    for r in t.last_batch.rollouts:
        assert all(s is None for k, s in zip(r.step_keys, r.step_scores) if k != "Attributes")
        assert r.reward_keys in ([], ["Attributes"])
    assert any(r.reward_keys == ["Attributes"] for r in t.last_batch.rollouts)


def test_moving_average_by_hand():
    from she.evaluation.report import moving_average

    pts = [(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)]
    assert moving_average(pts, 2) == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]
    assert moving_average(pts, 1) == pts


def test_share_pin_shifts_grpo_by_the_batch_share_gap(tiny, records, tmp_path):
    """GRPO with the share pin: TRL's advantage plus the pin's term, computed from the batch's own verdicts and
    gold labels (the pure function's hand-computed tests are in test_advantages.py); the gap is logged."""
    from she.algorithms.advantages import share_pin_shift
    from she.training.srpo import class_ids

    t = make_trainer(tiny, records, tmp_path, step_rewards=False, share_pin=3.0)
    t.model.train()
    out = t._generate_and_score_completions(batch_rows(t, [0, 1]))
    b = t.last_batch
    labels = t.schema.labels
    shift = share_pin_shift(class_ids(b.preds, labels, what="pred"), class_ids(b.golds, labels, what="gold"),
                            len(labels), G, 3.0)
    assert shift.abs().sum() > 0  # the scripted rollouts disagree on verdicts: the pin has something to move
    want = (b.trl_advantages + shift)[:, None] * out["completion_mask"]
    assert torch.allclose(out["advantages"], want, atol=1e-5)
    assert b.preds == [r.label for r in b.rollouts]
    gaps = [t._metrics["train"][f"srpo/share_gap/{lab}"][-1] for lab in labels]
    assert sum(gaps) == pytest.approx(-t._metrics["train"]["srpo/pred_share/none"][-1])
    with pytest.raises(UserError, match="share_pin"):
        make_trainer(tiny, records, tmp_path, step_rewards=False, share_pin=-1.0)


def test_class_ids():
    from she.training.srpo import class_ids

    assert class_ids(["b", None, "a", "zz"], ["a", "b"], what="pred").tolist() == [1, -1, 0, -1]
    with pytest.raises(UserError, match="gold label"):
        class_ids(["a", "zz"], ["a", "b"], what="gold")
