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

    If a decoder rewrites earlier text when a token arrives (e.g. ``clean_up_tokenization_spaces`` turning
    "a ." into "a."), earlier spans are clipped to the part of the text that survived, so the offsets stay
    contiguous and cover exactly the final text.
    """
    offsets: Offsets = []
    prev = ""
    n = len(ids)
    for i in range(n):
        cur = decode(ids[: i + 1])
        stable = cur if i == n - 1 else _strip_incomplete(cur)
        if not stable.startswith(prev):
            c = _common_prefix_len(prev, stable)
            offsets = [(min(a, c), min(b, c)) for a, b in offsets]
            prev = prev[:c]
        if len(stable) < len(prev):  # only possible after clipping above; keep spans monotone
            stable = prev
        offsets.append((len(prev), len(stable)))
        prev = stable
    return prev, offsets


def _offsets_window(decode, ids: Sequence[int], context: int = 2) -> tuple[str, Offsets]:
    """Sliding-window incremental decoding (the scheme vLLM/TGI use for streaming detokenisation).

    ``start`` is a token index where a character begins; ``done`` is how many characters of
    ``decode(ids[start:i])`` have already been attributed. Decoding from ``start`` (a few tokens of context
    before the unattributed ones) rather than from the unattributed token itself keeps decoders that treat
    the first token specially (SentencePiece drops the leading space of a sequence) consistent: the
    difference between two decodes with the same start is what token i added.
    """
    offsets: Offsets = []
    pieces: list[str] = []
    pos = 0  # characters attributed so far, in the full text
    start = 0  # window start (a character boundary)
    done = 0  # characters of decode(ids[start:...]) already attributed
    boundaries: list[int] = [0]  # token indices where a character starts, most recent last
    n = len(ids)
    for i in range(n):
        cur = decode(ids[start : i + 1])
        complete = not cur.endswith(REPLACEMENT)
        stable = cur if (complete or i == n - 1) else _strip_incomplete(cur)
        if len(stable) < done or not stable.startswith(_window_prefix(pieces, done)):
            raise _NotLocal
        delta = stable[done:]
        offsets.append((pos, pos + len(delta)))
        pieces.append(delta)
        pos += len(delta)
        done = len(stable)
        if complete:
            boundaries.append(i + 1)
            # slide: keep `context` completed tokens (boundaries) of left context
            if len(boundaries) > context + 1:
                new_start = boundaries[-1 - context]
                if new_start > start:
                    done = len(decode(ids[new_start : i + 1]))
                    start = new_start
                del boundaries[: -context - 1]
    return "".join(pieces), offsets


class _NotLocal(Exception):
    """The decoder's output for a window is not consistent with what was attributed before."""


def _window_prefix(pieces: list[str], done: int) -> str:
    # The last `done` characters attributed so far (the window's already-attributed text).
    if done == 0:
        return ""
    tail = "".join(pieces[-64:])  # windows are a few tokens long; 64 pieces is far more than enough
    return tail[-done:] if len(tail) >= done else "".join(pieces)[-done:]


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
