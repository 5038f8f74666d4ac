"""Faster rollouts with the same distribution (she.models.generation; docs/benchmarks.md, "Rollout generation"):
sampling by inversion against a loop and against the frequencies it must reproduce, the patch of
``torch.multinomial`` that routes transformers' sampling to it, one autocast region around ``generate`` giving the
same tokens with fewer weight casts, and the trainer's switch."""

from __future__ import annotations

import bisect

import pytest
import torch

from she.models import generation as gen
from she.models.generation import categorical_sample, fast_sampling, generation_autocast


def _loop_sample(probs: torch.Tensor, uniform: torch.Tensor) -> list[int]:
    """The definition, row by row: the first index whose cumulative sum exceeds u * total."""
    out = []
    for row, u in zip(probs.tolist(), uniform.tolist()):
        cum, acc = [], 0.0
        for p in row:
            acc += p
            cum.append(acc)
        out.append(min(bisect.bisect_right(cum, u * acc), len(row) - 1))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_inversion_matches_a_loop_on_random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(7, 13, generator=g) ** 3  # unnormalised, some tiny entries
    probs[torch.rand(7, 13, generator=g) < 0.3] = 0.0
    probs[:, 0] += 1e-3  # no all-zero row
    u = torch.rand(7, generator=g, dtype=torch.float64)
    assert categorical_sample(probs, uniform=u).tolist() == _loop_sample(probs.double(), u)


def test_inversion_by_hand():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    # cumulative 0.2, 0.2, 0.7, 1.0: u in [0, 0.2) -> 0; [0.2, 0.7) -> 2 (index 1 owns an empty interval); [0.7, 1) -> 3
    for u, want in [(0.0, 0), (0.19, 0), (0.21, 2), (0.69, 2), (0.71, 3), (0.999, 3)]:
        assert categorical_sample(probs, uniform=torch.tensor([u])).item() == want, u


def test_a_uniform_rounding_up_to_the_total_never_draws_a_zero_probability_tail():
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert categorical_sample(probs, uniform=torch.ones(2, dtype=torch.float64)).tolist() == [1, 0]


def test_frequencies_match_the_distribution():
    """200,000 draws from two rows (one unnormalised): every frequency within 5 standard errors of its probability;
    zero-probability indices never drawn."""
    probs = torch.tensor([[0.5, 0.25, 0.0, 0.125, 0.125], [2.0, 0.0, 1.0, 0.5, 0.5]])
    want = probs / probs.sum(1, keepdim=True)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    for _ in range(n // 1000):
        draws = categorical_sample(probs.repeat(1000, 1), g).view(1000, 2)
        for row in range(2):
            counts[row] += torch.bincount(draws[:, row], minlength=5).float()
    freq = counts / n
    se = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
    assert counts[0, 2] == 0 and counts[1, 1] == 0


def test_bad_probabilities_raise_like_torch():
    with pytest.raises(RuntimeError, match="probability tensor"):
        categorical_sample(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(RuntimeError, match="probability tensor"):
        categorical_sample(torch.tensor([[0.5, -0.1]]))
    with pytest.raises(RuntimeError, match="probability tensor"):
        categorical_sample(torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        categorical_sample(torch.tensor([0.5, 0.5]))


def test_fast_sampling_routes_only_the_one_sample_call_and_restores_torch(monkeypatch):
    original = torch.multinomial
    calls = []
    real = gen.categorical_sample
    monkeypatch.setattr(gen, "categorical_sample", lambda p, g=None: calls.append(p.shape) or real(p, g))
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with fast_sampling():
        assert torch.multinomial(probs, 1).tolist() == [[1], [2]]
        assert calls == [torch.Size([2, 3])]
        two = torch.multinomial(torch.tensor([[0.5, 0.5, 0.0]]), 2)  # torch's own (no replacement): both indices
        assert sorted(two[0].tolist()) == [0, 1] and len(calls) == 1
        with fast_sampling():  # re-entrant
            torch.multinomial(probs, 1)
        assert len(calls) == 2
    assert torch.multinomial is original
    with fast_sampling(False):
        assert torch.multinomial is original


def test_fast_sampling_routes_only_the_threads_inside_a_block(monkeypatch):
    """Another thread's draws go to torch's own sampler while a block is open, and blocks closing out of order
    across threads leave torch's function installed at the end."""
    import threading

    original = torch.multinomial
    calls = []
    real = gen.categorical_sample
    monkeypatch.setattr(gen, "categorical_sample", lambda p, g=None: calls.append(1) or real(p, g))
    probs = torch.tensor([[0.0, 1.0]])
    entered, release, done = threading.Event(), threading.Event(), []

    def other():
        with fast_sampling():
            entered.set()
            release.wait(10)
        done.append(True)

    with fast_sampling():
        t = threading.Thread(target=other)
        t.start()
        entered.wait(10)
    # this thread's block closed first; the other's is still open: this thread is routed to torch's sampler
    torch.multinomial(probs, 1)
    assert calls == []
    release.set()
    t.join(10)
    assert done and torch.multinomial is original


def _prepared_tiny(tiny_model_dir):
    """The tiny model as TRL's trainer generates with it: prepared by accelerate for bf16 (autocast in forward)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    # an earlier test's trainer may have left accelerate's process-wide state at another precision
    AcceleratorState._reset_state(reset_partial_state=True)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    return model.eval(), tok


def _sample(model, tok, *, outer: bool, fast: bool, seed: int = 0, n_new: int = 12):
    from transformers import GenerationConfig

    ids = tok(["a query about drills", "hammer"], return_tensors="pt", padding=True)
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
                           min_new_tokens=n_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.no_grad(), generation_autocast(outer, "cpu"), fast_sampling(fast):
        return model.generate(**ids, generation_config=cfg)


def test_one_autocast_region_gives_the_same_tokens_with_one_cast_per_weight(tiny_model_dir):
    model, tok = _prepared_tiny(tiny_model_dir)
    from torch.profiler import ProfilerActivity, profile

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_shapes = {tuple(m.weight.shape) for m in linears}

    def weight_casts(outer: bool):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = _sample(model, tok, outer=outer, fast=False)
        # 2-D casts of a Linear weight's shape (activations are 3-D here)
        n = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::_to_copy" and e.input_shapes and len(e.input_shapes[0]) == 2
                and tuple(e.input_shapes[0]) in weight_shapes)
        return out, n

    per_forward, n_per_forward = weight_casts(False)
    one_region, n_one_region = weight_casts(True)
    assert torch.equal(per_forward, one_region)  # the same casts, so the same tokens
    # 12 new tokens = 12 forward passes: every weight cast in each without the outer region, once with it
    assert n_one_region == len(linears), (n_one_region, len(linears))
    assert n_per_forward == 12 * len(linears), (n_per_forward, len(linears))


def test_hf_generate_samples_through_the_inversion(tiny_model_dir, monkeypatch):
    """transformers' sampling loop still calls torch.multinomial(probs, 1), so the patch is where the draws come
    from (a transformers upgrade that changes the call would fail here, not silently fall back)."""
    model, tok = _prepared_tiny(tiny_model_dir)
    calls = []
    real = gen.categorical_sample
    monkeypatch.setattr(gen, "categorical_sample", lambda p, g=None: calls.append(p.shape) or real(p, g))
    out = _sample(model, tok, outer=True, fast=True, n_new=6)
    assert len(calls) == 6 and all(s[0] == 2 for s in calls)
    assert out.shape[1] == tok(["a query about drills", "hammer"], return_tensors="pt", padding=True)["input_ids"].shape[1] + 6
    again = _sample(model, tok, outer=True, fast=True, n_new=6)
    assert torch.equal(out, again)  # reproducible from the seed


def test_trainer_switch(tiny_grpo, monkeypatch):
    from she.errors import UserError
    from she.training.srpo import SRPOTrainer

    model, args, data, kw = tiny_grpo
    with pytest.raises(UserError, match="rollout_sampler"):
        SRPOTrainer(model, args, data, rollout_sampler="gumbel", **kw)
    calls = []
    real = gen.categorical_sample
    monkeypatch.setattr(gen, "categorical_sample", lambda p, g=None: calls.append(p.shape) or real(p, g))
    SRPOTrainer(model, args, data, rollout_sampler="torch", **kw).train()
    assert calls == []
    SRPOTrainer(model, args, data, **kw).train()  # the default: inverse_cdf
    assert len(calls) >= 1 and calls[0][0] == 4


def test_policy_sampler_and_service_sample_by_inversion(tiny_model_dir, monkeypatch):
    """The PRM/pass@N/difficulty sampler and the service's chat endpoint draw sampled tokens by inversion, and
    greedy decoding draws nothing."""
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.serving.backend import ChatItem, JudgeBackend
    from she.training.prm import PolicySampler

    calls = []
    real = gen.categorical_sample
    monkeypatch.setattr(gen, "categorical_sample", lambda p, g=None: calls.append(p.shape) or real(p, g))
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    rec = generate(n_queries=1, products_per_query=1, seed=0)[0]
    sampler = PolicySampler(model, tok, max_new_tokens=4, batch_size=4, seed=1)
    sampler([(rec, "")], n=3, temperature=0.0)
    assert calls == []
    first = sampler([(rec, "")], n=3, temperature=1.0)
    assert calls and calls[0][0] == 3
    sampler._calls = 1  # the same seed again: the same draws
    assert sampler([(rec, "")], n=3, temperature=1.0) == first
    calls.clear()
    backend = JudgeBackend.load(str(tiny_model_dir))
    item = ChatItem(messages=(("user", "hi"),))
    backend._chat([item], max_tokens=3, temperature=0.0, top_p=1.0)
    assert calls == []
    backend._chat([item, item], max_tokens=3, temperature=0.8, top_p=0.9)
    assert calls and calls[0][0] == 2
