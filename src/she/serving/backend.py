"""The model side of the service: one loaded judge, called only from the batcher's worker thread.

:meth:`JudgeBackend.run` is the batcher's scoring function. Its keys:

``("fast",)``                  records -> :class:`~she.evaluation.fast.FastJudgement` (one forward pass, through
                               :class:`~she.evaluation.fast.FastScorer`, exactly as ``she predict --fast``)
``("full",)``                  records -> :class:`~she.evaluation.generate.Judgement` (greedy generation)
``("chat", max_tokens, temperature, top_p)``   :class:`ChatItem` -> :class:`ChatResult`

Per-item problems (a prompt longer than the model's context) come back as :class:`ItemError`
results instead of failing the whole batch, so one bad pair does not fail its batch-mates' requests.
Everything that touches the tokenizer runs here, in the one worker thread: Hugging Face fast
tokenizers are not safe to reconfigure (padding) while another thread encodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemError:
    """A per-item failure: ``message`` names what is wrong (shown to the client as a 4xx)."""

    message: str


@dataclass(frozen=True)
class ChatItem:
    messages: tuple[tuple[str, str], ...]  # (role, text)
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class JudgeBackend:
    """A loaded relevance judge plus what the service needs to know about it (``she.json``)."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, taxonomy: str = "hd3", prompt_style: str = "full",
                 target: str | None = None, max_new_tokens: int = 96, bf16: bool = False,
                 fast_prefix: str | None = None, schema: str = "default",
                 label_offsets: dict[str, float] | None = None, fast_bf16: bool | None = None,
                 fast_batch_size: int | None = None, label_offsets_computed: dict[str, float] | None = None,
                 label_offsets_marginal: dict[str, float] | None = None) -> None:
        """``bf16`` is the precision of full mode and chat. Fast mode runs as :class:`~she.evaluation.fast.FastScorer`
        runs it for ``she predict --fast`` (bf16 autocast, length-sorted batches of ``FAST_BATCH_SIZE``) unless
        ``fast_bf16`` / ``fast_batch_size`` say otherwise. Mode ``computed`` (the label-free steps computed from the
        pair and forced, :func:`she.evaluation.fast.computed_evidence_judgements`) runs with the fast settings and
        ``label_offsets_computed``; a schema with label-derived steps answers it with an item error. Mode ``marginal``
        (full generation, the verdict averaged over the last step's values, :func:`she.evaluation.fast.
        marginal_judgements`) runs with full mode's settings and ``label_offsets_marginal``; a schema without a choice
        step before the verdict answers it with an item error."""
        from she.evaluation.fast import FAST_BATCH_SIZE, FAST_BF16, FastScorer, check_prefixes
        from she.evaluation.fast import fast_prefix as default_prefix
        from she.reasoning.schema import resolve_schema

        self.schema = schema  # the spec (she.json "schema"), as /info reports it
        self.step_schema = resolve_schema(schema, taxonomy)  # a bad schema fails at load, not on the first request

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.taxonomy = taxonomy
        self.labels = list(get_taxonomy(taxonomy).labels)
        self.prompt_style = prompt_style
        self.label_offsets = label_offsets  # full mode reads the verdict with them (she calibrate)
        self.label_offsets_computed = label_offsets_computed  # computed mode's (she calibrate --evidence computed)
        self.label_offsets_marginal = label_offsets_marginal  # marginal mode's (she calibrate --evidence marginal)
        self.target = target
        self.max_new_tokens = max_new_tokens
        self.bf16 = bf16
        self.fast_prefix = default_prefix(taxonomy, self.step_schema) if fast_prefix is None else fast_prefix
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.fast: FastScorer | None = None
        self.fast_error: str | None = None
        try:
            check_prefixes(tokenizer, [self.fast_prefix], self.labels)
        except ValueError as e:  # the service still answers full-mode and chat requests
            self.fast_error = str(e)
            log.warning("fast mode unavailable: %s", e)
        else:
            self.fast = FastScorer(model, tokenizer, taxonomy=taxonomy, prompt_style=prompt_style,
                                   schema=self.step_schema, prefix=self.fast_prefix,
                                   batch_size=FAST_BATCH_SIZE if fast_batch_size is None else fast_batch_size,
                                   bf16=FAST_BF16 if fast_bf16 is None else fast_bf16)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.context = int(limit) if limit else None
        # bf16 full mode and chat on a CPU: the linear layers' bf16 weights packed once for the service's life
        # (she.models.generation.packed_linears; each generation's own block then packs nothing again)
        self._packed = contextlib.ExitStack()
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        if bf16 and first is not None and first.device.type == "cpu":
            from she.models.generation import packed_linears

            self._packed.enter_context(packed_linears(model))

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, taxonomy: str | None = None, device: str = "auto",
             bf16: bool | None = None, max_new_tokens: int = 96, fast_prefix: str | None = None,
             fast_batch_size: int | None = None) -> "JudgeBackend":
        """Load a registered name or ``save_pretrained`` folder; prompt style/target/taxonomy from ``she.json``.

        ``bf16=None``: full mode and chat in bf16 autocast on CUDA and on a CPU that runs bf16 well
        (:func:`she.runtime.cpu_bf16_native`; fp32 on other CPUs) -- what ``she eval`` judges in, and on a CPU the
        faster path (packed weights, the lean decoding step; docs/benchmarks.md); fast mode as ``she predict
        --fast`` (bf16 autocast on both). ``True``/``False`` sets all three."""
        import torch

        from she.runtime import cpu_bf16_native

        from she.models.registry import load_model_and_tokenizer, resolve_model
        from she.models.metadata import load_she_meta

        path = resolve_model(model_dir)
        meta = load_she_meta(path)
        trained = meta.get("taxonomy")
        if taxonomy and trained and taxonomy != trained:
            raise UserError(f"{path} was trained with taxonomy {trained!r} (she.json), not {taxonomy!r}")
        model, tok = load_model_and_tokenizer(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        model.eval()
        return cls(model, tok, name=str(model_dir), taxonomy=taxonomy or trained or "hd3",
                   prompt_style=meta.get("prompt_style", "full"), target=meta.get("target"),
                   max_new_tokens=max_new_tokens,
                   bf16=(device != "cpu" or cpu_bf16_native()) if bf16 is None else bf16,
                   fast_prefix=fast_prefix, schema=meta.get("schema", "default"),
                   label_offsets=meta.get("label_offsets") or None, fast_bf16=bf16, fast_batch_size=fast_batch_size,
                   label_offsets_computed=meta.get("label_offsets_computed") or None,
                   label_offsets_marginal=meta.get("label_offsets_marginal") or None)

    # -- description ----------------------------------------------------------------------------
    @property
    def fast_exact(self) -> bool:
        from she.evaluation.fast import fast_mode_is_exact

        return fast_mode_is_exact(self.target)

    def info(self) -> dict[str, Any]:
        fast = "unavailable" if self.fast_error else ("exact" if self.fast_exact else "approximate")
        return {"model": self.name, "taxonomy": self.taxonomy, "labels": self.labels,
                "prompt_style": self.prompt_style, "schema": self.schema, "target": self.target, "fast_mode": fast,
                "fast_prefix": self.fast_prefix, "fast_error": self.fast_error,
                "fast_bf16": self.fast.bf16 if self.fast else None,
                "fast_batch_size": self.fast.batch_size if self.fast else None, "bf16": self.bf16,
                "max_new_tokens": self.max_new_tokens, "context": self.context,
                "device": str(next(self.model.parameters()).device)}

    # -- the batcher's scoring function ---------------------------------------------------------------
    def run(self, key: Hashable, items: list[Any]) -> list[Any]:
        """Score one batch (any thread: the model's step schema is passed down, nothing is thread-local)."""
        kind = key[0] if isinstance(key, tuple) else key
        if kind in ("fast", "full", "computed", "marginal"):
            return self._relevance(kind, items)
        if kind == "chat":
            _, max_tokens, temperature, top_p = key
            return self._chat(items, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        raise ValueError(f"unknown batch key {key!r}")

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def _too_long(self, n_tokens: int, reserve: int) -> str | None:
        if self.context is not None and n_tokens + reserve > self.context:
            return (f"the prompt is {n_tokens} tokens; with {reserve} more it exceeds the model's context of "
                    f"{self.context} tokens")
        return None

    def _relevance(self, mode: str, records: list[Record]) -> list[Any]:
        from she.reasoning.prompts import build_messages
        from she.reasoning.schema import schema_for

        if mode == "fast" and self.fast is None:
            return [ItemError(f"fast mode is unavailable for this model: {self.fast_error}")] * len(records)
        reserve = len(self.tokenizer.encode(self.fast_prefix, add_special_tokens=False)) + 1 if mode == "fast" \
            else self.max_new_tokens
        out: list[Any] = [None] * len(records)
        ok: list[int] = []
        for i, r in enumerate(records):
            messages = build_messages(r, style=self.prompt_style, schema=schema_for(self.step_schema, r.taxonomy))
            n = len(self.tokenizer.encode(self._prompt(messages), add_special_tokens=False))
            problem = self._too_long(n, reserve)
            if problem:
                out[i] = ItemError(problem)
            else:
                ok.append(i)
        if ok:
            good = [records[i] for i in ok]
            if mode == "fast":
                res = self.fast.score(good)  # type: ignore[union-attr]  # None was answered above
            elif mode == "computed":
                from she.evaluation.fast import computed_evidence_judgements

                try:
                    res = computed_evidence_judgements(self.model, self.tokenizer, good, taxonomy=self.taxonomy,
                                                       prompt_style=self.prompt_style, schema=self.step_schema,
                                                       batch_size=self.fast.batch_size if self.fast else len(good),
                                                       bf16=self.fast.bf16 if self.fast else self.bf16,
                                                       label_offsets=self.label_offsets_computed)
                except UserError as e:  # a schema with label-derived steps: nothing can be computed
                    return [ItemError(f"computed mode is unavailable for this model: {e}")] * len(records)
            elif mode == "marginal":
                from she.evaluation.fast import marginal_judgements

                try:
                    res = marginal_judgements(self.model, self.tokenizer, good, taxonomy=self.taxonomy,
                                              prompt_style=self.prompt_style, schema=self.step_schema,
                                              batch_size=len(good), max_new_tokens=self.max_new_tokens, bf16=self.bf16,
                                              progress=False, label_offsets=self.label_offsets_marginal)
                except UserError as e:  # no choice step before the verdict
                    return [ItemError(f"marginal mode is unavailable for this model: {e}")] * len(records)
            else:
                from she.evaluation.generate import generate_judgements

                res = generate_judgements(self.model, self.tokenizer, good, taxonomy=self.taxonomy,
                                          batch_size=len(good), max_new_tokens=self.max_new_tokens, bf16=self.bf16,
                                          progress=False, prompt_style=self.prompt_style,
                                          label_offsets=self.label_offsets, schema=self.step_schema)
            for i, j in zip(ok, res):
                out[i] = j
        return out

    def _chat(self, items: list[ChatItem], *, max_tokens: int, temperature: float, top_p: float) -> list[Any]:
        import torch

        from she.models.generation import fast_decoding, fast_sampling, left_pad
        from she.models.metadata import autocast

        tok = self.tokenizer
        out: list[Any] = [None] * len(items)
        prompts: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            ids = tok.encode(self._prompt([{"role": r, "content": c} for r, c in it.messages]), add_special_tokens=False)
            problem = self._too_long(len(ids), max_tokens)
            if problem:
                out[i] = ItemError(problem)
            else:
                prompts[i] = ids
        if not prompts:
            return out
        idx = list(prompts)
        pad = tok.pad_token_id
        device = next(self.model.parameters()).device
        input_ids, mask = left_pad([prompts[i] for i in idx], pad, device)
        width = input_ids.size(1)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False}
        eos = tok.eos_token_id
        by_inversion = temperature > 0 and device.type == "cpu"  # she.models.generation: faster on a CPU only
        with torch.no_grad(), autocast(self.bf16, device), fast_sampling(by_inversion), \
                fast_decoding(self.model, pack=self.bf16):
            seqs = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                       pad_token_id=pad, eos_token_id=eos, **sampling)
        for row, i in enumerate(idx):
            gen = seqs[row, width:].tolist()
            stopped = eos in gen
            if stopped:
                gen = gen[: gen.index(eos)]
            gen = [t for t in gen if t != pad] if pad != eos else gen
            text, hit = apply_stop(tok.decode(gen, skip_special_tokens=True), items[i].stop)
            out[i] = ChatResult(text, len(prompts[i]), len(gen), "stop" if (stopped or hit) else "length")
        return out


__all__ = ["ChatItem", "ChatResult", "ItemError", "JudgeBackend", "apply_stop"]
