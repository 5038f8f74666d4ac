"""``rl.rollout_evidence: computed``: the computed steps forced, only the rest sampled and trained; and
``enumerated``: after the same steps a prompt's G rollouts are all its leaves (decision value x verdict), each once,
weighed by the policy's probability of it (the exact estimators).

A real SRPO step on the tiny model (its samples are noise, which is fine: what is checked is where they go): every
completion starts with its record's computed stem, TRL's loss mask is 0 on the stem's tokens and 1 on the sampled
ones, and the prompt plus stem tokenize back to the text the computed read of ``she eval`` forces. Enumerated: every
group holds the 6 leaves in order after its record's stem, TRL trains the leaf tokens only, the leaves'
log-probabilities the trainer uses are the policy's (recomputed here), and the advantages are zero-sum per prompt.
"""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import torch  # noqa: E402

import she.reasoning.similarity as sim  # noqa: E402
from she.algorithms.advantages import exact_tree_advantages  # noqa: E402
from she.config import RLJobConfig  # noqa: E402
from she.data.schema import Product, Record  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.reasoning.schema import resolve_schema  # noqa: E402
from she.reasoning.rationale import computed_stem  # noqa: E402
from she.training.computed_rollouts import (  # noqa: E402
    computed_evidence_rollout,
    enumerated_evidence_rollout,
    leaf_texts,
    stem_tokens,
)
from she.training.rl import trainer_rollout_kwargs  # noqa: E402

G = 2


@pytest.fixture(autouse=True)
def no_minilm(monkeypatch):
    """The Similarity bucket is not what these tests check: a constant instead of MiniLM."""
    monkeypatch.setattr(sim, "similarity_bucket", lambda record: "high")


def _records() -> list[Record]:
    pairs = [("cordless drill 20v", "DEWALT 20V MAX Cordless Drill Kit", "Exact"),
             ("white ceiling fan", "Hampton Bay 52 in. Ceiling Fan in Bronze", "Partial"),
             ("garden hose 50 ft", "Pine Bark Mulch 2 cu. ft.", "Irrelevant"),
             ("led bulb 60 watt", "Philips 60-Watt Equivalent A19 LED Light Bulb (4-Pack)", "Exact")]
    return [Record(id=f"r{i}", query=q, product=Product(title=t), label=lab) for i, (q, t, lab) in enumerate(pairs)]


def test_stems_end_where_the_policy_answers():
    rec = _records()[0]
    assert computed_stem(rec, resolve_schema("decision")).endswith("\nRelevant:")
    assert computed_stem(rec, resolve_schema("semantic")).endswith("\nVerdict:")
    with pytest.raises(UserError, match="depend on the label"):
        computed_stem(rec, resolve_schema("default"))  # Type and Attributes come from the label


def test_config_errors():
    recs, schema = _records(), resolve_schema("decision")
    with pytest.raises(UserError, match="sampled, computed or enumerated"):
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="forced"), recs, schema)
    with pytest.raises(UserError, match="unset rollout_func"):
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="computed", rollout_func="m:f"), recs, schema)
    with pytest.raises(UserError, match="depend on the label"):
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="computed"), recs, resolve_schema("default"))
    assert callable(trainer_rollout_kwargs(RLJobConfig(rollout_evidence="computed"), recs, schema)["rollout_func"])


def test_a_training_step_forces_the_stem_and_masks_it(tiny_model_dir, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.prompts import build_messages, user_message
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    recs, schema = _records(), resolve_schema("decision")
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=12,
                             max_steps=1, learning_rate=1e-3, seed=0)
    trainer = SRPOTrainer(model, args, make_prompt_dataset(recs, "compact", schema=schema),
                          records_by_id={r.id: r for r in recs}, processing_class=tok, schema=schema,
                          advantage="srpo_likelihood", rollout_func=computed_evidence_rollout(recs, schema))
    stem_of = {user_message(r): computed_stem(r, schema) for r in recs}
    seen = []
    original = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_ids", "completion_mask", "tool_mask")})
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    trainer.train()
    assert len(seen) == 1
    batch = seen[0]
    pad = tok.pad_token_id
    prompts = {tok.decode([t for t in row.tolist() if t != pad]): None for row in batch["prompt_ids"]}
    by_prompt = {tok.apply_chat_template(build_messages(r, style="compact", schema=schema), tokenize=False,
                                         add_generation_prompt=True): stem_of[user_message(r)] for r in recs}
    assert set(prompts) <= set(by_prompt)
    for row in range(batch["completion_ids"].shape[0]):
        prompt = tok.decode([t for t in batch["prompt_ids"][row].tolist() if t != pad])
        stem = by_prompt[prompt]
        prompt_ids = [t for t in batch["prompt_ids"][row].tolist() if t != pad]
        joint = tok(prompt + stem, add_special_tokens=False)["input_ids"]  # how `she eval`'s computed read forces them
        n_stem = len(joint) - len(prompt_ids)
        ids = batch["completion_ids"][row]
        assert prompt_ids + ids[:n_stem].tolist() == joint  # the computed steps, forced, as the read tokenizes them
        mask, tool = batch["completion_mask"][row], batch["tool_mask"][row]
        assert tool[:n_stem].sum().item() == 0  # no gradient on the forced steps
        n_real = int(mask.sum().item())
        assert n_real > n_stem and tool[n_stem:n_real].min().item() == 1  # the sampled tokens train


def test_stem_tokens_come_from_the_joint_text(tiny_model_dir):
    """A stem is tokenized after its prompt, not on its own; a tokenizer whose tokens cross the boundary is refused."""
    from she.models.registry import load_model_and_tokenizer

    tok = load_model_and_tokenizer(tiny_model_dir)[1]
    prompt = tok("Query: drill\nassistant\n", add_special_tokens=False)["input_ids"]
    stem = "Missing: none\nRelevant:"
    assert prompt + stem_tokens(tok, prompt, stem) == tok("Query: drill\nassistant\n" + stem,
                                                          add_special_tokens=False)["input_ids"]
    glued = tok("Query: dri", add_special_tokens=False)["input_ids"]
    assert tok("Query: drill", add_special_tokens=False)["input_ids"][: len(glued)] != glued  # the premise: it merges
    with pytest.raises(RuntimeError, match="merges across the boundary"):
        stem_tokens(tok, glued, "ll")


def test_records_whose_prompts_agree_must_agree_on_their_steps(monkeypatch):
    a = _records()[0]
    b = Record(id="other", query=a.query, product=a.product, label="Partial")
    computed_evidence_rollout([a, b], resolve_schema("decision"))  # labels differ, computed steps do not: fine
    monkeypatch.setattr(sim, "similarity_bucket", lambda record: "high" if record.id == a.id else "low")
    with pytest.raises(UserError, match="computed steps differ"):
        computed_evidence_rollout([a, b], resolve_schema("decision"))


# -- rollout_evidence: enumerated


def test_leaves_of_the_decision_and_of_a_label_free_schema():
    rec = _records()[0]
    decision = leaf_texts(resolve_schema("decision"), computed_stem(rec, resolve_schema("decision")))
    assert decision == [f" {v}\nVerdict: {lab}" for v in ("yes", "no") for lab in ("Irrelevant", "Partial", "Exact")]
    assert leaf_texts(resolve_schema("semantic"), computed_stem(rec, resolve_schema("semantic"))) == [
        " Irrelevant", " Partial", " Exact"]
    assert enumerated_evidence_rollout(_records(), resolve_schema("decision")).num_leaves == 6


def test_enumerated_config_errors():
    recs, schema = _records(), resolve_schema("decision")
    with pytest.raises(UserError, match="go together"):  # enumerated leaves with a sampled estimator
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="enumerated", advantage="srpo_gated"), recs, schema)
    with pytest.raises(UserError, match="go together"):  # an exact estimator on sampled rollouts
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="computed", advantage="srpo_exact"), recs, schema)
    with pytest.raises(UserError, match="num_generations: 6"):
        trainer_rollout_kwargs(RLJobConfig(rollout_evidence="enumerated", advantage="srpo_exact", num_generations=8),
                               recs, schema)
    ok = trainer_rollout_kwargs(RLJobConfig(rollout_evidence="enumerated", step_rewards=False, num_generations=6),
                                recs, schema)  # GRPO on enumerated leaves is grpo_exact
    assert ok["rollout_func"].num_leaves == 6


def _enumerated_trainer(model_dir, out, recs: list[Record], beta: float = 0.0, **srpo_kwargs):
    """(SRPOTrainer, tokenizer): one srpo_exact step over ``recs``' enumerated leaves on the decision schema, two
    prompts a step, the tiny model (KL anchor ``beta``); ``srpo_kwargs`` add to or override the trainer's keywords."""
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    schema, g = resolve_schema("decision"), 6
    model, tok = load_model_and_tokenizer(model_dir)
    tok.padding_side = "left"
    args = build_grpo_config(out, num_generations=g, per_device_train_batch_size=2 * g, max_completion_length=80,
                             max_steps=1, learning_rate=1e-3, seed=0, bf16=False, beta=beta)
    kwargs = {"step_rewards": True, "advantage": "srpo_exact",
              "rollout_func": enumerated_evidence_rollout(recs, schema), **srpo_kwargs}
    trainer = SRPOTrainer(model, args, make_prompt_dataset(recs, "compact", schema=schema),
                          records_by_id={r.id: r for r in recs}, processing_class=tok, schema=schema, **kwargs)
    return trainer, tok


def test_a_training_step_enumerates_every_leaf_and_weighs_it(tiny_model_dir, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    from she.reasoning.prompts import build_messages, user_message

    recs, schema, g = _records(), resolve_schema("decision"), 6
    trainer, tok = _enumerated_trainer(tiny_model_dir, tmp_path, recs, alpha=0.5, reward_steps=["Relevant"],
                                       share_pin=1.0)
    seen = []
    original = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append({k: inputs[k].clone() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                                     "tool_mask", "advantages")})
        with torch.no_grad():  # each row's token log-probabilities, by a plain forward pass before the update
            seen[-1]["token_logps"] = [
                model(torch.cat([p[m.bool()], c])[None]).logits[0].float().log_softmax(-1)
                for p, m, c in zip(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"])]
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    trainer.train()
    batch, last = seen[0], trainer.last_batch
    pad = tok.pad_token_id
    stem_of = {tok.apply_chat_template(build_messages(r, style="compact", schema=schema), tokenize=False,
                                       add_generation_prompt=True): computed_stem(r, schema) for r in recs}
    leaves = leaf_texts(schema, computed_stem(recs[0], schema))
    # TRL shuffles the rows before the loss: match them by their text
    texts, logps, advs = [], {}, {}
    for row in range(batch["completion_ids"].shape[0]):
        prompt_ids = [t for t in batch["prompt_ids"][row].tolist() if t != pad]
        n = int(batch["completion_mask"][row].sum())
        ids = batch["completion_ids"][row][:n].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        stem = stem_of[tok.decode(prompt_ids)]
        assert text[len(stem):] in leaves and text.startswith(stem)
        texts.append(text)
        assert ids[-1] == tok.eos_token_id
        tool = batch["tool_mask"][row][:n]
        n_stem = int((tool == 0).sum())
        assert tool[:n_stem].sum() == 0 and tool[n_stem:].min() == 1  # only the leaf's tokens train
        logits = batch["token_logps"][row][len(prompt_ids) - 1:len(prompt_ids) - 1 + n]  # the leaf's, on its own
        logps[text] = float(logits.gather(1, torch.tensor(ids)[:, None])[n_stem:, 0].sum())
        a = batch["advantages"][row]
        assert torch.allclose(a[:n], a[0].expand(n))  # one advantage a leaf, on its tokens
        advs[text] = float(a[0])
    assert len(set(texts)) == len(texts) == 2 * g  # two prompts, each with its 6 leaves once
    order = [r.text for r in last.rollouts]
    assert sorted(order) == sorted(texts)
    for p in range(2):  # the trainer's own order: groups contiguous, leaves in leaf_texts' order
        stems = {t[: -len(leaf)] for t, leaf in zip(order[p * g:(p + 1) * g], leaves)}
        assert len(stems) == 1 and all(t.endswith(leaf) for t, leaf in zip(order[p * g:(p + 1) * g], leaves))
    assert last.leaf_logp.tolist() == pytest.approx([logps[t] for t in order], abs=2e-3)
    per_row = torch.tensor([advs[t] for t in order])
    assert per_row.view(-1, g).sum(1).abs().max() < 1e-4  # zero-sum per prompt (the pin is centred under pi)
    rewards = last.outcome_rewards + 0.5 * torch.tensor([sum(r) for r in last.step_rewards])
    no_pin = exact_tree_advantages(rewards, last.leaf_logp, g)
    assert not torch.allclose(per_row, no_pin, atol=1e-4)  # the pin moved them
    logged = next(h for h in trainer.state.log_history if "srpo/expected_accuracy" in h)
    shares = [logged[f"srpo/pred_share/{lab}"] for lab in schema.labels]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)  # the policy's expected shares, not the leaves' 1/3 each
    probs = torch.softmax(last.leaf_logp.view(-1, g), 1).reshape(-1)
    exa = [i for i, r in enumerate(last.rollouts) if r.label == "Exact"]
    assert logged["srpo/pred_share/Exact"] == pytest.approx(float(probs[exa].sum()) / 2, abs=1e-4)


def test_rated_verdicts_reach_each_leaf_reward(tiny_model_dir, tmp_path):
    """``rl.rated_verdict`` on enumerated leaves: each leaf's step rewards are its Relevant line's 0/1 and its verdict's
    agreement with the pair's mean rating (docs/srpo.md, "Rated verdicts"), so srpo_exact's leaf reward carries the
    rating the outcome leaves out."""
    from she.data.labels import rating_agreement
    from she.rewards.hybrid import VerifierExaminer

    ratings = {"Exact": 2.67, "Partial": 2.33, "Irrelevant": 1.33}
    recs = [Record(id=r.id, query=r.query, product=r.product, label=r.label, score=ratings[r.label])
            for r in _records()]
    schema, g = resolve_schema("decision"), 6
    trainer, _ = _enumerated_trainer(tiny_model_dir, tmp_path, recs, examiner=VerifierExaminer(rated=True),
                                     reward_steps=["Relevant", "Verdict"], include_label_step=True)
    trainer.train()
    last = trainer.last_batch
    checked = 0
    for rollout, steps in zip(last.rollouts, last.step_rewards):
        assert rollout.label in schema.labels and len(steps) == 2, steps
        relevant_right = ("Relevant: no" in rollout.text) == (rollout.gold == "Irrelevant")
        rating = ratings[rollout.gold]
        assert steps[-1] == pytest.approx(rating_agreement(rollout.label, rating, "hd3"))
        assert steps[0] == (1.0 if relevant_right else 0.0)
        checked += 1
    assert checked == 2 * g


TEACHER = {"r0": {"Irrelevant": 0.1, "Partial": 0.2, "Exact": 0.7}, "r1": {"Irrelevant": 0.2, "Partial": 0.6, "Exact": 0.2},
           "r2": {"Irrelevant": 0.8, "Partial": 0.1, "Exact": 0.1}, "r3": {"Irrelevant": 0.3, "Partial": 0.3, "Exact": 0.4}}


@pytest.mark.parametrize("arm", ["srpo_exact", "grpo_exact"])
def test_a_teachers_term_reaches_each_leaf(tiny_model_dir, tmp_path, arm):
    """``rl.teacher`` (docs/srpo.md, "A teacher's term"): each leaf gets w x (log q(its verdict) - beta (log pi - log
    pi_ref)), centred under pi with the share pin; before the first update pi_ref = pi, so the term is log q alone.
    GRPO's exact arm (no step rewards: ``grpo_exact_kl``'s) gets the same term over its outcome alone."""
    from she.algorithms.advantages import teacher_leaf_term

    recs, g = _records(), 6
    arm_kw = ({"alpha": 0.5, "reward_steps": ["Relevant"]} if arm == "srpo_exact"
              else {"step_rewards": False, "advantage": "grpo_exact"})
    trainer, _ = _enumerated_trainer(tiny_model_dir, tmp_path, recs, beta=0.04, teacher_probs=TEACHER,
                                     teacher_weight=0.7, teacher_beta=2.0, **arm_kw)
    trainer.train()
    last = trainer.last_batch
    ids = [r.id for r in recs[:2]]  # the step's two prompts, in the trainer's order
    prompt_of = [rid for rid in ids for _ in range(g)]
    assert last.teacher_logp.tolist() == pytest.approx(
        [math.log(TEACHER[rid][r.label]) for rid, r in zip(prompt_of, last.rollouts)], abs=1e-6)
    assert last.ref_leaf_logp.tolist() == pytest.approx(last.leaf_logp.tolist(), abs=1e-3)  # the start is the ref
    steps = torch.tensor([sum(r) for r in last.step_rewards]) if arm == "srpo_exact" else 0.0
    rewards = last.outcome_rewards + 0.5 * steps
    h = teacher_leaf_term(last.leaf_logp, last.ref_leaf_logp, last.teacher_logp, g, 2.0)
    want = exact_tree_advantages(rewards, last.leaf_logp, g, pin=0.7 * h)
    assert last.advantages[:, 0].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert not torch.allclose(want, exact_tree_advantages(rewards, last.leaf_logp, g), atol=1e-3)  # it moved them
    logged = next(h for h in trainer.state.log_history if "srpo/teacher_kl" in h)
    assert logged["srpo/teacher_kl"] == pytest.approx(0.0, abs=1e-3)


def test_teacher_refusals(tiny_model_dir, tmp_path, tiny_bert_factory):
    from she.config import CrossEncoderJobConfig, DataConfig
    from she.training.cross_encoder import run_cross_encoder_job
    from she.training.rl import read_teacher

    recs = _records()
    with pytest.raises(UserError, match="needs beta > 0"):
        _enumerated_trainer(tiny_model_dir, tmp_path, recs, teacher_probs=TEACHER)
    with pytest.raises(UserError, match="exact estimators"):
        _enumerated_trainer(tiny_model_dir, tmp_path, recs, beta=0.04, teacher_probs=TEACHER, advantage="srpo_gated",
                            rollout_func=None)
    exact = {"rollout_evidence": "enumerated", "advantage": "srpo_exact", "num_generations": 6, "beta": 0.04}
    with pytest.raises(UserError, match="exact estimators"):
        read_teacher(RLJobConfig(teacher="x", advantage="srpo_gated"), recs)
    with pytest.raises(UserError, match="needs rl.beta > 0"):
        read_teacher(RLJobConfig(teacher="x", **{**exact, "beta": 0.0}), recs)
    with pytest.raises(UserError, match="not a model folder"):
        read_teacher(RLJobConfig(teacher=str(tmp_path / "nothing"), **exact), recs)
    # a real (tiny) cross-encoder: every RL prompt read, probabilities over the taxonomy's labels
    base = tiny_bert_factory(tmp_path / "bert", recs)
    ce = CrossEncoderJobConfig(model=str(base), output_dir=str(tmp_path / "ce"), data=DataConfig(taxonomy="hd3"),
                               max_steps=1, batch_size=4, max_length=64, report_to="none", eval_split="none")
    final = run_cross_encoder_job(ce, recs, [])
    uniform = read_teacher(RLJobConfig(teacher="uniform", **exact), recs)
    assert uniform == {r.id: {"Irrelevant": 1 / 3, "Partial": 1 / 3, "Exact": 1 / 3} for r in recs}
    probs = read_teacher(RLJobConfig(teacher=str(final), **exact), recs)
    assert sorted(probs) == sorted(r.id for r in recs)
    assert all(set(p) == {"Irrelevant", "Partial", "Exact"} and sum(p.values()) == pytest.approx(1.0, abs=1e-5)
               for p in probs.values())
