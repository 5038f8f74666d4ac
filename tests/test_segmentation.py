"""Tests for she.reasoning.segmentation with real tokenizers built offline in the test.

* a GPT-2 style byte-level BPE (splits emoji/CJK into byte tokens), trained here with `tokenizers`;
* a Llama/SentencePiece style BPE with byte fallback and a decoder that strips the leading space of a
  sequence (the classic trap for incremental detokenisation);
* SmolLM2's tokenizer when ~/.cache/she/models/smollm2-135m exists (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from she.reasoning.segmentation import (  # noqa: E402
    _NotLocal,
    _offsets_full_prefix,
    _offsets_window,
    char_spans_to_token_steps,
    token_char_offsets,
    token_steps_for_completion,
)

CORPUS = [
    "Step 1: the query asks for a cordless drill.",
    "Step 2: brand match, DeWalt is the brand searched.",
    "Product: DeWalt 20V drill, colour black. Label: Exact",
    "Café crème brûlée, naïve façade, 日本語のテキスト 🙂",
] * 5

TEXTS = [
    "Step 1: the query asks for a cordless drill.\nStep 2: colour mismatch.\nLabel: Partial",
    "Café 🙂 crème 日本語 façade — naïve 北京 👍🏽 end",  # 北京 and 👍🏽 never seen in training
    "  double  spaces\n\nand tabs\tand newlines\n",
    "🙂🙂🙂",
    "x",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def bytelevel_tok():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def spm_tok():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens, as in Llama / Gemma vocabularies
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


SMOLLM = Path.home() / ".cache" / "she" / "models" / "smollm2-135m"


@pytest.fixture(scope="module")
def smollm_tok():
    if not SMOLLM.is_dir():
        pytest.skip(f"{SMOLLM} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM))


def check_offsets(text: str, offsets, n: int) -> None:
    assert len(offsets) == n
    pos = 0
    for a, b in offsets:
        assert a == pos and b >= a, f"offsets not contiguous at {(a, b)}, expected start {pos}"
        pos = b
    assert pos == len(text)


def roundtrip(tok, ids, **kw):
    text, offsets = token_char_offsets(tok, ids, **kw)
    assert text == tok.decode(ids, **kw)
    check_offsets(text, offsets, len(ids))
    # the fast sliding-window path and the full-prefix reference must agree token by token
    dec = lambda x: tok.decode(list(x), **kw) if len(x) else ""  # noqa: E731
    assert _offsets_window(dec, ids) == _offsets_full_prefix(dec, ids) == (text, offsets)
    return text, offsets


# ---------------------------------------------------------------- token_char_offsets


@pytest.mark.parametrize("which", ["bytelevel_tok", "spm_tok"])
@pytest.mark.parametrize("text", TEXTS)
def test_offsets_cover_decoded_text(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_special_tokens=False)
    out, offsets = roundtrip(tok, ids)
    assert out == text  # these tokenizers round-trip these texts exactly
    # every token that completes a character gets at least that character; empty spans only for
    # tokens whose decoded prefix ends in an incomplete character (or the SPM leading "▁", which decodes to "")
    for i, (a, b) in enumerate(offsets):
        if a == b:
            prefix = tok.decode(ids[: i + 1])
            assert prefix.endswith("\ufffd") or prefix == ""


def test_multibyte_character_goes_to_the_completing_token(bytelevel_tok):
    # "ok" + the four byte tokens of 🙂 (F0 9F 99 82) + "go": built by hand, not by encode.
    b2u = bytes_to_unicode()
    byte_ids = [bytelevel_tok.convert_tokens_to_ids(b2u[b]) for b in "🙂".encode()]
    enc = lambda s: bytelevel_tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids = enc("ok") + byte_ids + enc("go")
    text, offsets = roundtrip(bytelevel_tok, ids)
    assert text == "ok🙂go"  # 🙂 is one Python character
    k = len(enc("ok"))
    assert offsets[k : k + 4] == [(2, 2), (2, 2), (2, 2), (2, 3)]


def test_non_canonical_tokenisation_is_not_retokenised(bytelevel_tok):
    # The policy may emit "drill" letter by letter although encode() would give fewer tokens.
    b2u = bytes_to_unicode()
    ids = [bytelevel_tok.convert_tokens_to_ids(b2u[b]) for b in b"drill"]
    assert ids != bytelevel_tok.encode("drill", add_special_tokens=False)
    _, offsets = roundtrip(bytelevel_tok, ids)
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_generation_cut_mid_character_and_invalid_bytes(bytelevel_tok):
    b2u = bytes_to_unicode()
    bid = lambda bs: [bytelevel_tok.convert_tokens_to_ids(b2u[b]) for b in bs]  # noqa: E731
    # cut after 2 of the 4 bytes of 🙂: decode ends in U+FFFD, which the last token gets
    ids = bid(b"ab") + bid("🙂".encode()[:2])
    text, offsets = roundtrip(bytelevel_tok, ids)
    assert text.startswith("ab\ufffd")
    assert offsets[:3] == [(0, 1), (1, 2), (2, 2)] and offsets[3] == (2, len(text))
    # a lone continuation byte in the middle: its U+FFFD is attributed together with the next character
    ids = bid(b"a") + bid(b"\x80") + bid(b"b")
    text, offsets = roundtrip(bytelevel_tok, ids)
    assert text == "a\ufffdb" and offsets == [(0, 1), (1, 1), (1, 3)]


def test_special_tokens(bytelevel_tok):
    ids = bytelevel_tok.encode("Label: Exact", add_special_tokens=False) + [bytelevel_tok.eos_token_id]
    text, offsets = roundtrip(bytelevel_tok, ids)
    assert text.endswith("<eos>") and offsets[-1] == (len(text) - 5, len(text))
    text, offsets = roundtrip(bytelevel_tok, ids, skip_special_tokens=True)
    assert text == "Label: Exact" and offsets[-1] == (len(text), len(text))


def test_spm_leading_space_does_not_shift_offsets(spm_tok):
    # The decoder strips the first "▁" of a sequence; decoding windows that start mid-sequence would
    # lose a space per window if the window difference were not taken with a common start.
    ids = spm_tok.encode("the drill the drill the drill", add_special_tokens=False)
    text, offsets = roundtrip(spm_tok, ids)
    assert text == "the drill the drill the drill"
    pieces = [text[a:b] for a, b in offsets]
    assert "".join(pieces) == text and pieces[0] == ""  # the lone leading "▁" decodes to nothing


def test_byte_fallback_retraction_keeps_characters_on_their_tokens(spm_tok):
    # 北京 is unseen, so it is 6 byte-fallback tokens E5 8C 97 E4 BA AC. While 京 is incomplete the
    # ByteFallback decoder shows the whole byte run as U+FFFD -- 北 "disappears" again. 北 must stay on
    # its completing token (the 3rd) and 京 go to the 6th, not both to the 6th.
    ids = spm_tok.encode("a 北京", add_special_tokens=False)
    toks = spm_tok.convert_ids_to_tokens(ids)
    assert toks[-6:] == ["<0xE5>", "<0x8C>", "<0x97>", "<0xE4>", "<0xBA>", "<0xAC>"]
    assert "\ufffd" in spm_tok.decode(ids[:-1]) and "北" not in spm_tok.decode(ids[:-1])  # the retraction
    text, offsets = roundtrip(spm_tok, ids)
    p = text.index("北")
    assert offsets[-6:] == [(p, p), (p, p), (p, p + 1), (p + 1, p + 1), (p + 1, p + 1), (p + 1, p + 2)]


def test_decoder_that_rewrites_earlier_text_falls_back_cleanly(bytelevel_tok):
    # A decoder that removes the space before punctuation once the punctuation arrives (what the old
    # clean_up_tokenization_spaces did): the decoded prefix is not monotone, the window path gives up and
    # the full-prefix path clips the earlier spans.
    class CleanUp:
        def decode(self, ids, **kw):
            return bytelevel_tok.decode(ids, **kw).replace(" .", ".").replace(" ?", "?")

    tok = CleanUp()
    ids = bytelevel_tok.encode("the drill . the query ?", add_special_tokens=False)
    text = tok.decode(ids)
    assert text == "the drill. the query?"
    dec = lambda x: tok.decode(list(x)) if len(x) else ""  # noqa: E731
    with pytest.raises(_NotLocal):
        _offsets_window(dec, ids)
    out, offsets = token_char_offsets(tok, ids)
    assert out == text
    check_offsets(text, offsets, len(ids))
    assert (out, offsets) == _offsets_full_prefix(dec, ids)
    # the token that produced " ." now carries just "." (its space was removed from the text)
    dot = [i for i, t in enumerate(bytelevel_tok.convert_ids_to_tokens(ids)) if "." in t][0]
    assert text[offsets[dot][0] : offsets[dot][1]] == "."


def test_decoding_work_is_linear(bytelevel_tok):
    class Counting:
        def __init__(self, tok):
            self.tok, self.calls, self.ids = tok, 0, 0

        def decode(self, ids, **kw):
            self.calls += 1
            self.ids += len(ids)
            return self.tok.decode(ids, **kw)

    ids = bytelevel_tok.encode(" ".join(TEXTS) * 3, add_special_tokens=False)
    assert len(ids) > 200
    c = Counting(bytelevel_tok)
    text, _ = token_char_offsets(c, ids)
    assert text == bytelevel_tok.decode(ids)
    # one full decode for the check, then ~2 short window decodes per token
    assert c.calls <= 2 * len(ids) + 2
    assert c.ids <= 2 * len(ids) + 12 * len(ids)


def test_empty_ids(bytelevel_tok):
    assert token_char_offsets(bytelevel_tok, []) == ("", [])


# ---------------------------------------------------------------- char_spans_to_token_steps


def test_span_assignment_hand():
    # tokens:  0:(0,3) 1:(3,5) 2:(5,5) 3:(5,6) 4:(6,10) 5:(10,11)
    # spans:   0:(0,4) 1:(5,10)
    #   t0 overlaps span0 by 3 -> 0;  t1 overlaps span0 by 1 (char 3), span1 by 0 -> 0
    #   t2 empty at 5: char 5 lies in span1 -> 1;  t3, t4 inside span1 -> 1;  t5 (char 10) in no span -> -1
    offsets = [(0, 3), (3, 5), (5, 5), (5, 6), (6, 10), (10, 11)]
    assert char_spans_to_token_steps(offsets, [(0, 4), (5, 10)]) == [0, 0, 1, 1, 1, -1]


def test_span_assignment_ties_and_majority():
    # (2,6) overlaps (0,4) by 2 and (4,8) by 2 -> tie -> earlier span 0
    assert char_spans_to_token_steps([(0, 2), (2, 6), (6, 8)], [(0, 4), (4, 8)]) == [0, 0, 1]
    # (3,7) overlaps (0,4) by 1 and (5,10) by 2 -> span 1
    assert char_spans_to_token_steps([(0, 3), (3, 7), (7, 10)], [(0, 4), (5, 10)]) == [0, 1, 1]
    # empty span at a span's end position belongs to the span that starts there, else none
    assert char_spans_to_token_steps([(0, 4), (4, 4), (4, 6)], [(0, 4)]) == [0, -1, -1]
    assert char_spans_to_token_steps([(0, 4), (4, 4), (4, 6)], [(0, 4), (4, 6)]) == [0, 1, 1]
    # no spans at all
    assert char_spans_to_token_steps([(0, 1), (1, 2)], []) == [-1, -1]


@pytest.mark.parametrize(
    "spans, match",
    [
        ([(0, 4), (3, 6)], "overlaps or precedes"),
        ([(0, 20)], "ends beyond the decoded text"),
        ([(3, 2)], "not a valid character range"),
        ([(-1, 2)], "not a valid character range"),
    ],
)
def test_bad_spans_raise(spans, match):
    with pytest.raises(ValueError, match=match):
        char_spans_to_token_steps([(0, 5), (5, 10)], spans)


# ---------------------------------------------------------------- end to end


def _spans_of(text: str, steps: list[str]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for s in steps:
        a = text.index(s, pos)
        out.append((a, a + len(s)))
        pos = a + len(s)
    return out


@pytest.mark.parametrize("which", ["bytelevel_tok", "spm_tok", "smollm_tok"])
def test_token_steps_for_completion(request, which):
    tok = request.getfixturevalue(which)
    steps = ["Type: same (cordless drill 🙂).", "Brand: match — DeWalt.", "Colour: 日本 mismatch."]
    text = "\n".join(steps) + "\nLabel: Partial"
    ids = tok.encode(text, add_special_tokens=False)
    spans = _spans_of(text, steps)
    decoded, offsets = token_char_offsets(tok, ids)
    assert decoded == text
    token_steps = token_steps_for_completion(tok, ids, spans, text=text)
    assert len(token_steps) == len(ids)
    for k, step in enumerate(steps):
        got = "".join(text[a:b] for (a, b), s in zip(offsets, token_steps) if s == k)
        # the step's tokens spell the step, give or take a boundary character (a token like "\nBrand")
        assert step.strip("\n") in got or got in step, (k, got)
        assert abs(len(got) - len(step)) <= 2
    # the label is in no step
    label_tokens = [s for (a, b), s in zip(offsets, token_steps) if a >= text.index("Label")]
    assert label_tokens and set(label_tokens) == {-1}
    # steps are in order along the sequence
    seen = [s for s in token_steps if s >= 0]
    assert seen == sorted(seen) and set(seen) == {0, 1, 2}


def test_text_mismatch_is_an_error(bytelevel_tok):
    ids = bytelevel_tok.encode("Label: Exact", add_special_tokens=False)
    with pytest.raises(ValueError, match="differs from the decoded completion at character 7"):
        token_steps_for_completion(bytelevel_tok, ids, [(0, 5)], text="Label: Partial")


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_offsets(smollm_tok, text):
    ids = smollm_tok.encode(text, add_special_tokens=False)
    out, _ = roundtrip(smollm_tok, ids)
    assert out == text
