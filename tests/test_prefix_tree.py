"""Rows that share a prefix scored as one packed sequence (she.models.prefix_tree; the trainers' ``logp_prefix:
shared``): the layout by hand, then TRL's fused-head log-probabilities, entropies and gradients of a batch of groups
(shared prompts, a forced stem, identical rows, left and right padding, a group split by a shuffle) equal to the
unpacked forward pass, in float32 and under sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

from she.models.prefix_tree import IGNORE, model_attention, pack_groups, pack_shared_prefixes, unpack  # noqa: E402


def test_layout_by_hand():
    # two rows sharing the prompt [5, 6] and the first completion token 7; the last 3 columns are scored
    ids = torch.tensor([[0, 5, 6, 7, 8, 9],
                        [0, 5, 6, 7, 3, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1],
                         [0, 1, 1, 1, 1, 0]])
    p = pack_shared_prefixes(ids, mask, 3)
    # common prefix s[0:3] = [5, 6, 7] (P = 3): A = [5, 6], then segments [7, 8, 9] and [7, 3]
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    # position 1 (token 6) predicts 7; segment 1 predicts 8 then 9; segment 2 predicts 3
    assert p.shift_labels.tolist() == [[IGNORE, 7, 8, 9, IGNORE, 3, IGNORE]]
    a = p.attention[0, 0].int().tolist()
    assert a[0] == [1, 0, 0, 0, 0, 0, 0] and a[1] == [1, 1, 0, 0, 0, 0, 0]
    assert a[4] == [1, 1, 1, 1, 1, 0, 0]  # segment 1 sees A and itself
    assert a[6] == [1, 1, 0, 0, 0, 1, 1]  # segment 2 sees A and itself, not segment 1
    # row 0's scored tokens 7, 8, 9 come from packed columns 1, 2, 3; row 1's 7, 3 from 1, 5, its padding from none
    assert p.col.tolist() == [[1, 2, 3], [1, 5, -1]] and p.row.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert (p.tokens_before, p.tokens_after) == (9, 7)
    values = torch.arange(7.0)[None]
    assert unpack(values, p).tolist() == [[1.0, 2.0, 3.0], [1.0, 5.0, 0.0]]


def test_identical_rows_and_errors():
    ids = torch.tensor([[4, 5, 6], [4, 5, 6]])
    p = pack_shared_prefixes(ids, torch.ones_like(ids), 1)
    assert p.input_ids.tolist() == [[4, 5, 6, 6]] and p.col.tolist() == [[1], [1]]  # both read A's last position
    with pytest.raises(ValueError, match="contiguous"):
        pack_shared_prefixes(ids, torch.tensor([[1, 0, 1], [1, 1, 1]]), 1)
    with pytest.raises(ValueError, match="no prompt token"):
        pack_shared_prefixes(ids, torch.tensor([[0, 0, 1], [1, 1, 1]]), 1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        pack_shared_prefixes(ids, torch.ones_like(ids), 3)


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).float()
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model


def _batch(seed: int = 0):
    """Three prompts (left-padded by 0, 2 and 4) x completions: prompt 0 has 3 rollouts sharing a forced stem of 3
    tokens then leaves of 1-3 tokens (one repeated exactly), prompt 1 two free rollouts, prompt 2 one; the rows
    shuffled so that groups are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    prompts = [r(7), r(5), r(3)]
    stem = r(3)
    leaf = r(2)
    completions = [[0, stem + leaf], [0, stem + r(3)], [0, stem + leaf], [0, stem + r(1)], [1, r(6)], [1, r(2)],
                   [2, r(4)]]
    width_p, width_c = 7, 6
    ids = torch.zeros(len(completions), width_p + width_c, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (k, c) in enumerate(completions):
        p = prompts[k]
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        mask[i, width_p - len(p):width_p] = 1
        ids[i, width_p:width_p + len(c)] = torch.tensor(c)
        mask[i, width_p:width_p + len(c)] = 1
    order = torch.randperm(len(completions), generator=g)
    return ids[order], mask[order], width_c


def _unpacked(model, ids, mask, keep):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-keep] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -keep:], out.entropy[:, -keep:]


def _packed(model, ids, mask, keep, attn):
    p = pack_shared_prefixes(ids, mask, keep)
    attention = model_attention(model, p.attention)
    assert attention.dtype == (torch.bool if attn == "sdpa" else torch.float32)
    out = model(input_ids=p.input_ids, attention_mask=attention, position_ids=p.position_ids,
                shift_labels=p.shift_labels, fused_lm_head=True)
    return unpack(out.log_probs, p), unpack(out.entropy, p)


def _grads(model, fn):
    model.zero_grad()
    lp, ent = fn()
    w = torch.linspace(-1.0, 2.0, lp.numel()).view_as(lp)
    (lp * w).sum().add(ent.sum() * 0.3).backward()
    return lp.detach(), ent.detach(), {n: q.grad.detach().clone() for n, q in model.named_parameters()
                                       if q.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_logps_entropies_and_gradients_as_the_rows(attn):
    model = _model(attn)
    ids, mask, keep = _batch()
    lp_a, ent_a, g_a = _grads(model, lambda: _unpacked(model, ids, mask, keep))
    lp_b, ent_b, g_b = _grads(model, lambda: _packed(model, ids, mask, keep, attn))
    scored = (mask[:, -keep:] == 1)
    assert scored.sum() > 0 and (lp_b[~scored] == 0).all() and (lp_b[scored] < 0).all()
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-5, msg=name)
    p = pack_shared_prefixes(ids, mask, keep)
    assert p.input_ids.shape[0] == 3 and p.tokens_after < p.tokens_before  # one packed row a prompt, fewer tokens


def test_trainer_switch(tiny_grpo):
    from she.errors import UserError
    from she.training.srpo import SRPOTrainer

    model, args, ds, kwargs = tiny_grpo
    with pytest.raises(UserError, match="logp_prefix"):
        SRPOTrainer(model, args, ds, logp_prefix="tree", **kwargs)
    trainer = SRPOTrainer(model, args, ds, logp_prefix="shared", **kwargs)
    ids, mask, keep = _batch()
    ids = ids.clamp(max=model.config.vocab_size - 1)
    with torch.no_grad():
        a = trainer._packed_logps(model, ids, mask, keep, compute_entropy=False)[0]
        trainer.logp_prefix = "per_row"
        b = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)[0]
        trainer.logp_prefix = "shared"
        c = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)[0]
    torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.05)  # bf16 autocast: matmul rounding
    assert torch.equal(a, c)
