"""Verdict-weighted SFT loss: the pure token weights (hand-computed, loop vs vectorised) and the trainer hook on a
tiny model (the hooked TRL loss equals the weighted mean computed from plain logits)."""

import random

import pytest
import torch

from she.algorithms.sft_loss import last_label_token_mask, verdict_token_weights

L = [7, 8, 9]  # label token ids


def test_last_label_token_is_marked_per_row_by_hand():
    labels = torch.tensor([
        [-100, 5, 7, 3, 8, 2],       # two label tokens: the last one (8 at 4) is the verdict
        [-100, -100, 4, 4, 4, 2],    # none: no verdict
        [-100, 9, 2, -100, -100, -100],  # right-padded row
    ])
    mask = last_label_token_mask(labels, L)
    assert mask.tolist() == [[0, 0, 0, 0, 1, 0], [0] * 6, [0, 1, 0, 0, 0, 0]]
    w = verdict_token_weights(labels, L, 5.0)
    assert w.tolist() == [[0, 1, 1, 1, 5, 1], [0, 0, 1, 1, 1, 1], [0, 5, 1, 0, 0, 0]]
    assert torch.equal(verdict_token_weights(labels, L, 1.0), (labels != -100).float())
    with pytest.raises(ValueError):
        verdict_token_weights(labels, L, -1.0)


def test_mask_equals_a_loop_on_random_rows():
    rng = random.Random(0)
    for _ in range(50):
        b, t = rng.randint(1, 5), rng.randint(1, 12)
        labels = torch.tensor([[rng.choice([-100, 1, 2, 7, 8, 9]) for _ in range(t)] for _ in range(b)])
        want = torch.zeros(b, t, dtype=torch.bool)
        for i in range(b):
            hits = [j for j in range(t) if int(labels[i, j]) in L]
            if hits:
                want[i, hits[-1]] = True
        assert torch.equal(last_label_token_mask(labels, L), want)


@pytest.mark.slow
@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_hooked_trl_loss_is_the_weighted_token_mean(tmp_path, tiny_model_dir, weight):
    from trl import SFTConfig

    from she.config import DataConfig
    from she.data.sources import load_splits
    from she.evaluation.fast import fast_prefix, prefix_label_tokens
    from she.models.registry import load_model_and_tokenizer
    from she.reasoning.schema import resolve_schema
    from she.training.sft import _verdict_sft_trainer, build_sft_dataset

    schema = resolve_schema("default", "hd3")
    recs = load_splits(DataConfig(synthetic_queries=12))["train"][:6]
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), for_training=True)
    ids, _ = prefix_label_tokens(tok, fast_prefix("hd3", schema), list(schema.labels))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                     completion_only_loss=True, bf16=False)
    trainer = _verdict_sft_trainer()(model=model, args=args, train_dataset=build_sft_dataset(recs, schema=schema),
                                     processing_class=tok, verdict_ids=ids, verdict_weight=weight)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = verdict_token_weights(target, ids, weight)
    mask = last_label_token_mask(target, ids)
    assert mask.sum() == len(batch["input_ids"])  # every trace ends with a verdict
    want = (w * nll).sum() / (target != -100).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    logged = trainer._metrics["train"]
    assert logged["verdict_nll"][-1] == pytest.approx((nll * mask).sum().item() / mask.sum().item(), rel=1e-4)
    assert 0.0 <= logged["verdict_accuracy"][-1] <= 1.0
