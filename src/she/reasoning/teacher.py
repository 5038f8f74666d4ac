"""Reasoning traces from a teacher LLM behind any OpenAI-compatible chat endpoint (vLLM, ``transformers serve``).

The teacher sees the query and product only -- never the gold label -- and writes a trace in the
step format. Its answer is parsed and **rejected** unless it is well-formed, its verdict equals the
human label and (by default) its own Type/Attributes steps imply that verdict. What survives is
re-rendered in the canonical spelling (markdown, numbering and case variations removed) so SFT data
from the teacher and from the rule-based writer look the same to the policy.

Only the standard library is used (``urllib``), so this works in the CPU-only environment and needs
no client package. Network errors, timeouts, 429 and 5xx answers are retried a bounded number of
times and then counted as failures; nothing here raises for a bad answer or a dead server.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.parse import ParsedTrace, consistent_label, parse_trace
from she.reasoning.prompts import teacher_system_prompt, user_message
from she.reasoning.render import render_trace
from she.reasoning.schema import StepSchema, default_schema

log = logging.getLogger(__name__)

# rejection / failure reasons counted in TeacherStats.rejected
REQUEST_FAILED = "request_failed"  # network error, timeout or HTTP error after retries
BAD_RESPONSE = "bad_response"  # HTTP 200 but not an OpenAI chat completion
PARSE_FAILED = "parse_failed"  # answer does not follow the step format
WRONG_LABEL = "wrong_label"  # verdict differs from the human label
INCONSISTENT = "inconsistent"  # steps imply another label than the verdict
NO_LABEL = "no_label"  # the record has no human label to check against

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


class TeacherError(RuntimeError):
    """A request that failed after all retries (or could not be retried)."""


@dataclass
class TeacherClient:
    """Minimal OpenAI-compatible chat client: POST ``{base_url}/chat/completions``.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1``. Retries (``max_retries``
    extra attempts, exponential ``backoff`` seconds) cover connection errors, timeouts, HTTP 429
    and 5xx; other 4xx errors are not retried because asking again will not help.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 30
    max_retries: int = 2
    temperature: float = 0.7
    max_tokens: int = 160
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"teacher base_url must start with http:// or https://, got {self.base_url!r}")
        if self.max_retries < 0:
            raise UserError("max_retries must be >= 0")
        self.base_url = self.base_url.rstrip("/")

    def chat(self, messages: list[dict[str, str]]) -> str:
        """Return the assistant text for ``messages`` or raise :class:`TeacherError`."""
        body = json.dumps({
            "model": self.model, "messages": messages, "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {url}"
                if e.code == 429 or e.code >= 500:
                    continue
                raise TeacherError(last) from None
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)} ({url})"
                continue
            return _content(raw, url)
        raise TeacherError(f"{last} after {self.max_retries + 1} attempt(s)")


class BadResponse(TeacherError):
    """HTTP 200 whose body is not a chat completion."""


def _content(raw: bytes, url: str) -> str:
    try:
        data = json.loads(raw.decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadResponse(f"{url}: response is not an OpenAI chat completion: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise BadResponse(f"{url}: message content is not a string")
    return content


@dataclass
class TeacherStats:
    records: int = 0
    requested: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few record ids/messages

    def reject(self, reason: str, example: str) -> None:
        self.rejected[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(example)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.requested if self.requested else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "requested": self.requested, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "rejected": dict(self.rejected),
                "examples": self.examples}


def canonical_trace(parsed: ParsedTrace, schema: StepSchema) -> str:
    """Re-render a ``format_ok`` trace in the canonical spelling (first occurrence of each step)."""
    values: dict[str, Any] = {}
    for s in parsed.steps:
        if s.name not in values:
            values[s.name] = s.value.strip("*_` ") if s.kind == "free" else s.conclusion
    return render_trace(values, schema)


def judge_answer(text: str, record: Record, schema: StepSchema, *, require_consistent: bool = True) -> tuple[str | None, str]:
    """(canonical trace or None, reason) for one teacher answer against the record's human label."""
    text = _THINK.sub("", text)
    parsed = parse_trace(text, schema)
    if not parsed.format_ok:
        return None, PARSE_FAILED
    if parsed.label != record.label:
        return None, WRONG_LABEL
    if require_consistent and parsed.step("type") is not None and consistent_label(parsed, schema.taxonomy) != parsed.label:
        return None, INCONSISTENT
    try:
        return canonical_trace(parsed, schema), "accepted"
    except ValueError:  # defensive: a format_ok trace always re-renders
        return None, PARSE_FAILED


def generate_traces(
    records: Iterable[Record],
    client: TeacherClient,
    schema: StepSchema | None = None,
    n: int = 1,
    *,
    require_consistent: bool = True,
    system: str | None = None,
) -> tuple[list[tuple[Record, str]], TeacherStats]:
    """Ask the teacher ``n`` times per record; keep the traces that pass :func:`judge_answer`.

    Returns ``(accepted, stats)`` where ``accepted`` is a list of ``(record, canonical trace)`` and
    ``stats`` counts every request by outcome. Records without a label are counted as ``no_label``
    and not sent (there is nothing to check the answer against).
    """
    if n < 1:
        raise UserError("n must be >= 1")
    stats = TeacherStats()
    accepted: list[tuple[Record, str]] = []
    for record in records:
        stats.records += 1
        sch = schema or default_schema(record.taxonomy)
        if record.label is None:
            stats.reject(NO_LABEL, record.id)
            continue
        if sch.taxonomy != record.taxonomy:
            raise UserError(f"record {record.id}: taxonomy {record.taxonomy!r} differs from the schema's {sch.taxonomy!r}")
        messages = [
            {"role": "system", "content": system or teacher_system_prompt(sch)},
            {"role": "user", "content": user_message(record)},
        ]
        for _ in range(n):
            stats.requested += 1
            try:
                answer = client.chat(messages)
            except BadResponse as e:
                stats.reject(BAD_RESPONSE, f"{record.id}: {e}")
                continue
            except TeacherError as e:
                log.warning("teacher request failed for record %s: %s", record.id, e)
                stats.reject(REQUEST_FAILED, f"{record.id}: {e}")
                continue
            trace, reason = judge_answer(answer, record, sch, require_consistent=require_consistent)
            if trace is None:
                stats.reject(reason, record.id)
            else:
                stats.accepted += 1
                accepted.append((record, trace))
    return accepted, stats


__all__ = [
    "BadResponse",
    "TeacherClient",
    "TeacherError",
    "TeacherStats",
    "canonical_trace",
    "generate_traces",
    "judge_answer",
]
