"""The generative stepwise reward model ("the judge"): P(step is right) for every step of a rollout.

A small causal LM (default SmolLM2-135M) reads the judge prompt -- the query and the product, exactly
what the policy saw (:func:`she.reasoning.prompts.user_message`) -- and then the policy's steps, each
followed by a verdict marker and a verdict token::

    <judge instruction + query/product as a chat prompt>
    Query: cordless drill; brand=dewalt\\nThis step is{V}
    \\nProduct: drill/driver kit; brand=DeWalt\\nThis step is{V}
    \\nType: same\\nThis step is{V}
    ...

``{V}`` is one of two *single-token* verdict words (``" good"``/``" bad"`` when the tokenizer has them
as single tokens, as SmolLM2 does, else ``"+"``/``"-"``; see :func:`auto_verdicts`). Why a generative
judge rather than a classification head: the verdict is an ordinary next-token prediction, so the
pretrained LM's sense of "good"/"bad" is the starting point, nothing new is initialised, and the
result is a normal ``save_pretrained`` folder that any causal-LM loader can read.

One forward pass per rollout
----------------------------
P(step k right) = softmax over the two verdict tokens of the logits at the position *before* verdict
slot k. All slots are filled with the same **placeholder** (the "good" token) in the input, during
training and scoring alike. Consequences:

* a causal LM's logits at position t depend only on tokens <= t, so reading every slot from one
  forward of the full sequence gives exactly what k separate forwards of the prefixes would give
  (tests/test_judge.py checks this to 1e-5);
* the input never depends on labels, so there is no teacher-forcing leak and no train/score mismatch:
  the judge always reads earlier steps "as accepted" and is trained in that very situation.

Tokens
------
The sequence is a concatenation of separately tokenized segments (prompt, then per step
``[newline +] step line + marker``, then the verdict id), built by the one function :meth:`StepJudge.encode`
for training and scoring. So the verdict slot is always exactly one known token whatever BPE merges
would do to the joined text, and the judge depends on the policy only through the step *text*
(parser character spans), never on the policy's tokenizer.

Also here: :class:`RemoteJudge`, the same per-step verdicts asked from any OpenAI-compatible chat
endpoint (one request per rollout), with timeouts and retries; failures become a neutral 0.5 and are
counted per kind in ``fault_counts``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from she.errors import UserError
from she.models.heads import selected_logits
from she.rewards.hybrid import BatchStepExaminer  # noqa: F401  (the protocol both judges implement)
from she.reasoning.prompts import user_message

log = logging.getLogger(__name__)

JUDGE_META = "she_judge.json"
FORMAT_VERSION = 1
JUDGE_INSTRUCTION = (
    "Check a search relevance judgement step by step. Say after each reasoning step whether it is "
    "good (right for this query and product) or bad."
)
# Candidate verdict pairs, in order of preference: natural words first (a pretrained LM already has a
# notion of them), then single ASCII bytes, which are single tokens in every byte-level BPE.
VERDICT_CANDIDATES: tuple[tuple[str, str], ...] = ((" good", " bad"), ("+", "-"))
NEUTRAL = 0.5


# -- format ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgeFormat:
    """How judge inputs are laid out; saved with a trained judge (``she_judge.json``).

    ``max_step_tokens`` caps one step line (a runaway 500-token "step" would otherwise crowd out the
    rest); ``max_length`` caps the whole sequence -- steps whose verdict slot would fall beyond it get
    no score (``None``), which a :class:`~she.rewards.hybrid.StepExaminer` may return.
    """

    good: str = "+"
    bad: str = "-"
    marker: str = "\nThis step is"
    instruction: str = JUDGE_INSTRUCTION
    max_step_tokens: int = 64
    max_length: int = 1024
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.good == self.bad:
            raise UserError(f"the two verdict words must differ, got {self.good!r} twice")
        if self.max_step_tokens < 1 or self.max_length < 8:
            raise UserError("max_step_tokens must be >= 1 and max_length >= 8")
        if self.version != FORMAT_VERSION:
            raise UserError(f"judge format version {self.version} is not supported (this she reads {FORMAT_VERSION})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "judge format") -> "JudgeFormat":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None


def verdict_token_ids(tokenizer: Any, good: str, bad: str) -> tuple[int, int]:
    """Token ids of the two verdict words; raises unless each is exactly one token and they differ."""
    ids = []
    for word in (good, bad):
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) != 1:
            raise UserError(
                f"verdict word {word!r} is {len(enc)} tokens {enc} in the judge tokenizer "
                f"({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}), but the judge reads one "
                f"token per verdict; choose single-token words (e.g. ' good'/' bad' for SmolLM2, '+'/'-' for "
                f"any byte-level BPE) or leave them unset to pick automatically"
            )
        ids.append(enc[0])
    if ids[0] == ids[1]:
        raise UserError(f"verdict words {good!r} and {bad!r} map to the same token {ids[0]}")
    return ids[0], ids[1]


def auto_verdicts(tokenizer: Any) -> tuple[str, str]:
    """The first pair of :data:`VERDICT_CANDIDATES` that are single, distinct tokens."""
    for good, bad in VERDICT_CANDIDATES:
        try:
            verdict_token_ids(tokenizer, good, bad)
        except ValueError:
            continue
        return good, bad
    raise UserError(f"none of the verdict pairs {VERDICT_CANDIDATES} are single distinct tokens in this tokenizer; "
                    "set the verdict words explicitly")


@dataclass
class EncodedJudge:
    """One judge input: token ids and the index of each verdict slot (one per scored step).

    ``positions`` may be shorter than ``n_steps`` when the sequence hit ``max_length``; the steps
    without a slot get no score.
    """

    input_ids: list[int]
    positions: list[int]
    n_steps: int


# -- pure tensor helpers -----------------------------------------------------------------------------
def collate(batch: Sequence[EncodedJudge], pad_id: int):
    """Right-pad a batch: (input_ids [B,T], attention_mask [B,T], rows, cols) with (rows, cols) the
    positions whose logits predict each verdict slot (the token *before* the slot), in batch order.

    Right padding keeps every real token at the same position id as when the row is alone, which is
    what makes scores independent of the batch they are computed in.
    """
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    for b, e in enumerate(batch):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[b, : len(e.input_ids)] = 1
        rows += [b] * len(e.positions)
        cols += [p - 1 for p in e.positions]
    return ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def verdict_loss_terms(logits, good_id: int, bad_id: int, targets):
    """Per-slot cross-entropy with soft targets over the two verdict tokens (full-vocab softmax).

    ``-(y log p(good) + (1-y) log p(bad))``: with hard labels this is the ordinary LM loss on the
    verdict token; the full softmax (not the two-way one used for scoring) also teaches the model that
    nothing but a verdict word follows the marker.
    """
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -(targets * logp[:, good_id] + (1 - targets) * logp[:, bad_id])


def p_good(logits, good_id: int, bad_id: int):
    """Two-way softmax P(good) = sigmoid(l_good - l_bad)."""
    import torch

    return torch.sigmoid(logits[:, good_id] - logits[:, bad_id])


# -- the local judge -----------------------------------------------------------------------------------
class StepJudge:
    """A causal LM scoring every parsed step of a rollout in one forward pass.

    Satisfies :class:`she.rewards.hybrid.StepExaminer` (``score_steps``) and offers batched
    ``score_steps_batch`` for many rollouts at once (:class:`she.rewards.hybrid.BatchStepExaminer`).
    """

    def __init__(self, model: Any, tokenizer: Any, fmt: JudgeFormat | None = None, *, batch_size: int = 16,
                 bf16: bool = False, progress: bool = False) -> None:
        if fmt is None:
            good, bad = auto_verdicts(tokenizer)
            fmt = JudgeFormat(good=good, bad=bad)
        self.model = model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.good_id, self.bad_id = verdict_token_ids(tokenizer, fmt.good, fmt.bad)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.progress = progress
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._marker_ids = self._ids(fmt.marker)
        if not self._marker_ids:
            raise UserError("the verdict marker must not be empty")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = min(fmt.max_length, int(limit)) if limit else fmt.max_length

    # -- loading / saving --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str, *, fmt: JudgeFormat | None = None, **kwargs: Any) -> "StepJudge":
        """Load a judge folder (with ``she_judge.json``) or any registry name / causal-LM folder.

        A folder's saved format wins over ``fmt`` unless ``fmt`` is given explicitly; a base model
        without ``she_judge.json`` gets ``fmt`` or the automatic verdict words.
        """
        from she.models.registry import load_model_and_tokenizer, resolve_model

        path = resolve_model(name_or_dir)
        model, tok = load_model_and_tokenizer(str(path))
        meta_path = Path(path) / JUDGE_META
        if fmt is None and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            fmt = JudgeFormat.from_dict(meta.get("format", {}), where=str(meta_path))
            judge = cls(model, tok, fmt, **kwargs)
            saved = meta.get("verdict_token_ids")
            if saved and list(saved) != [judge.good_id, judge.bad_id]:
                raise UserError(f"{meta_path}: verdict token ids {saved} differ from the tokenizer's "
                                f"{[judge.good_id, judge.bad_id]}: tokenizer and judge metadata do not "
                                "belong together")
            return judge
        return cls(model, tok, fmt, **kwargs)

    def save_pretrained(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {"kind": "she-step-judge", "format": self.fmt.to_dict(),
                "verdict_token_ids": [self.good_id, self.bad_id], **(extra or {})}
        (out / JUDGE_META).write_text(json.dumps(meta, indent=2))
        return out

    # -- encoding ----------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def prefix_text(self, prompt: str) -> str:
        """The judge prompt: chat template (system = instruction, user = query/product) when the
        tokenizer has one, else plain text."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.fmt.instruction}, {"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.fmt.instruction}\n\n{prompt}\n\n"

    def encode(self, prompt: str, steps: Sequence[str]) -> EncodedJudge:
        """Token ids of prompt + steps with a placeholder ("good") verdict slot after every step."""
        ids = self._ids(self.prefix_text(prompt))
        positions: list[int] = []
        if len(ids) + len(self._marker_ids) + 2 > self.max_length:
            raise UserError(f"the judge prompt alone is {len(ids)} tokens, over max_length={self.max_length}")
        for k, step in enumerate(steps):
            body = self._ids(("\n" if k else "") + " ".join(str(step).split()))[: self.fmt.max_step_tokens]
            seg = body + self._marker_ids
            if len(ids) + len(seg) + 1 > self.max_length:
                log.debug("judge input truncated at step %d of %d (max_length=%d)", k, len(steps), self.max_length)
                break
            ids += seg
            positions.append(len(ids))
            ids.append(self.good_id)
        return EncodedJudge(ids, positions, len(steps))

    # -- scoring -----------------------------------------------------------------------------------
    def _device(self):
        return next(self.model.parameters()).device

    def probabilities(self, encoded: Sequence[EncodedJudge]) -> list[list[float]]:
        """P(good) per verdict slot of each encoded input, batched (sorted by length, right-padded)."""
        import torch

        from she.models.metadata import autocast

        out: list[list[float]] = [[] for _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        order = [i for i in order if encoded[i].positions]
        device = self._device()
        was_training = self.model.training
        self.model.eval()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="judge scoring", unit="rollout")
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    ids, mask, rows, cols = collate([encoded[i] for i in idx], self.tokenizer.pad_token_id)
                    with autocast(self.bf16, device):
                        logits = selected_logits(self.model, ids.to(device), mask.to(device), rows.to(device),
                                                 cols.to(device), head_fp32=True)
                    probs = p_good(logits, self.good_id, self.bad_id).tolist()
                    k = 0
                    for i in idx:
                        n = len(encoded[i].positions)
                        out[i] = probs[k : k + n]
                        k += n
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return out

    def score_texts(self, prompts: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float | None]]:
        """Scores for raw (prompt, step lines) pairs; ``None`` for steps cut off by ``max_length``."""
        if len(prompts) != len(steps):
            raise ValueError(f"{len(prompts)} prompts but {len(steps)} step lists")
        encoded = [self.encode(p, s) for p, s in zip(prompts, steps)]
        probs = self.probabilities(encoded)
        return [list(p) + [None] * (e.n_steps - len(p)) for p, e in zip(probs, encoded)]

    def score_steps_batch(self, items: Sequence[tuple[Any, Any]]) -> list[list[float | None]]:
        """``[(parsed trace, record), ...]`` -> per-step P(correct), one list per item."""
        return self.score_texts([user_message(r) for _, r in items], [[s.text for s in p.steps] for p, _ in items])


    def score_steps(self, parsed: Any, record: Any) -> list[float | None]:
        return self.score_steps_batch([(parsed, record)])[0]


# -- the remote judge ----------------------------------------------------------------------------------
REMOTE_INSTRUCTION = (
    "You check the reasoning of a search relevance judgement. The user gives a search query, a product and "
    "numbered reasoning steps. For each step decide whether it is right for this query and product. "
    "Answer with exactly one line per step, in order, formatted as '<number>: good' or '<number>: bad', "
    "and nothing else."
)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_NUMBERED = re.compile(r"^[\s>*_`#-]*(?:step\s*)?(\d{1,3})\s*[.:)\-]?\s*[*_`]*\s*(good|bad)\b", re.I)
_BARE = re.compile(r"^[\s>*_`#-]*(good|bad)[\s*_`.!]*$", re.I)


def parse_remote_verdicts(text: str, n_steps: int) -> list[float | None]:
    """Read ``1: good`` / ``2: bad`` lines -> [1.0, 0.0, ...]; ``None`` for each unreadable step.

    Numbered lines are matched by number (a number given twice with different verdicts is unreadable);
    if there are none, bare ``good``/``bad`` lines are used in order only when there is exactly one
    per step (otherwise the mapping to steps would be a guess). ``<think>`` blocks are ignored.
    """
    text = _THINK.sub("", text if isinstance(text, str) else "")
    lines = text.splitlines()
    numbered: dict[int, set[float]] = {}
    for line in lines:
        m = _NUMBERED.match(line)
        if m:
            numbered.setdefault(int(m.group(1)), set()).add(1.0 if m.group(2).lower() == "good" else 0.0)
    if numbered:
        out: list[float | None] = []
        for k in range(1, n_steps + 1):
            v = numbered.get(k)
            out.append(next(iter(v)) if v and len(v) == 1 else None)
        return out
    bare = [1.0 if m.group(1).lower() == "good" else 0.0 for line in lines if (m := _BARE.match(line))]
    if len(bare) == n_steps:
        return list(bare)
    return [None] * n_steps


@dataclass
class RemoteJudgeStats:
    """Counts of what happened; every neutral score is accounted for here."""

    requests: int = 0
    failed_requests: int = 0  # network/HTTP/bad-response failures after retries
    unparseable_answers: int = 0  # answers in which at least one step had no readable verdict
    steps: int = 0
    neutral_steps: int = 0  # steps scored NEUTRAL because of a failure or an unreadable verdict
    errors: list[str] = field(default_factory=list)  # first few error messages

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys of RemoteJudge.fault_counts. Per *attempt*: timeout, connection, http_5xx, http_429 (retried) and
# http_4xx (not retried); per *answer*: garbage (HTTP 200 that is not a chat completion, or a verdict
# missing for at least one step); retries = extra attempts made; neutral_scores = steps that got NEUTRAL
# because of any of these.
FAULT_KINDS: tuple[str, ...] = ("timeout", "connection", "http_5xx", "http_429", "http_4xx", "garbage", "retries",
                                "neutral_scores")
_RETRYABLE = frozenset({"timeout", "connection", "http_5xx", "http_429"})
_WARN_FIRST = 3  # log the first few faults of each kind, then one line every _WARN_EVERY
_WARN_EVERY = 100


def classify_request_error(exc: BaseException) -> str:
    """Fault kind of an exception raised by ``urllib.request.urlopen`` / ``read`` (pure).

    ``HTTPError`` -> ``http_5xx`` / ``http_429`` / ``http_4xx``; a timeout, whether urllib wraps it in a
    ``URLError`` (connect phase) or lets ``TimeoutError`` through (read phase) -> ``timeout``; any other
    socket/HTTP-protocol error (refused, reset, DNS, truncated response) -> ``connection``.
    """
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        if exc.code >= 500:
            return "http_5xx"
        return "http_429" if exc.code == 429 else "http_4xx"
    reason = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError) or (isinstance(reason, str) and "timed out" in reason):
        return "timeout"
    return "connection"


def chat_content(raw: bytes) -> str | None:
    """The assistant text of an OpenAI chat-completion body, or None when the body is not one."""
    try:
        content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        return None
    return content if isinstance(content, str) else None


def _fresh_fault_counts() -> dict[str, int]:
    return dict.fromkeys(FAULT_KINDS, 0)


@dataclass
class RemoteJudge:
    """Per-step good/bad verdicts from an OpenAI-compatible chat endpoint (one request per rollout).

    Built for a judge that runs *inside* RL training, where the endpoint is someone else's server and a
    fault must cost a little signal, never the run:

    * every attempt has a ``timeout`` (seconds); timeouts, connection errors, HTTP 5xx and 429 are
      retried up to ``max_retries`` times after ``backoff * 2**k`` seconds (k = 0, 1, ...; capped at
      ``max_backoff``), because they are usually transient; other 4xx are not retried (the same request
      would fail the same way);
    * an HTTP 200 that is not a chat completion, or an answer without a readable verdict for a step, is
      *garbage*: not retried (at temperature 0 the same question gets the same answer) and the
      unreadable steps score :data:`NEUTRAL`;
    * a request that still has no answer after the retries scores every step :data:`NEUTRAL`.

    Nothing raises. Every event is counted in ``fault_counts`` (keys :data:`FAULT_KINDS`; SRPOTrainer
    logs their per-step increments as ``judge/faults/<kind>``) and logged with ``logging.warning`` (the
    first few of each kind, then every 100th). ``stats`` keeps the per-request summary. Verdicts are 1.0
    (good) or 0.0 (bad): a chat endpoint gives no calibrated probability.
    """

    base_url: str
    model: str
    timeout: float = 30
    max_retries: int = 2
    api_key: str | None = None
    max_tokens: int = 64
    backoff: float = 0.5
    max_backoff: float = 8.0
    instruction: str = REMOTE_INSTRUCTION
    stats: RemoteJudgeStats = field(default_factory=RemoteJudgeStats)
    fault_counts: dict[str, int] = field(default_factory=_fresh_fault_counts)
    sleep: Any = field(default=None, repr=False)  # callable(seconds); None = time.sleep (tests pass a recorder)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"remote judge base_url must start with http:// or https://, got {self.base_url!r}")
        if self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.max_backoff < 0:
            raise UserError(f"remote judge: need max_retries >= 0, timeout > 0, backoff >= 0 and max_backoff >= 0; "
                            f"got max_retries={self.max_retries}, timeout={self.timeout}, backoff={self.backoff}, "
                            f"max_backoff={self.max_backoff}")
        self.base_url = self.base_url.rstrip("/")
        for k in FAULT_KINDS:
            self.fault_counts.setdefault(k, 0)

    def messages(self, parsed: Any, record: Any) -> list[dict[str, str]]:
        steps = "\n".join(f"{k}. {' '.join(s.text.split())}" for k, s in enumerate(parsed.steps, 1))
        return [{"role": "system", "content": self.instruction},
                {"role": "user", "content": f"{user_message(record)}\n\nReasoning steps:\n{steps}"}]

    # -- faults ------------------------------------------------------------------------------------
    def _error(self, msg: str) -> None:
        if len(self.stats.errors) < 5:
            self.stats.errors.append(msg)

    def _fault(self, kind: str, msg: str) -> None:
        """Count one fault and log it, rate-limited per kind (a dead server must not flood the log)."""
        self.fault_counts[kind] = n = self.fault_counts.get(kind, 0) + 1
        if n <= _WARN_FIRST or n % _WARN_EVERY == 0:
            more = "" if n < _WARN_FIRST else f" (further {kind} warnings only every {_WARN_EVERY}th)"
            log.warning("remote judge %s #%d: %s%s", kind, n, msg, more)

    # -- transport ---------------------------------------------------------------------------------
    def _attempt(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[str, bytes | str]:
        """One POST: ``("ok", body bytes)`` or ``(fault kind, message)``."""
        import http.client
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return "ok", resp.read()
        except urllib.error.HTTPError as e:
            return classify_request_error(e), f"HTTP {e.code} from {url}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # TimeoutError is an OSError
            return classify_request_error(e), f"{type(e).__name__}: {getattr(e, 'reason', e)} ({url})"

    def request(self, messages: list[dict[str, str]], who: str = "?") -> str | None:
        """The endpoint's answer text, or None when there is none after the retries (every fault counted)."""
        import time

        sleep = self.sleep or time.sleep
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.fault_counts["retries"] += 1
                sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            kind, payload = self._attempt(url, body, headers)
            if kind == "ok":
                text = chat_content(payload)  # type: ignore[arg-type]
                if text is None:
                    msg = f"record {who}: {url} answered HTTP 200 but not with a chat completion: {payload[:120]!r}"
                    self._fault("garbage", msg)
                    self._error(msg)
                return text
            msg = f"record {who}, attempt {attempt + 1}/{self.max_retries + 1}: {payload}"
            self._fault(kind, msg)
            if kind not in _RETRYABLE:
                self._error(msg)
                return None
        self._error(f"record {who}: no answer after {self.max_retries + 1} attempt(s); last: {payload}")
        return None

    # -- scoring -----------------------------------------------------------------------------------
    def score_steps(self, parsed: Any, record: Any) -> list[float | None]:
        n = len(parsed.steps)
        if n == 0:
            return []
        who = str(getattr(record, "id", "?"))
        self.stats.requests += 1
        self.stats.steps += n
        answer = self.request(self.messages(parsed, record), who)
        if answer is None:
            self.stats.failed_requests += 1
            self.stats.neutral_steps += n
            self.fault_counts["neutral_scores"] += n
            return [NEUTRAL] * n
        verdicts = parse_remote_verdicts(answer, n)
        missing = sum(v is None for v in verdicts)
        if missing:
            self.stats.unparseable_answers += 1
            self.stats.neutral_steps += missing
            self.fault_counts["neutral_scores"] += missing
            self._fault("garbage", f"record {who}: no readable verdict for {missing} of {n} step(s) in {answer[:80]!r}")
            self._error(f"{who}: unreadable answer {answer[:80]!r}")
        return [NEUTRAL if v is None else v for v in verdicts]

    def score_steps_batch(self, items: Sequence[tuple[Any, Any]]) -> list[list[float | None]]:
        return [self.score_steps(p, r) for p, r in items]



__all__ = [
    "EncodedJudge",
    "FAULT_KINDS",
    "JUDGE_INSTRUCTION",
    "JUDGE_META",
    "JudgeFormat",
    "NEUTRAL",
    "RemoteJudge",
    "RemoteJudgeStats",
    "StepJudge",
    "auto_verdicts",
    "chat_content",
    "classify_request_error",
    "collate",
    "p_good",
    "parse_remote_verdicts",
    "selected_logits",
    "verdict_loss_terms",
    "verdict_token_ids",
]
