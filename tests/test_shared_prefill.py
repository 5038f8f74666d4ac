"""One prompt forward pass for a group of rollouts (she.models.generation.shared_prefill; docs/benchmarks.md,
"Rollout generation"): runs of identical rows found by hand, the same tokens and scores as the plain ``generate``
(greedy and sampled, left padding, runs of different lengths), the prompt computed once per run (tokens counted
at the embedding), the patch scoped to its block, and the trainer's switch."""

from __future__ import annotations

import pytest
import torch

from she.models import generation as gen
from she.models.generation import identical_runs, shared_prefill, shared_prefill_generate


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _batch(counts: list[int], width: int = 9, seed: int = 0):
    """Left-padded prompts, prompt k repeated counts[k] times next to each other; prompt k has k * 2 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(counts), width), generator=g)
    mask = torch.ones_like(ids)
    for k in range(len(counts)):
        ids[k, : 2 * k] = 0
        mask[k, : 2 * k] = 0
    reps = torch.tensor(counts)
    return ids.repeat_interleave(reps, 0), mask.repeat_interleave(reps, 0)


def test_identical_runs_by_hand():
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [1, 2], [1, 2]])
    mask = torch.ones_like(ids)
    starts, counts = identical_runs(ids, mask)
    assert starts.tolist() == [0, 2, 3] and counts.tolist() == [2, 1, 3]  # a prompt seen again later is a new run
    mask[1, 0] = 0  # same ids, another mask: not the same row
    starts, counts = identical_runs(ids, mask)
    assert starts.tolist() == [0, 1, 2, 3] and counts.tolist() == [1, 1, 1, 3]
    starts, counts = identical_runs(ids[:0], mask[:0])
    assert starts.numel() == 0 and counts.numel() == 0


@pytest.mark.parametrize("counts", [[4, 4, 4], [3, 1, 2]])
def test_same_tokens_and_scores_as_the_plain_call(counts):
    from transformers import GenerationConfig

    model = _llama()
    ids, mask = _batch(counts)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=1,
                              output_scores=True, return_dict_in_generate=True)
    a = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
    b = shared_prefill_generate(model, ids, mask, generation_config=greedy)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    sampled = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10,
                               pad_token_id=0, eos_token_id=1)
    torch.manual_seed(5)
    a = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampled)
    torch.manual_seed(5)
    b = shared_prefill_generate(model, ids, mask, generation_config=sampled)
    assert torch.equal(a, b)  # the same logits, the same random stream: the same draws


def _count_embedded_tokens(model):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    return seen, handle


def test_the_prompt_is_computed_once_per_run():
    from transformers import GenerationConfig

    model = _llama()
    ids, mask = _batch([4, 4, 4], width=9)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0, eos_token_id=1)
    seen, handle = _count_embedded_tokens(model)
    try:
        model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        plain = list(seen)
        seen.clear()
        shared_prefill_generate(model, ids, mask, generation_config=cfg)
        shared = list(seen)
    finally:
        handle.remove()
    # plain: 12 rows x 9 prompt tokens, then 2 decoding steps of 12 rows (the third token needs no forward)
    assert plain == [12 * 9, 12, 12]
    # shared: 3 prompts x 8 tokens once, then each row's last prompt token, then the same decoding steps
    assert shared == [3 * 8, 12, 12, 12]


def test_falls_back_to_the_plain_call_without_repeated_rows():
    from transformers import GenerationConfig

    model = _llama()
    ids, mask = _batch([1, 1, 1])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=2, min_new_tokens=2, pad_token_id=0, eos_token_id=1)
    seen, handle = _count_embedded_tokens(model)
    try:
        out = shared_prefill_generate(model, ids, mask, generation_config=cfg)
    finally:
        handle.remove()
    assert seen == [3 * 9, 3]
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg))


def test_the_patch_is_scoped_to_its_block_and_model():
    from transformers import GenerationConfig

    model, other = _llama(), _llama(1)
    ids, mask = _batch([2, 2])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=2, min_new_tokens=2, pad_token_id=0, eos_token_id=1)
    seen, handle = _count_embedded_tokens(model)
    try:
        with shared_prefill(model):
            assert "generate" in vars(model) and "generate" not in vars(other)
            model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            assert seen[0] == 2 * 8  # shared
            with pytest.raises(RuntimeError, match="already replaced"):
                with shared_prefill(model):
                    pass
        assert "generate" not in vars(model)
        seen.clear()
        model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        assert seen[0] == 4 * 9  # the model's own again
        seen.clear()
        with shared_prefill(model, enabled=False):
            assert "generate" not in vars(model)
        with pytest.raises(ZeroDivisionError), shared_prefill(model):
            raise ZeroDivisionError
        assert "generate" not in vars(model)  # removed on an exception too
    finally:
        handle.remove()


def test_trainer_switch(tiny_grpo):
    """SRPOTrainer's rollouts take the shared prefill by default on a CPU (TRL's G rows of a prompt adjacent), TRL's
    per-rollout path with ``rollout_prefill="per_rollout"``, and a bad value is refused."""
    from she.errors import UserError
    from she.training.srpo import SRPOTrainer

    model, args, data, kw = tiny_grpo
    with pytest.raises(UserError, match="rollout_prefill"):
        SRPOTrainer(model, args, data, rollout_prefill="cached", **kw)

    def first_generation_forward(**extra):
        trainer = SRPOTrainer(model, args, data, **extra, **kw)
        calls = []

        def spy(model, ids, mask, **k):
            calls.append(identical_runs(ids, mask)[1].tolist())
            return shared_prefill_generate(model, ids, mask, **k)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gen, "shared_prefill_generate", spy)
            trainer.train()
        return calls

    calls = first_generation_forward()
    assert calls == [[2, 2]]  # TRL's 2 prompts x 2 rollouts came as two runs of identical rows
    assert first_generation_forward(rollout_prefill="per_rollout") == []


def test_policy_sampler_shares_the_prompt_of_its_n_samples(tiny_model_dir, monkeypatch):
    """The judge's Monte-Carlo labels, DPO's pass@N and the difficulty estimate sample n completions of each
    request: the n rows are adjacent, so each request's prompt goes through one shared prefill."""
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.training.prm import PolicySampler

    calls = []

    def spy(model, ids, mask, **k):
        calls.append(identical_runs(ids, mask)[1].tolist())
        return shared_prefill_generate(model, ids, mask, **k)

    monkeypatch.setattr(gen, "shared_prefill_generate", spy)
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    recs = generate(n_queries=2, products_per_query=1, seed=0)[:2]
    sampler = PolicySampler(model, tok, max_new_tokens=4, batch_size=8, seed=1)
    first = sampler([(recs[0], ""), (recs[1], "")], n=3, temperature=1.0)
    assert calls == [[3, 3]]
    assert "generate" not in vars(model)
    sampler._calls = 0  # the same seed again: the same draws
    assert sampler([(recs[0], ""), (recs[1], "")], n=3, temperature=1.0) == first


def test_composes_with_a_generate_already_set_on_the_instance():
    """A wrapper set on the instance before (the layout-invariant sampler of multi-process runs) is what the shared
    prefill calls, and it is back on the instance when the block exits."""
    from transformers import GenerationConfig

    model = _llama()
    ids, mask = _batch([2, 2])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=2, min_new_tokens=2, pad_token_id=0, eos_token_id=1)
    seen = []
    cls_generate = type(model).generate

    def wrapper(*a, **k):
        seen.append("cache" in k)
        return cls_generate(model, *a, **k)

    model.generate = wrapper
    with shared_prefill(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert seen == [True]  # the shared path went through the instance's wrapper, with the prefilled cache
    assert vars(model)["generate"] is wrapper
    assert torch.equal(out, cls_generate(model, input_ids=ids, attention_mask=mask, generation_config=cfg))


@pytest.mark.parametrize("extra", [{"num_beams": 2, "num_return_sequences": 2}, {"num_beams": 2}, {"use_cache": False},
                                   {"output_hidden_states": True}, {"cache_implementation": "static"}])
def test_falls_back_when_a_prefilled_cache_would_change_the_call(extra):
    """Beams or several sequences a row would expand the rows but not a cache passed in; another cache kind, no cache
    or the prompt's hidden states need the prompt inside generate: the plain call, the same output."""
    from transformers import GenerationConfig

    model = _llama()
    ids, mask = _batch([2, 2])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0, eos_token_id=1,
                           **extra)
    seen, handle = _count_embedded_tokens(model)
    try:
        out = shared_prefill_generate(model, ids, mask, generation_config=cfg)
    finally:
        handle.remove()
    rows = 4 * extra.get("num_beams", 1)
    assert seen[0] == rows * 9  # the whole prompt of every row, in generate's own prefill
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    assert torch.equal(out if isinstance(out, torch.Tensor) else out.sequences,
                       plain if isinstance(plain, torch.Tensor) else plain.sequences)

