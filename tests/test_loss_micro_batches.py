"""``rl.loss_micro_batches``: a step's rollouts go through the loss in n pieces before one optimizer update.

The claim in she.training.rl.loss_batch_settings is that the update is the one of a single pass (TRL's dapo
loss divides every piece by the whole generation batch's token count). Checked on the tiny model with scripted
completions (tests/she_test_rollouts.py), so both runs see the same rollouts: two SRPO steps with a KL anchor
under plain SGD, one pass against two pieces, the same parameters after, and the loss called twice as often.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

import torch  # noqa: E402

from she.data.synthetic import generate  # noqa: E402
from she.errors import UserError  # noqa: E402
from she.training.rl import loss_batch_settings  # noqa: E402


def test_settings_by_hand():
    assert loss_batch_settings(32) == {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
                                       "steps_per_generation": 1}
    assert loss_batch_settings(32, 4) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
                                          "steps_per_generation": 4}
    for bad in (0, 3, -1):
        with pytest.raises(UserError, match="loss_micro_batches"):
            loss_batch_settings(32, bad)


def _train(tiny_model_dir, records, out, micro_batches: int):
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset
    from she_test_rollouts import G, scripted_rollout

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    # plain SGD without clipping: the update is lr x the gradient itself, so a gradient off by a constant factor
    # (a normaliser counted twice) shows, where Adam's per-parameter scaling and norm clipping would hide it
    args = build_grpo_config(out, num_generations=G, max_completion_length=200, max_steps=2, learning_rate=1e-2,
                             beta=0.04, seed=0, optim="sgd", max_grad_norm=0.0,
                             **loss_batch_settings(2 * G, micro_batches))
    trainer = SRPOTrainer(model, args, make_prompt_dataset(records), records_by_id={r.id: r for r in records},
                          processing_class=tok, rollout_func=scripted_rollout, advantage="srpo_gated")
    calls = []
    inner = trainer.compute_loss

    def counting(*a, **kw):
        calls.append(1)
        return inner(*a, **kw)

    trainer.compute_loss = counting
    trainer.train()
    return [p.detach().clone() for p in trainer.model.parameters()], len(calls), trainer.state.global_step


def test_two_pieces_give_the_update_of_one_pass(tiny_model_dir, tmp_path):
    records = [r for r in generate(n_queries=6, products_per_query=3, seed=1)][:4]
    one, calls_one, steps_one = _train(tiny_model_dir, records, tmp_path / "one", 1)
    two, calls_two, steps_two = _train(tiny_model_dir, records, tmp_path / "two", 2)
    assert steps_one == steps_two == 2  # optimizer steps: the same
    assert (calls_one, calls_two) == (2, 4)  # forward + backward passes: twice as many pieces
    moved = max((a - b).abs().max().item() for a, b in zip(one, two))
    assert moved < 1e-5, f"largest parameter difference between one pass and two pieces: {moved}"
    from she.models.registry import load_model_and_tokenizer

    base = [p.detach() for p in load_model_and_tokenizer(tiny_model_dir)[0].parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(one, base)) > 1e-4  # the steps did move the weights
