"""she.models.greedy: greedy decoding with a shared prompt prefix and ended rows retired, against model.generate."""

from __future__ import annotations

import pytest
import torch

from she.errors import UserError
from she.models.generation import fast_decoding
from she.models.greedy import GreedyOutput, common_prefix_length, greedy_generate, loop_unsupported, resolve_engine


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _prompts(seed: int = 0, shared: int = 6, lengths=(3, 7, 1, 5, 4)):
    """Prompts that open with the same ``shared`` tokens, then rows of their own (of ``lengths`` tokens)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 97, (shared,), generator=g).tolist()
    return [head + torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def _run(model, prompts, n=8, eos=1, **kw):
    with torch.no_grad():
        return greedy_generate(model, prompts, max_new_tokens=n, eos_token_id=eos, pad_token_id=0, output_scores=True,
                               **kw)


def _agree(a: GreedyOutput, b: GreedyOutput, atol: float = 1e-5) -> int:
    """Every row's tokens the same in both, and its scores at every step it ran in both within ``atol``. Returns the
    number of (row, step) pairs compared."""
    assert a.tokens == b.tokens
    compared = 0
    for row, toks in enumerate(a.tokens):
        for k in range(len(toks)):
            x, y = a.scores[k][a.batch_row(k, row)], b.scores[k][b.batch_row(k, row)]
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
            compared += 1
    return compared


def test_left_pad_by_hand():
    from she.models.generation import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_common_prefix_length_by_hand():
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2


def _eos_at_different_steps(model, prompts, n):
    """A token that ends some rows at different steps (greedy tokens of a random model repeat often)."""
    free = _run(model, prompts, n=n, eos=96, engine="she", retire_fraction=None)
    first = {}
    for row, toks in enumerate(free.tokens):
        for k, t in enumerate(toks):
            first.setdefault(t, {}).setdefault(row, k)
    best = max(first, key=lambda t: (len(set(first[t].values())), -len(first[t])))
    assert len(set(first[best].values())) >= 2, "the test's model ends no two rows at different steps"
    return best


@pytest.mark.parametrize("shared", [0, 1, 6])
@pytest.mark.parametrize("retire", [None, 0.0, 0.5])
def test_loop_generates_what_generate_does(shared, retire):
    """Greedy tokens and every step's float32 logits as model.generate's on left-padded rows (fp32: only the rounding
    of other matmul shapes differs), whatever is shared or retired."""
    model = _llama(seed=3)
    prompts = _prompts(seed=3, shared=shared, lengths=(3, 7, 1, 5, 4, 2, 6, 3))
    eos = _eos_at_different_steps(model, prompts, 10)  # rows end at different steps: retirement happens
    ref = _run(model, prompts, n=10, eos=eos, engine="generate")
    assert ref.engine == "generate" and ref.prefix_tokens == 0
    ours = _run(model, prompts, n=10, eos=eos, engine="she", retire_fraction=retire)
    assert ours.engine == "she" and ours.prefix_tokens == (shared if shared else 0)
    assert _agree(ref, ours) == sum(len(t) for t in ref.tokens)
    if retire == 0.0:
        assert len(ours.step_rows[-1]) < len(prompts)


def test_shared_prefix_is_run_once_and_leaves_each_row_a_token():
    model = _llama()
    prompts = _prompts(shared=6, lengths=(3, 0, 2))  # the second row is the prefix itself
    seen = []
    handle = model.base_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        out = _run(model, prompts, n=2, engine="she")
    finally:
        handle.remove()
    # the prefix once for one row (up to the shortest row's last token), then each row's own tokens, then a step
    assert seen[:2] == [(1, 5), (3, 4)] and out.prefix_tokens == 5
    assert seen[2:] == [(3, 1)]
    assert _agree(_run(model, prompts, n=2, engine="generate"), out) == 6
    solo = _run(model, prompts[:1], n=2, engine="she")
    assert solo.prefix_tokens == 0  # one row: nothing to share


def test_retired_rows_leave_the_batch_and_keep_their_states():
    """Rows that ended leave the batch; each generated position's head input and logits are the same as without
    retirement, found through ``batch_row``."""
    from she.models.heads import capture_head_inputs

    model = _llama(seed=3)
    prompts = _prompts(seed=3, lengths=(3, 7, 1, 5, 4, 2, 6, 3))
    eos = _eos_at_different_steps(model, prompts, 10)
    runs = {}
    for retire in (None, 0.0):
        with capture_head_inputs(model) as hidden:
            out = _run(model, prompts, n=10, eos=eos, engine="she", retire_fraction=retire)
        runs[retire] = out, hidden
    (kept, h_kept), (gone, h_gone) = runs[None], runs[0.0]
    assert all(len(r) == len(prompts) for r in kept.step_rows)
    assert len(gone.step_rows[-1]) < len(prompts)  # rows left
    assert [len(r) for r in gone.step_rows] == sorted((len(r) for r in gone.step_rows), reverse=True)
    assert any(t[-1] == eos for t in gone.tokens) and any(t[-1] != eos for t in gone.tokens)
    _agree(kept, gone)
    for row, toks in enumerate(gone.tokens):
        for k in range(len(toks)):
            assert int(gone.step_rows[k][gone.batch_row(k, row)]) == row
            torch.testing.assert_close(h_gone[k][gone.batch_row(k, row)], h_kept[k][row], atol=1e-5, rtol=0)
    for toks in gone.tokens:  # an ended row stops at its end of sequence
        assert eos not in toks[:-1]


def test_fast_decoding_in_bf16_agrees_with_generate():
    """Under bf16 autocast with fast_decoding's lean step (which the loop's one-token calls reach): the same tokens as
    model.generate's but where a near tie parts them, scores within bf16 rounding."""
    from she.models.decode_step import LeanDecoder, unsupported_reason

    model = _llama(seed=1)
    prompts = _prompts(seed=1)
    assert unsupported_reason(model) is None
    steps = []
    real = LeanDecoder.step
    LeanDecoder.step = lambda self, ids, *a, **k: steps.append(ids.size(0)) or real(self, ids, *a, **k)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), fast_decoding(model):
            ref = _run(model, prompts, engine="generate")
            ours = _run(model, prompts, engine="she", retire_fraction=0.0)
    finally:
        LeanDecoder.step = real
    assert len(steps) == 2 * 7  # every one-token step of both runs went to the lean step
    compared = 0
    for row, toks in enumerate(ref.tokens):
        for k, t in enumerate(toks):
            x, y = ref.scores[k][row], ours.scores[k][ours.batch_row(k, row)]
            torch.testing.assert_close(x, y, atol=0.05, rtol=0)
            compared += 1
            if k >= len(ours.tokens[row]) or ours.tokens[row][k] != t:
                top2 = x.topk(2).values
                assert top2[0] - top2[1] <= 0.1, (row, k, top2)
                break
    assert compared >= len(prompts) * 8 // 2


def test_engine_switch_and_fallbacks(monkeypatch):
    model = _llama()
    prompts = _prompts()
    assert resolve_engine() == "she" and loop_unsupported(model) is None
    monkeypatch.setenv("SHE_GREEDY", "generate")
    assert resolve_engine() == "generate" and _run(model, prompts, n=2).engine == "generate"
    assert resolve_engine("she") == "she"
    monkeypatch.setenv("SHE_GREEDY", "fast")
    with pytest.raises(UserError, match="SHE_GREEDY"):
        resolve_engine()
    monkeypatch.delenv("SHE_GREEDY")
    with pytest.raises(ValueError, match="engine"):
        resolve_engine("beam")
    model.config.sliding_window = 4  # a window over cache slots, padding included
    assert "SlidingWindow" in loop_unsupported(model)
    model.config.sliding_window = None
    model.generation_config.repetition_penalty = 1.3  # a logits processor the loop does not apply
    assert "repetition_penalty" in loop_unsupported(model)
    out = _run(model, prompts, n=3, engine="she")
    assert out.engine == "generate"


def test_models_whose_decoder_holds_the_head_take_generate():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "output head" in loop_unsupported(model)
    assert _run(model, _prompts(), n=2, engine="she").engine == "generate"


def test_a_decoder_that_ignores_the_cache_takes_generate():
    model = _llama()
    own = model.base_model.forward
    model.base_model.forward = lambda *a, cache=None, **k: own(*a, **k)  # drops the cache it is handed
    try:
        out = _run(model, _prompts(), n=3, engine="she")
    finally:
        del model.base_model.forward
    assert out.engine == "generate"


def test_judgements_read_each_rows_verdict_when_rows_end_apart(tiny, monkeypatch):
    """generate_judgements through the loop with rows retired: the head is scripted row by row (pairs whose prompt has
    an even number of tokens write a short trace, odd ones a longer one), so rows end at different steps; each pair's
    label, verdict probabilities and verdict state are the ones model.generate gives."""
    import she.evaluation.generate as gen_mod
    from she.data.schema import Product, Record
    from she.reasoning.schema import resolve_schema

    model, tok = tiny
    schema = resolve_schema("default", "hd3")
    eos = tok.eos_token_id
    short = tok.encode("Verdict: Exact", add_special_tokens=False) + [eos]
    long = tok.encode("\nType: related\nVerdict: Partial", add_special_tokens=False) + [eos]
    assert all(a != b for a, b in zip(short, long)) and len(long) > len(short)  # a step's token names its script
    state = {}

    def inputs(_m, _args, kw):  # the call's ids and mask, and the step (0: the prompt's pass), for the head's script
        state["ids"], state["mask"] = kw["input_ids"], kw.get("attention_mask")
        state["k"] = 0 if kw["input_ids"].size(1) > 1 else state["k"] + 1

    def scripted(_m, _args, logits):
        logits = logits.clone()
        ids, k = state["ids"], state["k"]
        for r in range(logits.size(0)):
            if k == 0:  # the script by the parity of the row's prompt length
                script = short if int(state["mask"][r].sum()) % 2 == 0 else long
            else:  # the script whose previous token the row fed (none: an ended row)
                script = next((sc for sc in (short, long) if k < len(sc) and int(ids[r, -1]) == sc[k - 1]), None)
                if script is None:
                    continue
            logits[r, -1, script[k]] += 1e4
        return logits

    records = [Record(id=str(i), query=q, product=Product(title=t), label="Exact") for i, (q, t) in enumerate(
        [("red drill", "red cordless drill 18 v"), ("garden hose", "blue hose 50 ft"), ("lamp", "desk lamp"),
         ("white paint for walls", "white interior paint 1 gal"), ("saw", "circular saw blade 7 in"),
         ("hammer", "claw hammer 16 oz fiberglass handle")])]
    outs = []
    real_greedy = gen_mod.greedy_generate
    monkeypatch.setattr(gen_mod, "greedy_generate", lambda *a, **k: outs.append(real_greedy(*a, **k)) or outs[-1])
    h1 = model.register_forward_pre_hook(inputs, with_kwargs=True)
    h2 = model.get_output_embeddings().register_forward_hook(scripted)
    runs = {}
    try:
        for engine in ("generate", "she"):
            monkeypatch.setenv("SHE_GREEDY", engine)
            runs[engine] = gen_mod.generate_judgements(
                model, tok, records, taxonomy="hd3", batch_size=len(records), max_new_tokens=len(long) + 2,
                bf16=False, progress=False, schema=schema, prompt_style="compact", keep_hidden=True)
    finally:
        h1.remove()
        h2.remove()
    assert outs[1].engine == "she" and len(outs[1].step_rows[-1]) < len(records)  # rows were retired
    labels = [j.raw_label for j in runs["she"]]
    assert {"Exact", "Partial"} == set(labels)
    for a, b in zip(runs["generate"], runs["she"]):
        assert a.raw_label == b.raw_label and a.text == b.text and a.n_new_tokens == b.n_new_tokens
        assert b.probs is not None and b.probs == pytest.approx(a.probs, abs=1e-5)
        assert b.verdict_hidden == pytest.approx(a.verdict_hidden, abs=1e-5)
    assert len({tuple(j.verdict_hidden) for j in runs["she"]}) == len(records)


def test_bad_arguments_are_errors():
    model = _llama()
    with pytest.raises(ValueError, match="non-empty"):
        _run(model, [])
    with pytest.raises(ValueError, match="non-empty"):
        _run(model, [[3, 4], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        _run(model, [[3, 4]], n=0)
