"""``rl.rollout_evidence: computed``: the computed steps forced, only the rest sampled and trained.

A real SRPO step on the tiny model (its samples are noise, which is fine: what is checked is where they go): every
completion starts with its record's computed stem, TRL's loss mask is 0 on the stem's tokens and 1 on the sampled
ones, and the prompt plus stem tokenize back to the text the computed read of ``she eval`` forces.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import she.reasoning.similarity as sim  # noqa: E402
from she.config import RLJobConfig  # noqa: E402
from she.data.schema import Product, Record  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.reasoning.schema import resolve_schema  # noqa: E402
from she.reasoning.rationale import computed_stem  # noqa: E402
from she.training.computed_rollouts import computed_evidence_rollout, stem_tokens  # noqa: E402
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
