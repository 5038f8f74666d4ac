"""The gold-probability outcome reward (she.training.gold_prob): pure parts by hand, the batched scorer against
one-by-one forward passes on the tiny model, and its plumbing through SRPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from she.data.synthetic import generate  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.evaluation.generate import label_first_tokens  # noqa: E402
from she.reasoning.parse import parse_trace, verdict_prefix  # noqa: E402
from she.reasoning.prompts import build_messages  # noqa: E402
from she.reasoning.rationale import write_rationale  # noqa: E402
from she.reasoning.schema import default_schema  # noqa: E402
from she.training.gold_prob import (  # noqa: E402
    GoldLabelProbability,
    gold_log_probabilities,
    log_floor_reward,
)

SCHEMA = default_schema("hd3")


def test_verdict_prefix_cuts_the_space_with_the_label():
    text = "Type: same\nVerdict: Exact"
    assert verdict_prefix(text, text.index("Exact")) == ("Type: same\nVerdict:", True)
    text = "Verdict:Exact"
    assert verdict_prefix(text, 8) == ("Verdict:", False)
    assert verdict_prefix("Exact", 0) == ("", False)
    with pytest.raises(ValueError, match="outside"):
        verdict_prefix("abc", 4)


def test_gold_probabilities_by_hand():
    logits = torch.zeros(2, 6)
    logits[0, 3] = math.log(3.0)  # labels at ids 1, 3, 5: softmax [1, 3, 1] / 5
    logits[1, 0] = 100.0  # not a label id: ignored
    label_ids = torch.tensor([[1, 3, 5], [1, 3, 5]])
    log_p = gold_log_probabilities(logits, label_ids, torch.tensor([1, 2]))
    assert log_p.exp().tolist() == pytest.approx([0.6, 1 / 3])
    # 1 + max(log p, -floor) / floor: log 0.6 = -0.511 -> 1 - 0.0511 at floor 10; the floor clamps at 0
    assert log_floor_reward(log_p, 10.0).tolist() == pytest.approx([1 + math.log(0.6) / 10, 1 + math.log(1 / 3) / 10])
    assert log_floor_reward(torch.tensor([0.0, -5.0, -30.0]), 20.0).tolist() == pytest.approx([1.0, 0.75, 0.0])
    with pytest.raises(ValueError, match="floor"):
        log_floor_reward(log_p, 0.0)


@pytest.fixture(scope="module")
def records():
    return generate(n_queries=4, products_per_query=3, seed=3)[:6]


def _one_by_one(model, tok, record, text) -> float:
    """P(gold) from an unpadded forward pass of one prompt + the reasoning up to the label (the reference)."""
    parsed = parse_trace(text, SCHEMA)
    if parsed.label is None:
        return 0.0
    prefix, spaced = verdict_prefix(text, parsed.label_span[0])
    prompt = tok.apply_chat_template(build_messages(record, style="compact"), tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False) + tok.encode(prefix, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    labels = list(SCHEMA.labels)
    first = label_first_tokens(tok, labels)[spaced]
    return float(torch.softmax(logits[first], -1)[labels.index(record.label)])


def test_batched_scorer_matches_one_by_one_and_memoises(tiny_model_dir, records):
    from she.models.registry import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    texts = [write_rationale(r, SCHEMA) for r in records]
    texts[1] = texts[1] + "\nVerdict: Partial"  # a second verdict line: the parser's verdict decides the cut
    texts[2] = "no verdict here"
    texts[3] = texts[3].replace("Verdict: ", "Verdict:")  # unspaced label token
    prompts = [build_messages(r, style="compact") for r in records]
    calls = []
    scorer = GoldLabelProbability(lambda: calls.append(1) or model, tok, SCHEMA, bf16=False, batch_size=4)
    got = scorer.score(prompts, texts, records)
    want = [_one_by_one(model, tok, r, t) for r, t in zip(records, texts)]
    assert got[2] == 0.0 and all(0.0 < g < 1.0 for i, g in enumerate(got) if i != 2)
    assert got == pytest.approx(want, abs=1e-5)  # left padding with the right position ids changes nothing
    assert len(set(round(g, 6) for g in got)) > 2  # different prompts give different probabilities
    n = len(calls)
    assert scorer.score(prompts, texts, records) == got and len(calls) == n  # the same batch: memoised
    scorer.score(prompts[:2], texts[:2][::-1], records[:2])
    assert len(calls) > n  # a new batch is scored afresh
    with pytest.raises(ValueError, match="2 prompts, 3 texts"):
        scorer.score(prompts[:2], texts[:3], records[:3])
    # under bf16 autocast the decoder runs in bf16 and the label logits are re-read in float32: close to fp32
    bf = GoldLabelProbability(lambda: model, tok, SCHEMA, bf16=True, batch_size=4).score(prompts, texts, records)
    assert bf[2] == 0.0 and bf == pytest.approx(want, abs=0.02)
    logs = GoldLabelProbability(lambda: model, tok, SCHEMA, bf16=False, log_floor=20.0).score(prompts, texts, records)
    want_log = [0.0 if w == 0.0 else 1 + max(math.log(w), -20.0) / 20.0 for w in want]
    assert logs == pytest.approx(want_log, abs=1e-5)
    n = len(calls)
    scorer.score(prompts, texts, records)
    scorer.forget()
    with torch.no_grad():  # the weights move: after forget() the same batch is scored with the new ones
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert scorer.score(prompts, texts, records) != got and len(calls) > n + 1
    model.train()
    scorer.forget()
    scorer.score(prompts, texts, records)
    assert model.training  # scored in eval mode, the caller's mode restored


def test_srpo_trainer_gold_prob_outcome(tiny_model_dir, records, tmp_path):
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    G = 2
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=8,
                             max_steps=1, learning_rate=1e-3, seed=0, bf16=False)
    ds = make_prompt_dataset(records[:2], "compact")
    by_id = {r.id: r for r in records}
    t = SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, outcome="gold_prob",
                    advantage="srpo_gated")
    rows = [dict(ds[i]) for i in (0, 1) for _ in range(G)]
    texts = [write_rationale(by_id[row["record_id"]], SCHEMA) for row in rows]
    texts[1] = "Verdict: Irrelevant" if by_id[rows[1]["record_id"]].label != "Irrelevant" else "Verdict: Exact"
    ids = [tok.encode(x, add_special_tokens=False) + [tok.eos_token_id] for x in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    # the prompt ids P(gold) is read after are TRL's own (the ids generation started from)
    assert t.gold_prob.tokenize_prompts([rows[0]["prompt"]]) == [list(t._tokenize_prompts([rows[0]["prompt"]])[0][0])]
    scored = t.score_rollouts(rows, completion_ids, mask)
    want = [_one_by_one(t.model, tok, by_id[row["record_id"]], x) for row, x in zip(rows, texts)]
    assert [r.outcome for r in scored] == pytest.approx(want, abs=1e-5)
    assert [r.correct for r in scored] == [True, False, True, True]  # right/wrong stays the sampled label's

    t.train()  # TRL's reward function is the same scorer: one real step, logged under its name
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and "rewards/gold_prob/mean" in logs[0]

    t2 = SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, outcome="gold_logprob")
    scored2 = t2.score_rollouts(rows, completion_ids, mask)
    want2 = [_one_by_one(t2.model, tok, by_id[row["record_id"]], x) for row, x in zip(rows, texts)]  # after t's step
    assert [r.outcome for r in scored2] == pytest.approx([1 + max(math.log(w), -20.0) / 20.0 for w in want2], abs=1e-5)
    assert t2._make_reward_func().__name__ == "gold_logprob"

    with pytest.raises(UserError, match="outcome must be one of"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, outcome="soft")
    with pytest.raises(UserError, match="only outcome reward"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, outcome="gold_prob",
                    partial_credit=True)
