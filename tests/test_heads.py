"""she.models.heads: label logits re-read in float32 under bf16 autocast, and the generate-time capture that
lines each generated token's hidden state up with its scores."""

from __future__ import annotations

import pytest
import torch

from she.models.heads import capture_head_inputs, head_logits_fp32, plain_head, selected_logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    model.eval()
    return model, tok


def _batch(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_head_logits_fp32_is_the_linear_map_by_hand():
    head = torch.nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]))
        head.bias.copy_(torch.tensor([0.25, -0.5]))
    h = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_logits_fp32(head, h)
    assert out.dtype == torch.float32
    assert out.tolist() == [[6.25, -1.0], [-0.75, -2.5]]


def test_plain_head_refuses_scaled_logits(tiny):
    model, _ = tiny
    assert plain_head(model) is model.get_output_embeddings()

    class Scaled:
        config = type("C", (), {"logit_scale": 0.5})()

        def get_output_embeddings(self):
            return model.get_output_embeddings()

    assert plain_head(Scaled()) is None


def test_selected_logits_fp32_under_bf16_autocast(tiny):
    model, tok = tiny
    ids, mask = _batch(tok, ["a red drill", "blue hose for garden"])
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([ids.shape[1] - 1, ids.shape[1] - 1, ids.shape[1] - 2])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = selected_logits(model, ids, mask, rows, cols)
            high = selected_logits(model, ids, mask, rows, cols, head_fp32=True)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
        want = torch.nn.functional.linear(hidden.float(), model.get_output_embeddings().weight.float())
    assert torch.equal(low, low.bfloat16().float())  # the ambient head: every logit a bf16 value
    assert not torch.equal(high, high.bfloat16().float())  # the fp32 head keeps the bits bf16 drops
    assert torch.allclose(high, want, atol=1e-5)
    assert torch.allclose(low, high, atol=0.1 * high.abs().max().item())  # the same logits, to bf16 precision


@pytest.mark.parametrize("bf16", [False, True])
def test_capture_lines_up_with_generate_scores(tiny, bf16):
    model, tok = tiny
    ids, mask = _batch(tok, ["a red drill", "blue hose for the garden"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            capture_head_inputs(model) as hidden:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    assert hidden is not None and len(hidden) == len(out.logits) == out.sequences.shape[1] - ids.shape[1]
    head = plain_head(model)
    for k, logits in enumerate(out.logits):
        mine = head_logits_fp32(head, hidden[k])
        assert mine.shape == logits.shape
        if bf16:  # the generated logits are the bf16 rounding of the fp32 re-read
            assert torch.allclose(mine, logits.float(), atol=0.02 * mine.abs().max().item() + 1e-3)
        else:
            assert torch.allclose(mine, logits.float(), atol=1e-5)
            assert torch.equal(mine.argmax(-1), out.sequences[:, ids.shape[1] + k])
    with capture_head_inputs(model) as again:
        pass
    assert again == [] and not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed


def test_generate_judgements_keeps_the_verdict_hidden_state(tiny):
    """``keep_hidden``: the state kept is the one the verdict probabilities were read from (re-applying the head
    to it gives them back), one per judged pair; without the flag nothing is kept."""
    from she.data.schema import Product, Record
    from she.evaluation.generate import generate_judgements, label_first_tokens
    from she.reasoning.schema import resolve_schema

    model, tok = tiny
    schema = resolve_schema("default", "hd3")
    labels = ["Irrelevant", "Partial", "Exact"]
    script = tok.encode("Verdict: Exact", add_special_tokens=False) + [tok.eos_token_id]
    recs = [Record(id=str(i), query=q, product=Product(title=t), label="Exact")
            for i, (q, t) in enumerate([("red drill", "red cordless drill"), ("garden hose", "blue hose 50 ft")])]
    calls = []

    def scripted(_m, _args, logits):  # force the scripted trace: head call k (generated token k) puts script[k] on top
        logits = logits.clone()
        logits[..., script[min(len(calls), len(script) - 1)]] += 1e4
        calls.append(1)
        return logits

    handle = model.get_output_embeddings().register_forward_hook(scripted)
    try:
        kept = generate_judgements(model, tok, recs, taxonomy="hd3", max_new_tokens=len(script) + 1, bf16=False,
                                   progress=False, schema=schema, prompt_style="compact", keep_hidden=True)
        calls.clear()
        plain = generate_judgements(model, tok, recs, taxonomy="hd3", max_new_tokens=len(script) + 1, bf16=False,
                                    progress=False, schema=schema, prompt_style="compact")
    finally:
        handle.remove()
    ids = label_first_tokens(tok, labels)[True]
    for j, p in zip(kept, plain):
        assert j.raw_label == "Exact" and j.probs is not None and j.verdict_hidden is not None
        assert len(j.verdict_hidden) == model.config.hidden_size
        logits = head_logits_fp32(plain_head(model), torch.tensor([j.verdict_hidden]))[0]
        again = torch.softmax(logits[ids], -1).tolist()
        assert again == pytest.approx([j.probs[c] for c in labels], abs=1e-5)
        assert p.verdict_hidden is None and p.probs == pytest.approx(j.probs)
    assert kept[0].verdict_hidden != kept[1].verdict_hidden  # each pair its own state
