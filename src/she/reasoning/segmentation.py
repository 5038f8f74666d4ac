"""Map reasoning-step character spans onto the policy's own generated tokens.

The reasoning parser finds steps in the completion *text* and reports them as character spans. Step
rewards must land on the *tokens the policy generated* (their log-probs are what the RL loss scales), so
we need, for each generated token, which characters of the decoded text it produced:

* We never re-tokenise the text: ``encode(decode(ids))`` is often not ``ids`` (a model can emit a
  non-canonical tokenisation), and then positions would silently shift.
* We never use another model's (e.g. a judge's) tokenizer for the same reason.

``token_char_offsets`` decodes the generated ids incrementally and measures how the text grows. Byte-level
tokenizers can split one character over several tokens (an emoji is 4 UTF-8 bytes); while a character is
incomplete the decoder shows U+FFFD. Such a character is attributed to the token that *completes* it; the
tokens before get an empty span at that position. Text before a trailing incomplete character is
attributed as soon as it is stable. Decoding is done with a short sliding window (O(T) overall); the
result is checked against ``tokenizer.decode(ids)`` and, if a tokenizer's decoder does not behave locally,
recomputed with full-prefix decodes (O(T^2) but always consistent).

``char_spans_to_token_steps`` then assigns each token the span it overlaps most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
Offsets = list[tuple[int, int]]


def _strip_incomplete(text: str) -> str:
    """Drop trailing U+FFFD: an incomplete multi-byte character that a later token may complete."""
    return text.rstrip(REPLACEMENT)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _offsets_full_prefix(decode, ids: Sequence[int]) -> tuple[str, Offsets]:
    """Reference algorithm: decode ids[:i+1] for every i. O(T^2) decoding work, but no locality assumption.

    Per token, compare the stable decoded prefix with the text attributed so far:

    * it extends it: the token gets the new characters;
    * it is a prefix of it: a temporary retraction -- byte-fallback decoders (Llama, Gemma) turn a whole
      run of byte tokens into U+FFFD while the last character of the run is incomplete, hiding characters
      already shown -- so the token gets an empty span and the attributed text is kept;
    * neither (a decoder that rewrites earlier text, e.g. ``clean_up_tokenization_spaces`` turning "a ."
      into "a."): earlier spans are clipped to the common prefix and the token gets the rest.

    The last token takes the full decode as is (trailing U+FFFD included), so the text is exactly
    ``decode(ids)`` and the spans are contiguous over it.
    """
    offsets: Offsets = []
    prev = ""
    n = len(ids)
    for i in range(n):
        last = i == n - 1
        cur = decode(ids[: i + 1])
        stable = cur if last else _strip_incomplete(cur)
        if stable.startswith(prev):
            offsets.append((len(prev), len(stable)))
            prev = stable
        elif prev.startswith(stable) and not last:
            offsets.append((len(prev), len(prev)))
        else:
            c = _common_prefix_len(prev, stable)
            offsets = [(min(a, c), min(b, c)) for a, b in offsets]
            offsets.append((c, len(stable)))
            prev = stable
    return prev, offsets


class _NotLocal(Exception):
    """The decoder's output inside a window is not consistent with the text attributed before."""


def _offsets_window(decode, ids: Sequence[int], context: int = 2) -> tuple[str, Offsets]:
    """Sliding-window version of ``_offsets_full_prefix`` (the scheme vLLM/TGI use for streaming).

    The same per-token rule, applied to ``decode(ids[start:i+1])`` instead of ``decode(ids[:i+1])``;
    ``wprev`` is the part of the window's text already attributed. ``start`` always sits where a character
    begins, ``context`` completed tokens behind the newest one: decoding with a little left context, and
    comparing two decodes with the *same* start, keeps decoders that treat the first token of a sequence
    specially (SentencePiece strips its leading space) consistent. Raises ``_NotLocal`` whenever the window
    disagrees with what was attributed; the caller then falls back to the full-prefix algorithm.
    """
    offsets: Offsets = []
    text = ""  # attributed so far, over the whole sequence
    start = 0  # window start: a token index where a character begins
    wprev = ""  # attributed part of the window's decoded text
    boundaries: list[int] = []  # token indices after which the decoded text was complete
    n = len(ids)
    for i in range(n):
        last = i == n - 1
        cur = decode(ids[start : i + 1])
        stable = cur if last else _strip_incomplete(cur)
        extended = stable.startswith(wprev)
        if extended:
            delta = stable[len(wprev) :]
            offsets.append((len(text), len(text) + len(delta)))
            text += delta
            wprev = stable
        elif wprev.startswith(stable) and not last:
            offsets.append((len(text), len(text)))
        else:
            raise _NotLocal
        if extended and stable == cur and not last:  # nothing pending: token i + 1 starts a new character
            boundaries.append(i + 1)
            if len(boundaries) > context:
                new_start = boundaries.pop(0)
                if new_start > start:
                    start = new_start
                    wprev = decode(ids[start : i + 1])
                    if not text.endswith(wprev):
                        raise _NotLocal
    return text, offsets


def token_char_offsets(tokenizer: Any, ids: Sequence[int], **decode_kwargs: Any) -> tuple[str, Offsets]:
    """Decode ``ids`` and return ``(text, offsets)``; ``offsets[i]`` is the char range token i produced.

    ``text == tokenizer.decode(ids, **decode_kwargs)`` always. The offsets are contiguous
    (``offsets[0][0] == 0``, ``offsets[i][1] == offsets[i+1][0]``, last end == ``len(text)``); a token that
    produces no characters of its own (the first bytes of a multi-byte character, or a special token
    skipped with ``skip_special_tokens=True``) gets an empty span ``(p, p)``.
    """
    ids = [int(t) for t in ids]

    def decode(x: Sequence[int]) -> str:
        return tokenizer.decode(list(x), **decode_kwargs) if x else ""

    full = decode(ids)
    try:
        text, offsets = _offsets_window(decode, ids)
        if text == full:
            return text, offsets
    except _NotLocal:
        pass
    text, offsets = _offsets_full_prefix(decode, ids)
    if text != full:  # cannot happen: the last step decodes ids[:n] itself
        raise RuntimeError("incremental decoding did not reproduce tokenizer.decode(ids)")
    return text, offsets


def char_spans_to_token_steps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the span it overlaps most; ties go to the earlier span; -1 for none.

    A token with an empty span at position p (it holds the first bytes of the character at p, which a later
    token completes) belongs to the span that contains character p, so every byte of a character inside a
    step gets that step's credit. Spans must be non-overlapping, sorted, ``0 <= start <= end``, and inside
    the text (``end <= offsets[-1][1]``); anything else is a parser bug and raises ValueError.
    """
    text_len = offsets[-1][1] if offsets else 0
    prev_end = 0
    for k, (s, e) in enumerate(spans):
        if not (0 <= s <= e):
            raise ValueError(f"span {k} = ({s}, {e}) is not a valid character range")
        if s < prev_end:
            raise ValueError(f"span {k} = ({s}, {e}) overlaps or precedes the previous span (ends at {prev_end})")
        if e > text_len:
            raise ValueError(f"span {k} = ({s}, {e}) ends beyond the decoded text (length {text_len})")
        prev_end = e
    out: list[int] = []
    for a, b in offsets:
        best, best_overlap = -1, 0
        for k, (s, e) in enumerate(spans):
            if a == b:
                if s <= a < e:
                    best = k
                    break
                continue
            overlap = min(b, e) - max(a, s)
            if overlap > best_overlap:  # strict: ties keep the earlier span
                best, best_overlap = k, overlap
        out.append(best)
    return out


def token_steps_for_completion(
    tokenizer: Any,
    ids: Sequence[int],
    parsed_spans: Sequence[tuple[int, int]],
    text: str | None = None,
    **decode_kwargs: Any,
) -> list[int]:
    """Step index of every generated token (-1 outside steps), from the parser's character spans.

    ``parsed_spans`` are positions in ``tokenizer.decode(ids, **decode_kwargs)``. Pass the ``text`` the parser
    actually saw to have that checked: if it differs (e.g. it was decoded with other settings), positions
    would be meaningless, so a ValueError is raised instead of guessing.
    """
    decoded, offsets = token_char_offsets(tokenizer, ids, **decode_kwargs)
    if text is not None and text != decoded:
        c = _common_prefix_len(text, decoded)
        raise ValueError(
            f"the parsed text differs from the decoded completion at character {c}: "
            f"parsed {text[c : c + 20]!r} vs decoded {decoded[c : c + 20]!r} (decode settings: {decode_kwargs})"
        )
    return char_spans_to_token_steps(offsets, parsed_spans)


__all__ = ["token_char_offsets", "char_spans_to_token_steps", "token_steps_for_completion"]
