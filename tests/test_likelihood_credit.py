"""``srpo_likelihood`` (she.algorithms.advantages, section 9; docs/srpo.md "Likelihood credit"): the credit by hand,
its defining property (the sampled token's policy gradient *is* the gradient of log P(gold value)) with autograd,
the token advantages against a loop, the P(gold value) reader against a plain forward pass on the tiny model, and
the trainer's plumbing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from she.algorithms.advantages import (
    AdvantageInputs,
    AdvantageOptions,
    compute_advantages,
    likelihood_advantages,
    likelihood_step_credit,
    outcome_advantage,
)
from she.errors import UserError

NAN = math.nan


def test_credit_by_hand():
    right = torch.tensor([[True, False, False, True, False]])
    p = torch.tensor([[0.25, 0.25, 0.1, NAN, NAN]])
    # logprob: right 1; wrong -(1 - p) / p: 0.75 / 0.25 = 3, 0.9 / 0.1 = 9 capped at 4; NaN (no credit) 0
    assert likelihood_step_credit(right, p)[0].tolist() == pytest.approx([1.0, -3.0, -4.0, 0.0, 0.0])
    assert likelihood_step_credit(right, p, clip=10.0)[0, 2].item() == pytest.approx(-9.0)
    # prob: right p, wrong -(1 - p)
    assert likelihood_step_credit(right, p, "prob")[0].tolist() == pytest.approx([0.25, -0.75, -0.9, 0.0, 0.0])
    with pytest.raises(UserError, match="likelihood_objective"):
        likelihood_step_credit(right, p, "entropy")
    with pytest.raises(UserError, match="likelihood_clip"):
        likelihood_step_credit(right, p, clip=0.0)
    with pytest.raises(ValueError, match="probability"):
        likelihood_step_credit(right, torch.tensor([[1.5, 0.2, 0.2, 0.2, 0.2]]))


@pytest.mark.parametrize("objective", ["logprob", "prob"])
@pytest.mark.parametrize("seed", range(5))
def test_the_sampled_tokens_gradient_is_the_gradient_of_the_gold_objective(objective, seed):
    """For a two-valued step, c(s) * grad log pi(s) == grad log pi(g) (logprob) or grad pi(g) (prob), for *either*
    sampled value s -- exact in every rollout, not only in expectation."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2, generator=g) * 2
    gold = seed % 2
    zg = z0.clone().requires_grad_(True)
    lp = torch.log_softmax(zg, -1)[gold]
    (lp if objective == "logprob" else lp.exp()).backward()
    want = zg.grad.clone()
    p = torch.softmax(z0, -1)[gold].item()
    for sampled in (0, 1):
        c = likelihood_step_credit(torch.tensor([[sampled == gold]]), torch.tensor([[p]]), objective, clip=1e9).item()
        z = z0.clone().requires_grad_(True)
        (c * torch.log_softmax(z, -1)[sampled]).backward()
        assert torch.allclose(z.grad, want, atol=1e-5), (sampled, z.grad, want)


def _loop(outcome, credit, credited, token_step, mask, alpha, decouple):
    b, t = mask.shape
    out = torch.zeros(b, t)
    for i in range(b):
        for j in range(t):
            s = int(token_step[i, j])
            if s >= 0 and bool(credited[i, s]):
                v = alpha * float(credit[i, s]) + (0.0 if decouple else float(outcome[i]))
            else:
                v = float(outcome[i])
            out[i, j] = v * float(mask[i, j])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_token_advantages_equal_the_loop(seed):
    rng = random.Random(seed)
    b, s, t = rng.choice([2, 4, 6]), rng.randint(1, 4), rng.randint(3, 9)
    step_mask = torch.zeros(b, s, dtype=torch.bool)
    token_step = torch.full((b, t), -1)
    for i in range(b):
        n = rng.randint(0, s)
        step_mask[i, :n] = True
        for j in range(t):
            if n and rng.random() < 0.6:
                token_step[i, j] = rng.randrange(n)
    credited = step_mask & (torch.rand(b, s) < 0.5)
    credit = torch.randn(b, s)
    mask = (torch.rand(b, t) < 0.8).float()
    outcome = torch.randn(b)
    for decouple in (True, False):
        got = likelihood_advantages(outcome, credit, credited, step_mask, token_step, mask, alpha=0.7,
                                    decouple=decouple)
        assert torch.allclose(got, _loop(outcome, credit, credited, token_step, mask, 0.7, decouple), atol=1e-6)


def _inputs(p_gold):
    # two prompts x two rollouts; step 0 = an evidence step (no likelihood credit), step 1 = the decision
    # tokens:   0  1  2  3  4   (token 4: the verdict, in no step)
    token_step = torch.tensor([[0, 0, 1, 1, -1]] * 4)
    return AdvantageInputs(
        outcome_rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]),
        step_rewards=torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),  # q of each step
        step_mask=torch.ones(4, 2, dtype=torch.bool), token_step=token_step, completion_mask=torch.ones(4, 5),
        group_size=2, step_gold_prob=p_gold)


def test_estimator_by_hand():
    p = torch.tensor([[NAN, 0.8], [NAN, 0.5], [NAN, 0.2], [NAN, 0.2]])
    x = _inputs(p)
    adv = compute_advantages("srpo_likelihood", x, AdvantageOptions(alpha=1.0, scale=False))
    # outcome, Dr-GRPO (no std): group 1 rewards [1, 0] -> [+0.5, -0.5]; group 2 [0, 0] -> [0, 0] (GRPO: nothing)
    # decision credit: right p .8 -> 1; wrong p .5 -> -1; wrong p .2 -> -4 (capped at 4, (1-.2)/.2 = 4); right -> 1
    want = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.5],
                         [-0.5, -0.5, -1.0, -1.0, -0.5],
                         [0.0, 0.0, -4.0, -4.0, 0.0],
                         [0.0, 0.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(adv, want)
    # the all-wrong-outcome group (rows 2-3) still moves the decision, in both directions
    assert adv[2, 2] < 0 < adv[3, 2]
    summed = compute_advantages("srpo_likelihood", x, AdvantageOptions(alpha=1.0, scale=False,
                                                                       likelihood_decouple=False))
    assert torch.allclose(summed[:, 2:4], want[:, 2:4] + torch.tensor([0.5, -0.5, 0.0, 0.0])[:, None])
    # alpha 0 and not decoupled: GRPO exactly
    grpo = compute_advantages("grpo", x, AdvantageOptions(scale=False))
    zero = compute_advantages("srpo_likelihood", x, AdvantageOptions(alpha=0.0, scale=False,
                                                                      likelihood_decouple=False))
    assert torch.equal(zero, grpo)
    # the outcome term is GRPO's, with the class-aware weight
    w = torch.tensor([2.0, 2.0, 1.0, 1.0])
    xw = AdvantageInputs(**{**x.__dict__, "outcome_weight": w})
    weighted = compute_advantages("srpo_likelihood", xw, AdvantageOptions(alpha=1.0, scale=False))
    assert torch.allclose(weighted[:, 0], outcome_advantage(x.outcome_rewards, 2, w, scale=False))
    # no likelihood step anywhere: the outcome advantage on every token
    none = compute_advantages("srpo_likelihood", _inputs(torch.full((4, 2), NAN)), AdvantageOptions(scale=False))
    assert torch.equal(none, grpo)


def test_class_weights_scale_the_credit_by_hand():
    """``step_gold_weight`` multiplies each credited step's credit (class balance of its gold value); steps without
    credit and every other token are untouched."""
    p = torch.tensor([[NAN, 0.8], [NAN, 0.5], [NAN, 0.2], [NAN, 0.2]])
    x = _inputs(p)
    w = torch.tensor([[9.0, 1.5], [9.0, 0.75], [9.0, 1.5], [9.0, 0.5]])  # column 0 has no credit: its weight unused
    weighted = AdvantageInputs(**{**x.__dict__, "step_gold_weight": w})
    plain = compute_advantages("srpo_likelihood", x, AdvantageOptions(alpha=1.0, scale=False, likelihood_objective="prob"))
    adv = compute_advantages("srpo_likelihood", weighted, AdvantageOptions(alpha=1.0, scale=False,
                                                                           likelihood_objective="prob"))
    # prob credit: right p -> p, wrong -> -(1 - p): [0.8, -0.5, -0.8, 0.2], times [1.5, 0.75, 1.5, 0.5]
    assert adv[:, 2].tolist() == pytest.approx([1.2, -0.375, -1.2, 0.1])
    assert torch.equal(adv[:, [0, 1, 4]], plain[:, [0, 1, 4]])
    with pytest.raises(ValueError, match="step_gold_weight"):
        compute_advantages("srpo_likelihood", AdvantageInputs(**{**x.__dict__, "step_gold_weight": torch.ones(4, 3)}))


def test_the_sign_is_the_sampled_value_not_the_examiners_score():
    """A blended examiner may score a wrong value >= 0.5: with ``step_gold_right`` the credit still pushes it down."""
    p = torch.tensor([[NAN, 0.8], [NAN, 0.5], [NAN, 0.2], [NAN, 0.2]])
    x = _inputs(p)
    right = torch.tensor([[False, True], [False, False], [False, False], [False, True]])
    liked = AdvantageInputs(**{**x.__dict__, "step_rewards": torch.ones(4, 2), "step_gold_right": right})
    adv = compute_advantages("srpo_likelihood", liked, AdvantageOptions(alpha=1.0, scale=False))
    assert adv[:, 2].tolist() == pytest.approx([1.0, -1.0, -4.0, 1.0])  # the same as the exact step rewards give


def test_estimator_needs_the_gold_probabilities():
    x = _inputs(None)
    with pytest.raises(UserError, match="likelihood_steps"):
        compute_advantages("srpo_likelihood", x)
    with pytest.raises(ValueError, match="step_gold_prob"):
        compute_advantages("srpo_likelihood", _inputs(torch.zeros(4, 3)))


# -- the reader and the trainer (tiny model)

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def decision_records():
    from she.data.synthetic import generate

    recs = generate(n_queries=6, products_per_query=3, seed=5)
    by_label = {}
    for r in recs:
        by_label.setdefault(r.label, r)
    return list(by_label.values())[:3]  # one of each label: Relevant is yes for two, no for one


def _one_by_one(model, tok, record, text, schema):
    """P(gold Relevant value) from an unpadded forward pass of the prompt + the text up to ``Relevant:``."""
    from she.evaluation.generate import label_first_tokens
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import relevant_choice

    prompt = tok.apply_chat_template(build_messages(record, style="compact", schema=schema), tokenize=False,
                                     add_generation_prompt=True)
    prefix = text[: text.index("Relevant:") + len("Relevant:")]
    ids = tok.encode(prompt, add_special_tokens=False) + tok.encode(prefix, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    first = label_first_tokens(tok, ["yes", "no"])[True]
    return float(torch.softmax(logits[first], -1)[["yes", "no"].index(relevant_choice(record.label, record.taxonomy))])


def test_reader_matches_one_by_one_and_skips_what_it_cannot_read(tiny_model_dir, decision_records):
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.parse import parse_trace
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import write_rationale
    from she.reasoning.schema import decision_schema
    from she.training.gold_prob import GoldStepProbability

    schema = decision_schema("hd3")
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    recs = decision_records
    texts = [write_rationale(r, schema) for r in recs]
    flipped = texts[0].replace("Relevant: yes", "Relevant: no") if "Relevant: yes" in texts[0] else \
        texts[0].replace("Relevant: no", "Relevant: yes")
    texts = texts + [flipped, texts[1].replace("Relevant: ", "Relevant: maybe "), "Verdict: Exact"]
    recs = recs + [recs[0], recs[1], recs[2]]
    prompts = [build_messages(r, style="compact", schema=schema) for r in recs]
    parsed = [parse_trace(t, schema) for t in texts]
    calls = []
    reader = GoldStepProbability(lambda: calls.append(1) or model, tok, schema, ["Relevant"], bf16=False, batch_size=2)
    got = reader.score(prompts, texts, recs, parsed)
    k = [i for i, st in enumerate(parsed[0].steps) if st.key == "Relevant"][0]
    for i in range(4):  # the gold-consistent traces and the flipped decision: read at the same prefix
        want = _one_by_one(model, tok, recs[i], texts[i], schema)
        assert set(got[i]) == {k} and got[i][k][0] == pytest.approx(want, abs=1e-5)
    assert [got[i][k][1] for i in range(4)] == [True, True, True, False]  # the sampled value against the gold one
    # the flipped trace has the same prefix as the first: the same P(gold), whatever value was sampled
    assert got[3][k][0] == pytest.approx(got[0][k][0], abs=1e-6)
    assert got[4] == {} and got[5] == {}  # an unknown value, and no Relevant line: nothing read
    # one row a rollout, read or not: 6 rows in batches of 2 = 3 forward passes (equal on every process)
    assert len(calls) == 3
    calls.clear()
    reader.score(prompts[4:], texts[4:], recs[4:], parsed[4:])
    assert len(calls) == 1  # nothing readable: the passes still run
    with pytest.raises(UserError, match="not a choice step"):
        GoldStepProbability(lambda: model, tok, schema, ["Verdict"])


def test_trainer_credits_the_decision_and_logs_it(tiny_model_dir, decision_records, tmp_path):
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.rationale import write_rationale
    from she.reasoning.schema import decision_schema, default_schema, semantic_schema
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    schema = decision_schema("hd3")
    G = 2
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    recs = decision_records[:2]
    ds = make_prompt_dataset(recs, "compact", schema=schema)
    by_id = {r.id: r for r in recs}
    rows = [dict(ds[i]) for i in (0, 1) for _ in range(G)]
    texts = [write_rationale(by_id[row["record_id"]], schema) for row in rows]
    texts[1] = texts[1].replace("Relevant: yes", "Relevant: no") if "Relevant: yes" in texts[1] else \
        texts[1].replace("Relevant: no", "Relevant: yes")
    script = {}
    for row, x in zip(rows, texts):
        script.setdefault(row["prompt"][-1]["content"], []).append(x)

    def rollout(prompts, trainer):  # TRL's rollout_func: each prompt answered with its scripted texts in turn
        seen = {}
        prompt_ids, completion_ids = [], []
        for p in prompts:
            key = p[-1]["content"]
            k = seen[key] = seen.get(key, -1) + 1
            ptext = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            prompt_ids.append(tok(ptext, add_special_tokens=False)["input_ids"])
            completion_ids.append(tok(script[key][k % G], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=200,
                             max_steps=1, learning_rate=1e-3, seed=0, bf16=False)
    t = SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, schema=schema,
                    advantage="srpo_likelihood", alpha=1.0, rollout_func=rollout)
    assert t.likelihood_steps == ["Relevant"]
    ids = [tok.encode(x, add_special_tokens=False) + [tok.eos_token_id] for x in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    scored = t.score_rollouts(rows, completion_ids, mask)
    for r, row, x in zip(scored, rows, texts):
        k = r.step_keys.index("Relevant")
        assert r.step_gold[k][0] == pytest.approx(_one_by_one(t.model, tok, by_id[row["record_id"]], x, schema),
                                                  abs=1e-5)
        assert [g is None for g in r.step_gold] == [key != "Relevant" for key in r.step_keys]
        assert sum(not math.isnan(g) for g in r.gold_probs) == 1
    t.train()  # one real step through TRL: the hook computes the likelihood advantages and logs the reads
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    assert 0.0 < logs[0]["srpo/gold_step_prob"] < 1.0 and logs[0]["srpo/gold_step_read"] == 1.0
    batch = t.last_batch
    for i, r in enumerate(batch.rollouts):  # the decision's tokens carry its credit, every other token the outcome
        j = r.reward_keys.index("Relevant")
        p, right = r.gold_probs[j], r.gold_right[j]
        credit = 1.0 if right else -min((1 - p) / p, 4.0)
        on = batch.token_step[i] == j
        assert on.any() and torch.allclose(batch.advantages[i][on], torch.full((int(on.sum()),), credit), atol=1e-5)
    assert [r.gold_right[r.reward_keys.index("Relevant")] for r in batch.rollouts] == [True, False, True, True]
    assert [r.rewards[r.reward_keys.index("Relevant")] for r in batch.rollouts] == [1.0, 0.0, 1.0, 1.0]

    # class-balanced credit: over the three records' gold decisions (yes, yes, no) no weighs 3 / (2 x 1) = 1.5 and yes
    # 3 / (2 x 2) = 0.75; the decision's tokens then carry credit x weight
    all_by_id = {r.id: r for r in decision_records}
    tw = SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=all_by_id, schema=schema,
                     advantage="srpo_likelihood", alpha=1.0, rollout_func=rollout,
                     likelihood_class_weights="balanced", likelihood_objective="prob")
    assert tw.likelihood_weights == {"Relevant": {"yes": 0.75, "no": 1.5}}
    tw.train()
    batch = tw.last_batch
    for i, (r, row) in enumerate(zip(batch.rollouts, rows)):
        j = r.reward_keys.index("Relevant")
        p, right = r.gold_probs[j], r.gold_right[j]
        weight = 1.5 if by_id[row["record_id"]].label == "Irrelevant" else 0.75
        assert r.gold_weights[j] == weight
        on = batch.token_step[i] == j
        assert torch.allclose(batch.advantages[i][on], torch.full((int(on.sum()),), weight * (p if right else p - 1)),
                              atol=1e-5)
    assert SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=all_by_id, schema=schema,
                       advantage="srpo_likelihood", likelihood_class_weights={"no": 2.0}
                       ).likelihood_weights == {"Relevant": {"no": 2.0}}
    for bad, match in [("inverse", "likelihood_class_weights must be"), ({"no": -1.0}, "numbers >= 0"),
                       ({"no": float("nan")}, "finite"), ({False: 2.0}, "quote yes/no"), ({"No": 2.0}, "'No'")]:
        with pytest.raises(UserError, match=match):
            SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=all_by_id, schema=schema,
                        advantage="srpo_likelihood", likelihood_class_weights=bad)
    with pytest.raises(UserError, match="for advantage 'srpo_likelihood'"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, schema=schema,
                    advantage="srpo_gated", likelihood_class_weights="balanced")

    with pytest.raises(UserError, match="likelihood_steps is for"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, schema=schema,
                    advantage="srpo_gated", likelihood_steps=["Relevant"])
    plain = make_prompt_dataset(recs, "compact")
    assert SRPOTrainer(model, args, plain, processing_class=tok, records_by_id=by_id, schema=default_schema("hd3"),
                       advantage="srpo_likelihood").likelihood_steps == ["Type"]  # read where facts annotate it
    with pytest.raises(UserError, match="decision steps"):
        SRPOTrainer(model, args, plain, processing_class=tok, records_by_id=by_id, schema=semantic_schema("hd3"),
                    advantage="srpo_likelihood")
    with pytest.raises(UserError, match="not in reward_steps"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, schema=schema,
                    advantage="srpo_likelihood", reward_steps=["Missing"])
    with pytest.raises(UserError, match="likelihood_steps is empty"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, schema=schema,
                    advantage="srpo_likelihood", likelihood_steps=[])
