"""Request bodies, their limits, and error messages that name the field (``pairs[3].query``).

Pydantic checks types (strictly: ``"yes"`` is not a boolean, ``5`` is not a query); the limits that
depend on how the server was started (pairs per request, characters per field) are checked by
:func:`relevance_errors`. Both produce ``(param, message)`` pairs, which the app turns into one JSON
error shape, the OpenAI one (``{"error": {"message", "type", "param", "code"}}``), so clients of
the chat endpoint and of the relevance endpoint read errors the same way. The client deadline header,
``X-Deadline-S``, is checked by :func:`parse_deadline_s`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TEXT_FIELDS = ("query", "title", "brand", "color", "description")
REQUIRED_TEXT = ("query", "title")


class PairIn(BaseModel):
    """One (query, product) pair. ``id`` (string or integer) is echoed back; default: the position."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str
    title: str
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    id: Any = None


def pair_payload(record: Any, max_text_chars: int = 2000) -> dict[str, Any]:
    """A data record as one ``pairs[i]`` entry of a relevance request: query, title and the optional text
    fields it has, each cut to ``max_text_chars`` (the server's default limit), ``id`` echoed back."""
    d: dict[str, Any] = {"query": record.query, "title": record.product.title, "id": record.id}
    for f in ("brand", "color", "description"):
        v = getattr(record.product, f)
        if v:
            d[f] = v[:max_text_chars]
    return d


class RelevanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    pairs: list[PairIn]
    mode: Literal["fast", "full", "computed", "marginal"] = "full"
    return_reasoning: bool = False


class ChatMessage(BaseModel):
    """An OpenAI chat message; ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatRequest(BaseModel):
    """The subset of the OpenAI chat-completions body this server honours; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None


def loc_to_param(loc: Sequence[Any]) -> str:
    """``("body", "pairs", 3, "query")`` -> ``"pairs[3].query"``; the bare body is ``"body"``."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


def pydantic_errors(errors: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """FastAPI/pydantic validation errors -> ``[(param, message)]``."""
    out = []
    for e in errors:
        param = loc_to_param(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "json_invalid":
            param, msg = "body", f"invalid JSON: {e.get('ctx', {}).get('error', msg)}"
        out.append((param, msg))
    return out


def relevance_errors(req: RelevanceRequest, *, max_request_pairs: int, max_text_chars: int) -> list[tuple[str, str]]:
    """Limits that pydantic does not know: pair count, blank/over-long text, id type, mode/reasoning."""
    errs: list[tuple[str, str]] = []
    n = len(req.pairs)
    if n == 0:
        errs.append(("pairs", "must contain at least one pair"))
    elif n > max_request_pairs:
        errs.append(("pairs", f"{n} pairs, over the limit of {max_request_pairs} per request; split the request"))
    if req.return_reasoning and req.mode == "fast":
        errs.append(("return_reasoning", "fast mode scores the label without writing reasoning; reasoning comes "
                                         "with mode 'full' (generated), 'computed' or 'marginal'"))
    for i, p in enumerate(req.pairs[: max_request_pairs]):
        for f in TEXT_FIELDS:
            v = getattr(p, f)
            if v is None:
                continue
            if f in REQUIRED_TEXT and not v.strip():
                errs.append((f"pairs[{i}].{f}", "must not be empty"))
            elif len(v) > max_text_chars:
                errs.append((f"pairs[{i}].{f}", f"{len(v)} characters, over the limit of {max_text_chars}"))
        if p.id is not None and (isinstance(p.id, bool) or not isinstance(p.id, (str, int))):
            errs.append((f"pairs[{i}].id", f"must be a string or an integer, got {type(p.id).__name__}"))
    return errs


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A chat message's text; raises ``ValueError`` naming ``where`` for non-text parts."""
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{k}]: only text parts ({{'type': 'text', 'text': ...}}) are supported")
        texts.append(part["text"])
    return "".join(texts)


def chat_errors(req: ChatRequest, *, max_chat_tokens: int, max_chat_chars: int) -> list[tuple[str, str]]:
    errs: list[tuple[str, str]] = []
    if req.n != 1:
        errs.append(("n", "only n=1 is supported"))
    if req.stream:
        errs.append(("stream", "streaming is not supported; send stream=false"))
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name)
        if v is not None and not 1 <= v <= max_chat_tokens:
            errs.append((name, f"must be between 1 and {max_chat_tokens}, got {v}"))
    total = 0
    for i, m in enumerate(req.messages):
        try:
            total += len(message_text(m.content, f"messages[{i}]"))
        except ValueError as e:
            param, _, msg = str(e).partition(": ")
            errs.append((param, msg))
    if total > max_chat_chars:
        errs.append(("messages", f"{total} characters in all, over the limit of {max_chat_chars}"))
    if isinstance(req.stop, list) and (len(req.stop) > 4 or any(not s for s in req.stop)):
        errs.append(("stop", "at most 4 non-empty stop strings"))
    return errs


DEADLINE_HEADER = "X-Deadline-S"


def parse_deadline_s(value: str | None) -> float | None:
    """The ``X-Deadline-S`` header: seconds the client gives the request, counted from when the server received
    it; None when absent. Raises ``ValueError`` naming the header for anything but a finite number > 0."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{DEADLINE_HEADER}: must be a number of seconds > 0 (e.g. 2.5), got {value!r}")
    return seconds


def error_body(errors: Sequence[tuple[str, str]], kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI-style error JSON: the first problem in ``message``/``param``, all of them in ``errors``."""
    shown = "; ".join(f"{p}: {m}" for p, m in errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
    return {"error": {"message": shown, "type": kind, "param": errors[0][0] if errors else None, "code": None,
                      "errors": [{"param": p, "message": m} for p, m in errors]}}


__all__ = [
    "DEADLINE_HEADER",
    "ChatMessage",
    "ChatRequest",
    "PairIn",
    "RelevanceRequest",
    "chat_errors",
    "error_body",
    "loc_to_param",
    "message_text",
    "parse_deadline_s",
    "pydantic_errors",
    "relevance_errors",
]
