"""Hot reload in a real (tiny-model) SRPO run: facts an annotator stores after step 1 decide steps at step 2,
without a restart, and the live examiner counts them. Completions are scripted (the tiny random model cannot
write a trace; see tests/she_test_rollouts.py); everything after generation is the trainer's normal path."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from she.data.annotations import AnnotationStore, QueueItem  # noqa: E402
from she.data.schema import StepFacts  # noqa: E402
from she.data.synthetic import generate  # noqa: E402
from she.rewards.hybrid import VerifierExaminer  # noqa: E402
from she.rewards.live_facts import LiveFactsExaminer  # noqa: E402

G = 4


@pytest.mark.slow
def test_facts_annotated_during_a_run_count_at_the_next_step(tiny_model_dir, tmp_path):
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset
    from she_test_rollouts import scripted_rollout

    # Partial records without facts: their label leaves Type and Attributes undecidable for the verifier
    full = [r for r in generate(n_queries=12, products_per_query=3, seed=1) if r.label == "Partial"][:2]
    assert len(full) == 2
    records = [replace(r, facts=StepFacts()) for r in full]
    store = AnnotationStore(tmp_path / "facts.sqlite", create=True)
    store.set_queue([QueueItem(f"i{k}", r.id, "test", 1, {"steps": []}) for k, r in enumerate(records)])
    examiner = LiveFactsExaminer(VerifierExaminer(), tmp_path / "facts.sqlite")
    seen: dict[int, tuple[int, int]] = {}

    class Annotate(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = (examiner.new_fact_decisions, examiner.reloads)
            if state.global_step == 1:  # an annotator answers while the job runs
                for k, r in enumerate(full):
                    store.answer(f"i{k}", "alice", facts={"type_relation": r.facts.type_relation})

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    args = build_grpo_config(tmp_path / "run", num_generations=G, per_device_train_batch_size=2 * G,
                             max_completion_length=48, max_steps=2, learning_rate=1e-3, seed=0)
    t = SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                    processing_class=tok, rollout_func=scripted_rollout, examiner=examiner, callbacks=[Annotate()])
    t.train()
    assert seen[1] == (0, 0)  # step 1: nothing new
    # step 2: each of the 2 x G completions with a Type line (3 of 4 variants) has it decided by the new fact
    assert seen[2][1] == 1 and seen[2][0] == 2 * 3
    srcs = [s for r in t.last_batch.rollouts for k, s in zip(r.step_keys, r.step_sources) if k == "Type"]
    assert srcs and all(s == "verifier" for s in srcs)
    assert records[0].facts == StepFacts()  # the trainer's records were not modified
    logged = [h["facts/new_fact_decisions_total"] for h in t.state.log_history if "facts/new_fact_decisions_total" in h]
    assert logged == [0.0, 6.0]  # the trainer logs the examiner's counts at every step
