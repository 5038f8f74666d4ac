"""The CPU decoding speed-ups of she.models.generation (points 4-6; docs/benchmarks.md, "Rollout generation"):
one-token attention by two grouped matmuls against the repeated-heads reference and against SDPA, the growing KV
cache against ``torch.cat``, prepacked linear layers against bf16 autocast bit for bit, ``generate`` with each of
them against the plain call, the switches (``SHE_DECODING``, models without SDPA) and their scoping."""

from __future__ import annotations

import threading

import pytest
import torch

from she.errors import UserError
from she.models import generation as gen
from she.models.generation import (
    DECODE_ATTENTION,
    decode_attention,
    decode_attention_forward,
    fast_decoding,
    grouped_decode_attention,
    growing_cache,
    packed_linears,
    resolve_fast_decoding,
)

needs_packed_ops = pytest.mark.skipif(gen.packed_linear_ops() is None,
                                      reason="this torch build has no oneDNN linear ops (torch.ops.mkldnn)")


def _llama(seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def _batch(rows: int = 5, width: int = 9, seed: int = 0):
    """Left-padded prompts: row k has k pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for k in range(rows):
        ids[k, :k] = 0
        mask[k, :k] = 0
    return ids, mask


def _reference_attention(q, k, v, mask, scaling):
    """Loop over heads: query head h reads key/value head h // (H / K); float64."""
    b, h, _, _ = q.shape
    g = h // k.size(1)
    out = torch.empty(b, 1, h, v.size(-1), dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            s = (q[i, j, 0].double() @ k[i, j // g].double().T) * scaling
            if mask is not None:
                m = mask[i, j if mask.size(1) > 1 else 0, 0]
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
            out[i, 0, j] = torch.softmax(s, -1) @ v[i, j // g].double()
    return out


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head_bool"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 7, 8, 8), (2, 6, 3, 5, 16, 4), (1, 2, 2, 1, 4, 4)])
def test_grouped_attention_matches_the_per_head_loop(mask_kind, shape):
    b, h, kh, length, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(b, h, 1, d, generator=g), torch.randn(b, kh, length, d, generator=g),
               torch.randn(b, kh, length, dv, generator=g))
    keep = torch.rand(b, 1, 1, length, generator=g) > 0.3
    keep[..., -1] = True  # the token itself is always visible
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, -1e9),
            "per_head_bool": keep.expand(b, h, 1, length).clone()}[mask_kind]
    out = grouped_decode_attention(q, k, v, mask, 0.3)
    assert out.shape == (b, 1, h, dv) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_grouped_attention_refuses_several_query_tokens():
    with pytest.raises(ValueError, match="one query token"):
        grouped_decode_attention(torch.zeros(1, 2, 2, 4), torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), None, 1.0)


def test_attention_function_matches_sdpa_and_defers_to_it():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _llama().model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., :2] = False
    one = torch.randn(2, 4, 1, 8, generator=g)
    ours, _ = decode_attention_forward(module, one, k, v, mask, scaling=0.35)
    theirs, _ = sdpa_attention_forward(module, one, k, v, mask, scaling=0.35)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # several query tokens (a prompt) and dropout go to SDPA itself: the same tensor, bit for bit
    many = torch.randn(2, 4, 6, 8, generator=g)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    assert torch.equal(decode_attention_forward(module, many, k, v, causal, scaling=0.35)[0],
                       sdpa_attention_forward(module, many, k, v, causal, scaling=0.35)[0])
    torch.manual_seed(0)
    a = decode_attention_forward(module, one, k, v, mask, dropout=0.5, scaling=0.35)[0]
    torch.manual_seed(0)
    b = sdpa_attention_forward(module, one, k, v, mask, dropout=0.5, scaling=0.35)[0]
    assert torch.equal(a, b)


def _greedy(model, ids, mask, n=8):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=1, output_scores=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)


def _same_generation(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol)


def _same_until_near_ties(a, b, atol, tie=None):
    """Greedy runs whose arithmetic differs by rounding: each row's tokens are the same until a step where ``a``'s
    two best scores were within ``tie`` (default 2 * atol) of each other, and their scores agree within ``atol``
    until then (rows are computed independently: a row that parted is not compared further). Returns the number of
    (row, step) pairs compared."""
    tie = 2 * atol if tie is None else tie
    width = a.sequences.size(1) - len(a.scores)
    compared = 0
    for row in range(a.sequences.size(0)):
        for step, (x, y) in enumerate(zip(a.scores, b.scores)):
            torch.testing.assert_close(x[row], y[row], atol=atol, rtol=0)
            compared += 1
            if a.sequences[row, width + step] != b.sequences[row, width + step]:
                top2 = x[row].topk(2).values
                assert top2[0] - top2[1] <= tie, (row, step, top2)
                break
    return compared


def test_decode_attention_in_generate_and_its_scope(monkeypatch):
    calls = []
    real = gen.grouped_decode_attention
    monkeypatch.setattr(gen, "grouped_decode_attention", lambda *a: calls.append(1) or real(*a))
    model = _llama()
    ids, mask = _batch()
    plain = _greedy(model, ids, mask)
    with decode_attention(model):
        assert model.config._attn_implementation == DECODE_ATTENTION
        with decode_attention(model):  # nested: the outer block owns the switch
            pass
        assert model.config._attn_implementation == DECODE_ATTENTION
        ours = _greedy(model, ids, mask)
    assert model.config._attn_implementation == "sdpa"
    _same_generation(plain, ours)
    assert len(calls) == 7 * 2  # 7 decoding steps after the prompt, 2 layers; the prompt itself went to SDPA


def test_decode_attention_leaves_other_attention_and_the_plain_switch(monkeypatch):
    eager = _llama(attn="eager")
    with decode_attention(eager):
        assert eager.config._attn_implementation == "eager"
    model = _llama()
    monkeypatch.setenv("SHE_DECODING", "plain")
    with decode_attention(model):
        assert model.config._attn_implementation == "sdpa"
    with decode_attention(model, True):  # an explicit argument wins over the environment
        assert model.config._attn_implementation == DECODE_ATTENTION
    monkeypatch.setenv("SHE_DECODING", "fastest")
    with pytest.raises(UserError, match="SHE_DECODING"):
        resolve_fast_decoding()


def test_grow_matches_cat_and_restarts_when_the_keys_are_replaced():
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(2, 3, t, 4, generator=g) for t in (5, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)]
    buffer, keys, reference = None, torch.tensor([]), torch.tensor([])
    first = None
    for i, p in enumerate(pieces):
        buffer, keys = gen._grow(buffer, keys, p)
        reference = p if i == 0 else torch.cat([reference, p], dim=-2)
        assert torch.equal(keys, reference)
        first = buffer if first is None else first
    assert buffer.size(-2) >= keys.size(-2) and buffer is not first  # it grew by reallocating, not at every token
    kept = buffer
    buffer, keys = gen._grow(buffer, keys[..., :-2, :], pieces[1])  # a crop: the same buffer, overwritten in place
    assert buffer is kept and torch.equal(keys, torch.cat([reference[..., :-2, :], pieces[1]], dim=-2))
    selected = keys[[1, 0]]  # batch_select_indices / reorder: a new tensor, so a new buffer
    buffer, keys = gen._grow(buffer, selected, pieces[2])
    assert buffer is not kept and torch.equal(keys, torch.cat([selected, pieces[2]], dim=-2))


def test_growing_cache_in_generate_is_scoped_to_its_thread(monkeypatch):
    from transformers.cache_utils import DynamicLayer

    model = _llama()
    ids, mask = _batch()
    own = DynamicLayer.update
    plain = _greedy(model, ids, mask)
    grown = []
    real = gen._grow
    monkeypatch.setattr(gen, "_grow", lambda *a: grown.append(1) or real(*a))
    seen_elsewhere = []
    with growing_cache():
        ours = _greedy(model, ids, mask)
        t = threading.Thread(target=lambda: seen_elsewhere.append(len(grown) and _greedy(model, ids, mask)))
        before = len(grown)
        t.start()
        t.join()
        assert len(grown) == before  # another thread's generation concatenates as transformers does
    assert DynamicLayer.update is own
    _same_generation(plain, ours, atol=0)
    assert len(grown) == 2 * 2 * 8  # keys and values, 2 layers, the prompt and 7 decoding steps


@needs_packed_ops
def test_packed_linears_are_autocast_bit_for_bit_and_scoped():
    model = _llama()
    ids, mask = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, attention_mask=mask).logits
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with packed_linears(model, True):
        assert all("forward" in vars(m) for m in linears)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids, attention_mask=mask).logits
        packed_forwards = [vars(m)["forward"] for m in linears]
        with packed_linears(model, True):  # nested: the outer block's packing stays, nothing is packed again
            assert [vars(m)["forward"] for m in linears] == packed_forwards
        assert [vars(m)["forward"] for m in linears] == packed_forwards
        # outside autocast (float32) and with gradients: each layer's own forward
        with torch.no_grad():
            fp32 = model(input_ids=ids, attention_mask=mask).logits
        loss = model(input_ids=ids, attention_mask=mask).logits.float().sum()
        loss.backward()
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert not any("forward" in vars(m) for m in linears)
    assert torch.equal(got, want)
    with torch.no_grad():
        torch.testing.assert_close(fp32, model(input_ids=ids, attention_mask=mask).logits)
    model.lm_head.forward = lambda x: x  # something else replaced a layer's forward: refused
    with pytest.raises(RuntimeError, match="something else"):
        with packed_linears(model, True):
            pass


@needs_packed_ops
def test_fast_decoding_generates_what_the_plain_call_does(monkeypatch):
    model = _llama()
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _greedy(model, ids, mask)
        with fast_decoding(model):
            assert model.config._attn_implementation == DECODE_ATTENTION
            ours = _greedy(model, ids, mask)
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in model.modules())
    # bf16 products rounded alike, attention scores in float32 instead of bf16 (point 7): the same greedy tokens
    # but where the plain call's choice was a near tie
    assert _same_until_near_ties(plain, ours, atol=0.05) >= 5 * 8 // 2
    monkeypatch.setenv("SHE_DECODING", "plain")
    with fast_decoding(model):
        assert model.config._attn_implementation == "sdpa"
        assert not any("forward" in vars(m) for m in model.modules())


# -- point 7: the lean decoding step (she.models.decode_step) --------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 2, 7, 8, 8), (2, 6, 3, 5, 16, 4), (1, 2, 2, 1, 4, 4), (2, 3, 3, 6, 8, 8)])
def test_one_token_attention_matches_the_per_head_loop(masked, shape):
    from she.models.decode_step import key_bias, one_token_attention

    b, h, kh, length, d, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q, k = torch.randn(b, h, 1, d, generator=g), torch.randn(b, kh, length, d, generator=g)
    v = torch.randn(b, kh, length, dv, generator=g)
    keep = torch.rand(b, length, generator=g) > 0.3
    keep[:, -1] = True
    mask = keep if masked else None
    ref = _reference_attention(q, k, v, None if mask is None else mask[:, None, None, :], 0.3)
    out = one_token_attention(q, k, v, key_bias(mask, kh), 0.3)
    assert out.shape == (b, 1, h, dv) and out.dtype == v.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # bf16 values (the cache's, under autocast): float32 scores, a bf16 product -- bf16 rounding of the result
    out16 = one_token_attention(q, k, v.bfloat16(), key_bias(mask, kh), 0.3)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), _reference_attention(q, k, v.bfloat16(), None if mask is None else
                                                                    mask[:, None, None, :], 0.3),
                               atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="one query token"):
        one_token_attention(torch.zeros(b, h, 2, d), k, v, None, 0.3)


def _sdpa_like(q, k, v, key_mask, scaling):
    """transformers' path for the lean step: SDPA's stacked heads under bf16 autocast, its boolean mask."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return grouped_decode_attention(q, k, v, None if key_mask is None else key_mask[:, None, None, :], scaling)


def _prefilled(model, ids, mask):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    return cache


@needs_packed_ops
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("grow", [False, True])
@pytest.mark.parametrize("positions", ["cache", "mask"])
@pytest.mark.parametrize("packed", [False, True])
def test_lean_step_is_transformers_step_bit_for_bit(bias, padded, grow, positions, packed):
    """With SDPA's attention the lean step is transformers' forward of one token bit for bit (fused projections,
    the same ops otherwise), over several steps of a growing or concatenated cache; with its float32 attention it is
    within bf16 rounding of it, and the caches it leaves are the same. Positions: none given (the cache's length,
    transformers' default) or from the mask, as ``generate`` hands them. Inside ``packed_linears`` the decoder
    reuses its packed weights for the unfused layers (the same tensors); outside it packs them itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from she.models.decode_step import LeanDecoder

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    ids, mask = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    nxt = torch.randint(3, 97, (ids.size(0), 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), decode_attention(model, True), \
            growing_cache(grow), packed_linears(model, packed):
        exact, fp32 = LeanDecoder(model, _sdpa_like), LeanDecoder(model)
        reused = exact.head[0] is getattr(vars(model.lm_head).get("forward"), "_she_packed_weight", None)
        assert reused == packed and (exact.layers[0]["o"][0] is fp32.layers[0]["o"][0]) == packed
        theirs, ours, ours32 = (_prefilled(model, ids, mask) for _ in range(3))
        m = mask
        for t in range(nxt.size(1)):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            pos = None if positions == "cache" else (m.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            want = model(input_ids=nxt[:, t:t + 1], attention_mask=m, cache=theirs, use_cache=True,
                         position_ids=pos).logits
            got = exact.step(nxt[:, t:t + 1], ours, m, pos)
            got32 = fp32.step(nxt[:, t:t + 1], ours32, m, pos)
            assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
            assert torch.equal(got, want), t
            torch.testing.assert_close(got32.float(), want.float(), atol=0.05, rtol=0.02)
    for a, b in zip(theirs.layers, ours.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_packed_ops
def test_lean_decoding_takes_decoding_steps_only_and_restores_forward(monkeypatch):
    from she.models import decode_step
    from she.models.decode_step import lean_decoding

    model = _llama()
    ids, mask = _batch()
    steps = []
    real = decode_step.LeanDecoder.step
    monkeypatch.setattr(decode_step.LeanDecoder, "step", lambda self, *a, **k: steps.append(a[0].shape) or
                        real(self, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _greedy(model, ids, mask)
        with lean_decoding(model):
            assert "forward" in vars(model)
            with lean_decoding(model):  # nested: the outer block's decoder stays
                inner = vars(model)["forward"]
            assert vars(model)["forward"] is inner
            ours = _greedy(model, ids, mask)
            assert steps == [(5, 1)] * 7  # the prompt went to the model's forward, the 7 decoding steps here
            del steps[:]
            # with gradients, outside autocast, or asked for attentions: the model's own forward
            with torch.autocast("cpu", enabled=False):
                _greedy(model, ids, mask, n=3)
            model(input_ids=ids, attention_mask=mask)
            cfg_out = _greedy_attn(model, ids, mask)
            assert cfg_out.attentions is not None and steps == []
    assert "forward" not in vars(model)
    assert _same_until_near_ties(plain, ours, atol=0.05) >= 20
    # an instance forward (accelerate's autocast wrapper) is put back, not deleted
    wrapped = model.forward
    model.forward = wrapped
    with lean_decoding(model):
        assert vars(model)["forward"] is not wrapped
    assert vars(model)["forward"] is wrapped
    with lean_decoding(model, enabled=False):
        assert vars(model)["forward"] is wrapped


def _greedy_attn(model, ids, mask):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=3, pad_token_id=0, eos_token_id=1, output_attentions=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)


def test_lean_decoding_leaves_models_it_does_not_take_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from she.models.decode_step import LeanDecoder, lean_decoding, unsupported_reason

    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu"))
    assert "silu" in unsupported_reason(gelu)
    adapted = _llama()
    adapted.model.layers[1].mlp.up_proj.forward = lambda x: x  # an adapter or hook replaced a projection
    assert "nn.Linear" in unsupported_reason(adapted)
    assert "LlamaForCausalLM" in unsupported_reason(torch.nn.Linear(2, 2))
    for model in (gelu, adapted):
        with lean_decoding(model):
            assert "forward" not in vars(model)
        with pytest.raises(ValueError, match="LeanDecoder"):
            LeanDecoder(model)


@needs_packed_ops
def test_fast_decoding_opens_the_lean_step_unless_switched_off(monkeypatch):
    model = _llama()
    with fast_decoding(model):
        assert getattr(vars(model).get("forward"), "_she_lean", False)
    assert "forward" not in vars(model)
    with fast_decoding(model, pack=False):  # the lean step packs weights: only where the caller packs
        assert "forward" not in vars(model)
    monkeypatch.setenv("SHE_DECODE_STEP", "transformers")
    with fast_decoding(model):
        assert "forward" not in vars(model)
        assert model.config._attn_implementation == DECODE_ATTENTION  # points 4-6 stay
    monkeypatch.setenv("SHE_DECODE_STEP", "fused")
    with pytest.raises(UserError, match="SHE_DECODE_STEP"):
        with fast_decoding(model):
            pass


@needs_packed_ops
def test_lean_step_calls_the_heads_hooks_and_leaves_other_hooks_to_the_model(monkeypatch):
    """she.models.heads.capture_head_inputs hooks the LM head (the evaluation reads the verdict from it): the lean
    step calls the head module then, once a token, with the state transformers' forward hands it; a hook anywhere
    else sends the step to the model's own forward."""
    from she.models import decode_step
    from she.models.decode_step import lean_decoding
    from she.models.heads import capture_head_inputs

    model = _llama()
    ids, mask = _batch()
    steps = []
    real = decode_step.LeanDecoder.step
    monkeypatch.setattr(decode_step.LeanDecoder, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with packed_linears(model, True), capture_head_inputs(model) as plain_hidden:
            plain = _greedy(model, ids, mask)
        with packed_linears(model, True), lean_decoding(model), capture_head_inputs(model) as hidden:
            ours = _greedy(model, ids, mask)
        assert len(steps) == 7 and len(hidden) == len(plain_hidden) == 8
        torch.testing.assert_close(hidden[0], plain_hidden[0], atol=0, rtol=0)  # the prompt: the model's forward
        assert torch.equal(ours.sequences[:, :10], plain.sequences[:, :10])  # the first new token: the same input
        torch.testing.assert_close(hidden[1], plain_hidden[1], atol=0.05, rtol=0.05)  # to the first lean step
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
        del steps[:]
        with lean_decoding(model):
            _greedy(model, ids, mask, n=3)
        handle.remove()
        assert steps == []
    assert _same_until_near_ties(plain, ours, atol=0.05) >= 20
