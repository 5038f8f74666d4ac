"""TRL's fused LM head projecting only the labelled positions on a CPU (she.training.lm_head): the same
log-probabilities, entropies and gradients as TRL's all-positions CPU path, fewer positions projected, TRL's
function restored after the block, and the trainers that open it."""

from __future__ import annotations

import threading

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

from she.errors import UserError  # noqa: E402
from she.training.lm_head import labelled_positions_only  # noqa: E402


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch):
    monkeypatch.delenv("SHE_LM_HEAD_POSITIONS", raising=False)


@pytest.fixture
def fused(tiny_model_dir):
    """A tiny causal LM in float32 with TRL's fused head, a batch of 3 rows (left padding, a prompt of 5 tokens
    without labels) and a recorder of how many positions each call projects."""
    from she.models.registry import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    model = model.float()
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt
    return model, ids, mask, labels


def _run(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    w = torch.linspace(-1.0, 2.0, out.log_probs.numel()).view_as(out.log_probs)
    (out.log_probs * w).sum().add(out.entropy.sum() * 0.3).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


def test_same_values_and_gradients_fewer_positions(fused, fused_head_calls):
    model, ids, mask, labels = fused
    seen, _ = fused_head_calls
    lp_all, ent_all, g_all = _run(model, ids, mask, labels)
    with labelled_positions_only():
        lp, ent, g = _run(model, ids, mask, labels)
    # TRL's CPU path projects every shifted position; the block only those with a label
    n_labelled = int((labels[:, 1:] != -100).sum())
    assert seen == [3 * 11, n_labelled] and n_labelled < 3 * 11
    assert (lp_all[labels[:, 1:] == -100] == 0).all() and (lp[labels[:, 1:] == -100] == 0).all()
    torch.testing.assert_close(lp, lp_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ent_all, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_all.keys() and len(g) > 0
    for name in g:
        torch.testing.assert_close(g[name], g_all[name], rtol=1e-4, atol=1e-6, msg=name)


def test_restored_after_the_block_nested_and_on_error():
    original = trl_utils._use_triton
    with labelled_positions_only():
        patched = trl_utils._use_triton
        assert patched is not original and patched(torch.device("cpu"))
        with labelled_positions_only():
            assert trl_utils._use_triton is patched
        assert trl_utils._use_triton is patched  # the outer block is still open
    assert trl_utils._use_triton is original
    with pytest.raises(RuntimeError, match="boom"), labelled_positions_only():
        raise RuntimeError("boom")
    assert trl_utils._use_triton is original
    with labelled_positions_only(enabled=False):
        assert trl_utils._use_triton is original
    # another device keeps TRL's own answer
    with labelled_positions_only():
        assert trl_utils._use_triton(torch.device("meta")) == original(torch.device("meta"))


def test_environment_switch(monkeypatch):
    original = trl_utils._use_triton
    monkeypatch.setenv("SHE_LM_HEAD_POSITIONS", "all")
    with labelled_positions_only():
        assert trl_utils._use_triton is original
    with labelled_positions_only(True):  # an explicit choice wins
        assert trl_utils._use_triton is not original
    monkeypatch.setenv("SHE_LM_HEAD_POSITIONS", "some")
    with pytest.raises(UserError, match="SHE_LM_HEAD_POSITIONS must be 'labelled' or 'all', got 'some'"), \
            labelled_positions_only():
        pass


def test_bad_environment_fails_when_the_trainer_is_built(tiny_model_dir, tmp_path, monkeypatch):
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    recs = generate(n_queries=2, products_per_query=2, seed=0)[:2]
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    args = build_grpo_config(tmp_path, num_generations=2, per_device_train_batch_size=4, max_completion_length=8,
                             max_steps=1, learning_rate=1e-4, seed=0)
    monkeypatch.setenv("SHE_LM_HEAD_POSITIONS", "")
    with pytest.raises(UserError, match="SHE_LM_HEAD_POSITIONS"):
        SRPOTrainer(model, args, make_prompt_dataset(recs), processing_class=tok,
                    records_by_id={r.id: r for r in recs}, step_rewards=False)


def test_threads_share_one_patch():
    original = trl_utils._use_triton
    inside, release = threading.Event(), threading.Event()

    def worker():
        with labelled_positions_only():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    with labelled_positions_only():
        pass
    assert trl_utils._use_triton is not original  # the worker's block is still open
    release.set()
    t.join(5)
    assert trl_utils._use_triton is original


def test_srpo_trainer_projects_completion_positions_only(tiny_model_dir, tmp_path, fused_head_calls):
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    recs = generate(n_queries=2, products_per_query=2, seed=0)[:2]
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    args = build_grpo_config(tmp_path, num_generations=2, per_device_train_batch_size=4, max_completion_length=8,
                             max_steps=1, learning_rate=1e-4, seed=0, bf16=True, beta=0.04)
    kw = dict(processing_class=tok, records_by_id={r.id: r for r in recs}, step_rewards=False)
    seen, _ = fused_head_calls
    SRPOTrainer(model, args, make_prompt_dataset(recs), labelled_positions_only=False, **kw).train()
    everything = list(seen)
    seen.clear()
    SRPOTrainer(model, args, make_prompt_dataset(recs), **kw).train()  # the default
    # the reference and the policy pass each: 4 rows x at most 8 completion tokens, against every position
    assert len(seen) >= 2 and max(seen) <= 4 * 8 < min(everything)


def test_sft_trainer_projects_completion_positions_only(tiny_model_dir, tmp_path, fused_head_calls):
    from she.config import DataConfig, SFTJobConfig
    from she.data.sources import load_splits
    from she.training.sft import train_sft

    cfg = SFTJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=4,
                       report_to="none", data=DataConfig(synthetic_queries=8), bf16=False)
    seen, compact = fused_head_calls
    train_sft(cfg, load_splits(cfg.data)["train"])
    assert seen and compact == [True] * len(seen)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # closed again
