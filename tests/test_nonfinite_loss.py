"""SRPOTrainer skips optimizer steps whose loss is NaN/inf and stops after ``max_bad_steps`` in a row.

A NaN is injected by wrapping ``compute_loss`` (the real loss times NaN, so backward writes NaN gradients
exactly as a real blow-up would). The parameters are snapshotted after every optimizer step by a
callback; a skipped step must leave them bit-identical, a good step must change them.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from she.data.synthetic import generate  # noqa: E402
from she.reasoning.prompts import user_message  # noqa: E402
from she.reasoning.rationale import write_rationale  # noqa: E402
from she.training.srpo import NonFiniteLossError, SRPOTrainer, build_grpo_config, make_prompt_dataset  # noqa: E402

G = 2


@pytest.fixture(scope="module")
def records():
    return generate(n_queries=4, products_per_query=2, seed=5)[:4]


def _rollout_func(records):
    """Scripted completions: per prompt, the right rationale and the same trace with a wrong verdict, so
    every group has outcome rewards 1 and 0 and the advantage (hence the update) is never zero."""
    by_msg = {}
    for r in records:
        good = write_rationale(r)
        wrong = "Irrelevant" if r.label != "Irrelevant" else "Exact"
        by_msg[user_message(r)] = [good, good.rsplit("Verdict:", 1)[0] + f"Verdict: {wrong}"]

    def rollout(prompts, trainer):
        tok = trainer.processing_class
        prompt_ids, completion_ids = [], []
        for i, p in enumerate(prompts):
            text = by_msg[p[-1]["content"]][i % G]
            ptext = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            prompt_ids.append(tok(ptext, add_special_tokens=False)["input_ids"])
            completion_ids.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


class _Snapshots(TrainerCallback):
    """Parameters after each optimizer step (on_step_end runs after optimizer.step and zero_grad)."""

    def __init__(self):
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]


def _trainer(tiny_model_dir, records, tmp_path, max_steps, **kw):
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=G, max_completion_length=64,
                             max_steps=max_steps, learning_rate=1e-3, seed=0)
    snaps = _Snapshots()
    t = SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                    processing_class=tok, rollout_func=_rollout_func(records), callbacks=[snaps], **kw)
    initial = [p.detach().clone() for p in t.model.parameters()]
    return t, snaps, initial


def _inject_nan(monkeypatch, bad_calls: set[int]):
    """compute_loss returns loss * NaN on the given (1-based) calls; one call per optimizer step here."""
    calls = {"n": 0}
    original = SRPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        calls["n"] += 1
        loss = original(self, model, inputs, *a, **k)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(SRPOTrainer, "compute_loss", compute_loss)
    return calls


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_steps_are_skipped_and_the_run_continues(tiny_model_dir, records, tmp_path, monkeypatch, caplog):
    calls = _inject_nan(monkeypatch, {2, 4})
    t, snaps, initial = _trainer(tiny_model_dir, records, tmp_path, max_steps=5, max_bad_steps=2)
    with caplog.at_level(logging.WARNING, logger="she.training.srpo"):
        t.train()  # two bad steps, never two in a row: no error
    assert calls["n"] == 5 and sorted(snaps.after) == [1, 2, 3, 4, 5]
    assert not _same(initial, snaps.after[1])  # a good step moves the weights ...
    assert _same(snaps.after[1], snaps.after[2])  # ... a NaN step leaves them bit-identical
    assert not _same(snaps.after[2], snaps.after[3])
    assert _same(snaps.after[3], snaps.after[4])
    assert not _same(snaps.after[4], snaps.after[5])
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert (t.nonfinite_steps, t.consecutive_nonfinite_steps) == (2, 0)
    logs = [h for h in t.state.log_history if "srpo/nonfinite_loss_skipped" in h]
    assert [h["srpo/nonfinite_loss_skipped"] for h in logs] == [0.0, 1.0, 0.0, 1.0, 0.0]
    warned = [r.getMessage() for r in caplog.records if "optimizer update skipped" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("step 2: loss nan") and "1 in a row" in warned[0]
    # AdamW's state only counts the good steps: the skipped ones left no trace in the moments either
    steps = {int(s["step"]) for s in t.optimizer.state_dict()["state"].values()}
    assert steps == {3}


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error(tiny_model_dir, records, tmp_path, monkeypatch):
    calls = _inject_nan(monkeypatch, {2, 3, 4, 5, 6})
    t, snaps, initial = _trainer(tiny_model_dir, records, tmp_path, max_steps=6, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive optimizer steps \(steps 2-4, max_bad_steps=3\)"):
        t.train()
    assert calls["n"] == 4  # stopped in step 4, the third bad one
    assert _same(snaps.after[1], list(t.model.parameters()))  # still the weights after step 1
    assert not _same(initial, snaps.after[1])


def test_max_bad_steps_is_validated(tiny_model_dir, records, tmp_path):
    with pytest.raises(ValueError, match="max_bad_steps"):
        _trainer(tiny_model_dir, records, tmp_path, max_steps=1, max_bad_steps=0)
