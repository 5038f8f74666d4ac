"""Batched generation of judgements: prompt -> reasoning trace -> parsed steps, label and class probabilities.

Class probabilities are read from the logits of the **label token** the model generated itself: at the
generation step that emits the first token of the verdict label, the softmax over the first tokens of
all label names gives P(label | query, product, reasoning). No second forward pass is needed, and the
probabilities are conditioned on the model's own reasoning, which is what the judge's label means.
Those logits are the output head re-read in float32 on the hidden state of that step
(:mod:`she.models.heads`): decoding runs in bf16, whose logits would quantise a soft verdict distribution
into steps of 1/16 nat and tie one pair in ten.

The traces are decoded by :func:`she.models.greedy.greedy_generate` (the batch's shared prompt prefix once, ended rows
retired), in batches ordered by prompt token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.models.heads import capture_head_inputs, head_logits_fp32, plain_head
from she.models.generation import fast_decoding
from she.models.greedy import greedy_generate
from she.models.metadata import autocast
from she.reasoning.schema import StepSchema


@dataclass
class Judgement:
    record_id: str
    text: str
    label: str | None
    probs: dict[str, float] | None
    format_ok: bool
    parsed: object = field(repr=False, default=None)  # she.reasoning.parse.ParsedTrace
    n_new_tokens: int = 0
    raw_label: str | None = None  # the generated label before calibration offsets (== label without them)
    # the decoder's last hidden state where the verdict label's first token was generated (``keep_hidden``)
    verdict_hidden: list[float] | None = field(repr=False, default=None)
    # ``evidence: marginal``: P(value) of the step the verdict was marginalised over (None: not marginalised)
    step_probs: dict[str, float] | None = None


def label_first_tokens(tokenizer, labels: list[str]) -> dict[bool, list[int]] | None:
    """First token id of each label, with and without a leading space. None when two labels collide."""
    out: dict[bool, list[int]] = {}
    for spaced in (True, False):
        ids = [tokenizer.encode((" " if spaced else "") + lab, add_special_tokens=False)[0] for lab in labels]
        if len(set(ids)) != len(ids):
            return None
        out[spaced] = ids
    return out


def _label_probs(step_logits: torch.Tensor, token_text: str, first_tokens, labels) -> dict[str, float] | None:
    if first_tokens is None:
        return None
    ids = first_tokens[token_text.startswith(" ")]
    p = torch.softmax(step_logits.float()[ids], dim=-1)
    return {lab: float(v) for lab, v in zip(labels, p)}


@torch.no_grad()
def generate_judgements(
    model,
    tokenizer,
    records: list[Record],
    *,
    taxonomy: str = "hd3",
    batch_size: int = 16,
    max_new_tokens: int = 96,
    bf16: bool = True,
    progress: bool = True,
    schema: StepSchema | None = None,
    prompt_style: str = "full",
    label_offsets: dict[str, float] | None = None,
    keep_hidden: bool = False,
) -> list[Judgement]:
    """Greedy judgements of ``records``. ``schema``: the step schema the model writes (prompts and parsing; None =
    the built-in one, :func:`she.models.metadata.model_step_schema` gives a model's own). ``label_offsets``
    (she.json ``label_offsets``): the label is read from the verdict-token probabilities with these per-class
    offsets (:mod:`she.evaluation.calibration`); the generated label stays in ``raw_label``. ``keep_hidden``: each
    judgement also keeps the hidden state its verdict was read from (``verdict_hidden``, float32; None where no
    label was generated or the model has no plain output head), for probes of what the verdict could read."""
    from tqdm.auto import tqdm

    from she.evaluation.calibration import apply_offsets
    from she.reasoning.parse import parse_trace
    from she.reasoning.prompts import build_messages
    from she.reasoning.schema import schema_for
    from she.reasoning.segmentation import token_char_offsets

    prompt_schemas = [schema_for(schema, r.taxonomy) for r in records]
    schema = schema_for(schema, taxonomy)
    labels = list(get_taxonomy(taxonomy).labels)
    first_tokens = label_first_tokens(tokenizer, labels)
    head = plain_head(model)
    model.eval()
    device = next(model.parameters()).device
    prompts = [
        tokenizer.apply_chat_template(build_messages(r, style=prompt_style, schema=s), tokenize=False,
                                      add_generation_prompt=True)
        for r, s in zip(records, prompt_schemas)
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    results: list[Judgement | None] = [None] * len(records)
    eos = tokenizer.eos_token_id
    bar = tqdm(total=len(records), desc="judging", unit="pair", disable=not progress)
    # on a CPU the decoding speed-ups of she.models.generation (bf16 weights packed once for all batches)
    with fast_decoding(model, pack=bf16):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = [prompt_ids[i] for i in idx]
            with autocast(bf16, device), capture_head_inputs(model) as hidden:
                # greedy decoding with the batch's shared prompt prefix run once and ended rows retired
                # (she.models.greedy); the scores only where no head input is captured: a batch's kept scores are
                # 0.2 MB a pair a token (SmolLM2), and the verdict is read from the captured states
                out = greedy_generate(model, enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=tokenizer.pad_token_id, output_scores=hidden is None)
            steps = len(out.step_rows)  # decoding steps of the batch
            if hidden is not None and len(hidden) != steps:
                raise RuntimeError(f"the output head ran {len(hidden)} times for {steps} generated tokens")
            rows = []  # (row, record index, new tokens, text, parse, verdict step k and its token's text or None)
            for row, i in enumerate(idx):
                ids = out.tokens[row]
                if eos in ids:
                    ids = ids[: ids.index(eos)]
                ids = [t for t in ids if t != tokenizer.pad_token_id]
                text, offsets = token_char_offsets(tokenizer, ids)
                parsed = parse_trace(text, schema)
                verdict = None
                if parsed.label is not None and parsed.label_span is not None:
                    k = next((j for j, (s, e) in enumerate(offsets) if e > parsed.label_span[0]), None)
                    if k is not None and k < steps:
                        verdict = (k, text[offsets[k][0]:offsets[k][1]])
                rows.append((row, i, len(ids), text, parsed, verdict))
            read = [(row, v[0]) for row, *_, v in rows if v is not None]
            if hidden is not None and read:  # every verdict's float32 logits in one product with the head
                states = torch.stack([hidden[k][out.batch_row(k, row)] for row, k in read])
                fp32_logits = dict(zip(read, head_logits_fp32(head, states)))
            for row, i, n_new, text, parsed, verdict in rows:
                probs = verdict_hidden = None
                if verdict is not None:
                    k, token_text = verdict
                    step = out.scores[k][out.batch_row(k, row)] if hidden is None else fp32_logits[(row, k)]
                    probs = _label_probs(step, token_text, first_tokens, labels)
                    if keep_hidden and hidden is not None:
                        verdict_hidden = hidden[k][out.batch_row(k, row)].float().tolist()
                label = apply_offsets(probs, parsed.label, label_offsets)
                results[i] = Judgement(records[i].id, text, label, probs, parsed.format_ok, parsed, n_new,
                                       raw_label=parsed.label, verdict_hidden=verdict_hidden)
            bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]
