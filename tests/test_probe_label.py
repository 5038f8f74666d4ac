"""scripts/probe_label.py: the pooled features by hand, batched extraction equal to one pair at a time (padding
and length-sorting change nothing), and prompts that end where the label-only SFT's completion starts."""

import pytest

from she.data.schema import Product, Record


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("probe_label")


def test_pooled_features_by_hand(probe):
    import torch

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]],
                           [[5.0, 0.0], [7.0, 2.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    f = probe.pooled_features(hidden, mask)
    # row 0: last real token is position 1 -> (3, 4); mean over 2 tokens -> (2, 3); the padded (9, 9) is ignored
    # row 1: last token (1, 1); mean of all three -> (13/3, 1)
    assert f.flatten().tolist() == pytest.approx([3.0, 4.0, 2.0, 3.0, 1.0, 1.0, 13 / 3, 1.0])
    assert f.dtype == torch.float32


def _records():
    words = ["drill", "cordless drill 18 volt", "white paint", "copper pipe 1/2 in", "lamp"]
    return [Record(id=str(i), query=q, product=Product(title=f"{q} {'x' * i} product"), label="Exact")
            for i, q in enumerate(words)]


def test_prompts_end_at_the_assistant_turn(probe, tiny_model_dir):
    from she.models.registry import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(tiny_model_dir)
    texts = probe.prompt_texts(_records(), tok)
    assert all("Query: " in t and "Verdict" not in t.split("Query: ")[1] for t in texts)
    full = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "A"}],
        tokenize=False)
    head = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                   tokenize=False, add_generation_prompt=True)
    assert full.startswith(head)  # the probe reads exactly the tokens before the completion


def test_batched_extraction_equals_one_at_a_time(probe, tiny_model_dir):
    import numpy as np
    import torch

    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32)
    model.eval()
    texts = probe.prompt_texts(_records(), tok)
    batched = probe.extract(model, tok, texts, layers=[-1, 0], batch_size=3)
    single = np.concatenate([probe.extract(model, tok, [t], layers=[-1, 0], batch_size=1) for t in texts])
    assert batched.shape == (len(texts), 4 * model.config.hidden_size)
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # different pairs, different features
