"""Fast label scoring: class probabilities from **one forward pass**, no generated reasoning.

How: the chat prompt is followed by a *forced prefix* that ends exactly where the label token
comes -- by default the label step's key, ``"Verdict:"`` -- and the softmax over the first tokens
of the label names at that position is P(label). This is the same label-token reading as
:func:`she.evaluation.generate.generate_judgements` (which reads it at the label token the model
generated itself), moved to a position we force instead of one the model reaches.

Exact or approximate, depending on how the model was trained (``target`` in ``she.json``):

* ``target="label"``: SFT completions are ``"Verdict: <label>"`` (:func:`she.training.sft.completion_text`),
  so the forced prefix *is* the start of every training completion, and the distribution read
  there is exactly the model's distribution over its first label token. Fast mode is exact.
* ``target="reasoning"`` (and base models): the model was trained to write ``Query/Product/Type/
  Attributes`` lines *before* the verdict, and its verdict is conditioned on those lines. Jumping
  straight to ``Verdict:`` skips the reasoning, a position the model never saw in training, so
  the result is an **approximation** of what full generation would answer, and it can be a bad
  one. Measured on the demo SFT reasoning model (SmolLM2-135M, ``runs/demo``, 120 synthetic test
  pairs): fast mode answered ``Irrelevant`` for every pair, agreeing with full generation on 6.7 % of
  pairs (accuracy 16.7 % against 54.2 % for full generation); forcing ``Query:``/``Product:`` lines
  copied from the input before ``Verdict:``, or empty step keys, did no better (8 % on 48 pairs).
  The reasoning model has learnt to read its label off the ``Type``/``Attributes`` lines; without
  them it falls back to one class. ``label_mass`` (the full-vocabulary probability of the label
  tokens at that position) was 0.999 there: a low value flags a doubtful reading, but a high one does
  *not* mean the reading agrees with full generation. For reasoning models use ``mode="full"``, or
  train a label-target model for fast scoring.

Batches are **right-padded** and the logit is read at each row's last real token: every real token
keeps the position id it has when the row is alone, so a pair's score does not depend on which
other pairs share its batch (a plain forward on a left-padded batch would shift position ids).

:class:`FastScorer` is the one configured path: ``she predict --fast`` and the service's fast mode both
score through it, so precision and batching (bf16 autocast, length-sorted batches) are decided once,
here, and the two give the same numbers for the same pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.errors import UserError
from she.evaluation.generate import Judgement, label_first_tokens
from she.models.metadata import autocast
from she.reasoning.schema import StepSchema, marginal_step, schema_for


@dataclass
class FastJudgement(Judgement):
    """A :class:`Judgement` read in one forward pass: ``text`` is empty, ``parsed`` is None.

    ``format_ok`` is True by construction (the format up to the label is forced, not generated).
    ``label_mass`` is the full-vocabulary probability of the label tokens at the read position.
    """

    label_mass: float | None = None


def fast_prefix(taxonomy: str = "hd3", schema: StepSchema | None = None) -> str:
    """The forced text after the prompt: the label step's key and a colon (``"Verdict:"``).

    Why no skeleton of the earlier steps: their content (type relation, attribute checks) is what
    decides the label, so any text we forced there would decide the answer for the model; an empty
    step list is the least presumptuous prefix, and for label-target models it is the training format.
    """
    return f"{schema_for(schema, taxonomy).label_step.key}:"


def fast_mode_is_exact(target: str | None) -> bool:
    """Fast mode equals full generation's label distribution only for label-target models."""
    return target == "label"


def prefix_label_tokens(tokenizer, prefix: str, labels: Sequence[str]) -> tuple[list[int], str]:
    """Token ids of the labels' first tokens as they follow ``prefix``, and the separator used.

    Training text is ``prefix + " " + label`` (or ``prefix + label`` when ``prefix`` ends with
    whitespace). Raises ``ValueError`` unless, in this tokenizer, that text tokenizes as the prefix's
    own tokens followed by the label's first token -- otherwise the position we read would not be
    where the model predicts the label, and the numbers would be silently wrong.
    """
    if not prefix:
        raise UserError("the fast-mode prefix must not be empty")
    sep = "" if prefix[-1].isspace() else " "
    first = label_first_tokens(tokenizer, list(labels))
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if first is None:
        raise UserError(f"labels {list(labels)} share a first token in tokenizer {name}: label probabilities "
                        "cannot be read from one token")
    ids = first[sep == " "]
    base = tokenizer.encode(prefix, add_special_tokens=False)
    for lab, tid in zip(labels, ids):
        full = tokenizer.encode(prefix + sep + lab, add_special_tokens=False)
        if full[: len(base)] != base or len(full) <= len(base) or full[len(base)] != tid:
            raise UserError(f"tokenizer {name}: {prefix + sep + lab!r} does not tokenize as {prefix!r} followed by "
                            f"the first token of {sep + lab!r}; choose another fast-mode prefix")
    return list(ids), sep


def check_prefixes(tokenizer, prefixes: Sequence[str], labels: Sequence[str]) -> tuple[list[int], str]:
    """:func:`prefix_label_tokens` for every distinct prefix (its last line decides the token boundary before
    the label); all must read the same label tokens after the same separator. ``([], " ")`` for none."""
    checked: dict[str, tuple[list[int], str]] = {}
    for p in prefixes:
        tail = p.rsplit("\n", 1)[-1] or p  # what decides the token boundary before the label
        if tail not in checked:
            checked[tail] = prefix_label_tokens(tokenizer, tail, labels)
    if len({(tuple(ids), sep) for ids, sep in checked.values()}) > 1:
        raise UserError("fast-mode prefixes must all put the label after the same separator")
    return next(iter(checked.values())) if checked else ([], " ")


def _right_pad(batch: Sequence[Sequence[int]], pad_id: int):
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[b, : len(x)] = 1
    last = torch.tensor([len(x) - 1 for x in batch], dtype=torch.long)
    return ids, mask, last


def _argmax(probs: dict[str, float]) -> str:
    return max(probs, key=lambda lab: probs[lab])  # the first maximum wins on a tie


@torch.no_grad()
def score_labels_fast(
    model,
    tokenizer,
    records: list[Record],
    *,
    taxonomy: str = "hd3",
    prompt_style: str = "full",
    prefix: str | Callable[[Record], str] | None = None,
    batch_size: int = 32,
    bf16: bool = False,
    schema: StepSchema | None = None,
) -> list[FastJudgement]:
    """One forward pass per batch: P(label) at the forced label position, for every record.

    ``prompt_style`` and ``schema`` must be the ones the model was trained with (``she.json``; see
    :func:`she.models.metadata.prompt_style_of` and :func:`~she.models.metadata.model_step_schema`; None = the
    built-in schema). ``prefix`` defaults to :func:`fast_prefix` of that schema; it may
    be a function of the record (e.g. to force a short step list before the verdict), as long as every
    prefix's last line puts the label at a token boundary (checked, see :func:`prefix_label_tokens`).
    The label is the most probable one (the first, least relevant, on an exact tie).
    """
    from she.reasoning.prompts import build_messages

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    labels = list(get_taxonomy(taxonomy).labels)
    prefix = fast_prefix(taxonomy, schema) if prefix is None else prefix
    prefixes = [prefix(r) for r in records] if callable(prefix) else [prefix] * len(records)
    label_ids, _ = check_prefixes(tokenizer, prefixes, labels)
    texts = [tokenizer.apply_chat_template(build_messages(r, style=prompt_style, schema=schema_for(schema, r.taxonomy)),
                                           tokenize=False, add_generation_prompt=True) + p
             for r, p in zip(records, prefixes)]
    out = []
    for r, (p, mass) in zip(records, forced_choice_probs(model, tokenizer, texts, label_ids, batch_size=batch_size,
                                                         bf16=bf16)):
        probs = dict(zip(labels, p))
        out.append(FastJudgement(r.id, "", _argmax(probs), probs, True, None, 0, label_mass=mass))
    return out


@torch.no_grad()
def forced_choice_probs(model, tokenizer, texts: Sequence[str], choice_ids: Sequence[int], *, batch_size: int = 32,
                        bf16: bool = False) -> list[tuple[list[float], float]]:
    """For each full text (prompt and forced prefix), the softmax over ``choice_ids`` (first tokens of the choices,
    in order) of the next-token logits after its last token, and the full-vocabulary mass of those tokens. One
    forward pass per length-sorted, right-padded batch (a row's score does not depend on its batch); the output head
    in float32. The caller checks that the choices start at a token boundary (:func:`check_prefixes`)."""
    from she.models.heads import selected_logits

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # less padding per batch
    out: list[tuple[list[float], float] | None] = [None] * len(texts)
    with _reading(model) as device:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask, last = _right_pad([encoded[i] for i in idx], pad_id)
            rows = torch.arange(len(idx))
            with autocast(bf16, device):
                logits = selected_logits(model, ids.to(device), mask.to(device), rows.to(device), last.to(device),
                                         head_fp32=True)
            for row, i in enumerate(idx):
                out[i] = _choice_read(logits[row], choice_ids)
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def _reading(model) -> Iterator[torch.device]:
    """The model in eval mode for the block (its training flag restored after), and its device."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _choice_read(logits: Tensor, choice_ids: Sequence[int]) -> tuple[list[float], float]:
    """(softmax over the choices' first tokens, their full-vocabulary mass) of one position's logits [V]."""
    logits = logits.float()
    cols = torch.tensor(list(choice_ids), dtype=torch.long, device=logits.device)
    return torch.softmax(logits[cols], dim=-1).tolist(), float(torch.softmax(logits, dim=-1)[cols].sum())


@torch.no_grad()
def forced_choice_tree(model, tokenizer, text_groups: Sequence[Sequence[str]], choice_ids: Sequence[Sequence[int]],
                       *, batch_size: int = 16, bf16: bool = False) -> list[list[tuple[list[float], float]]]:
    """:func:`forced_choice_probs` for groups of texts that share a prefix (a stem and its branches): member j of
    each group read over ``choice_ids[j]``. A group is one packed sequence (she.models.prefix_tree): the shared
    tokens computed once, each text's own tail attending to them and to itself, at the positions it has alone --
    the same probabilities as one pass a text up to matmul rounding (tests/test_prefix_tree.py), one forward pass
    over ``batch_size`` groups, length-sorted."""
    from she.models.heads import selected_logits
    from she.models.prefix_tree import model_attention, pack_groups

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(g) != len(choice_ids) for g in text_groups):
        raise ValueError(f"every group must have {len(choice_ids)} texts, one a choice list")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [[tokenizer.encode(t, add_special_tokens=False) for t in g] for g in text_groups]
    order = sorted(range(len(encoded)), key=lambda i: sum(len(x) for x in encoded[i]))
    out: list[list[tuple[list[float], float]] | None] = [None] * len(encoded)
    with _reading(model) as device:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [x + [pad_id] for i in idx for x in encoded[i]]  # a dummy next token: its predictor is the read
            m = len(choice_ids)
            packed = pack_groups(seqs, [list(range(k * m, k * m + m)) for k in range(len(idx))],
                                 [[len(x) - 1] for x in seqs], pad_token_id=pad_id)
            picks = [packed.where[r][len(x) - 1] for r, x in enumerate(seqs)]
            rows = torch.tensor([n for n, _ in picks], device=device)
            cols = torch.tensor([c for _, c in picks], device=device)
            with autocast(bf16, device):
                logits = selected_logits(model, packed.input_ids.to(device),
                                         model_attention(model, packed.attention.to(device)), rows, cols,
                                         head_fp32=True, position_ids=packed.position_ids.to(device))
            for k, i in enumerate(idx):
                out[i] = [_choice_read(logits[k * m + j], choice_ids[j]) for j in range(m)]
    return out  # type: ignore[return-value]


def marginal_reads(model, tokenizer, stems: Sequence[str], schema: StepSchema, *, batch_size: int = 16,
                   bf16: bool = True, shared_prefix: bool = True) -> list[tuple[dict[str, float], dict[str, float]]]:
    """For each stem (prompt and steps, ending with ``"S:"``, S = :func:`marginal_step` of ``schema``):
    ``(P(S = v), P(label))`` with ``P(label) = sum_v P(S = v) P(label | S = v)``. ``P(S = v)`` is read at the stem's
    end, ``P(label | S = v)`` at ``stem + " v\\nVerdict:"``, the token boundaries checked first. ``shared_prefix``
    (default): the stem and its ``|values|`` branches as one packed sequence (:func:`forced_choice_tree`, the stem
    computed once); False: ``1 + |values|`` forward passes a stem (:func:`forced_choice_probs`)."""
    from she.evaluation.calibration import marginalise

    step, verdict_key = marginal_step(schema), schema.label_step.key
    labels, choices = list(get_taxonomy(schema.taxonomy).labels), list(step.choices)
    step_ids, _ = check_prefixes(tokenizer, [f"{step.key}:"], choices)
    label_ids, _ = check_prefixes(tokenizer, [f"{verdict_key}:"], labels)
    if shared_prefix:
        groups = [[t, *(f"{t} {v}\n{verdict_key}:" for v in choices)] for t in stems]
        reads = forced_choice_tree(model, tokenizer, groups, [step_ids] + [label_ids] * len(choices),
                                   batch_size=batch_size, bf16=bf16)
        decision = [dict(zip(choices, r[0][0])) for r in reads]
        branches = [{v: dict(zip(labels, r[1 + k][0])) for k, v in enumerate(choices)} for r in reads]
        return [(d, marginalise(d, b)) for d, b in zip(decision, branches)]
    decision = [dict(zip(choices, p)) for p, _ in forced_choice_probs(model, tokenizer, stems, step_ids,
                                                                       batch_size=batch_size, bf16=bf16)]
    branches: list[dict[str, dict[str, float]]] = [{} for _ in stems]
    for v in choices:
        read = forced_choice_probs(model, tokenizer, [f"{t} {v}\n{verdict_key}:" for t in stems], label_ids,
                                   batch_size=batch_size, bf16=bf16)
        for b, (p, _) in zip(branches, read):
            b[v] = dict(zip(labels, p))
    return [(d, marginalise(d, b)) for d, b in zip(decision, branches)]


def computed_evidence_judgements(
    model,
    tokenizer,
    records: list[Record],
    *,
    taxonomy: str = "hd3",
    prompt_style: str = "full",
    schema: StepSchema | None = None,
    batch_size: int = 16,
    bf16: bool = True,
    label_offsets: dict[str, float] | None = None,
) -> list[Judgement]:
    """Verdicts after the **computed evidence** (``evidence: computed``): for a schema whose steps are label-free
    functions of the pair, the steps are written by the rationale writer (:func:`she.reasoning.rationale.
    computed_evidence`: every step right) and forced, and the label is read from the label-token probabilities
    at the verdict position, one forward pass a pair, with ``label_offsets`` (fitted in this mode) applied.

    A schema whose only label-derived step is the choice right before the verdict (the decision schema's
    ``Relevant``) cannot have that step computed: the steps before it are forced, and it is read as a probability
    and the verdict averaged over its values (:func:`marginal_reads`; ``step_probs`` keeps ``P(S = v)``, and ``text``
    shows its most likely value). Any other label-derived step is refused (``UserError``).

    ``text`` is the forced steps and the label, parsed like a generated trace (its computed steps are right by
    construction); ``raw_label`` is the label before the offsets.
    """
    from she.evaluation.calibration import apply_offsets
    from she.reasoning.parse import parse_trace
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import computed_stem

    schemas = [schema_for(schema, r.taxonomy) for r in records]
    stems = [computed_stem(r, s) for r, s in zip(records, schemas)]
    to_verdict = {stem == f"{s.label_step.key}:" or stem.endswith(f"\n{s.label_step.key}:")
                  for stem, s in zip(stems, schemas)}
    if len(to_verdict) > 1:
        raise RuntimeError("computed evidence: some pairs' steps were computed to the verdict, others to the decision")
    if to_verdict == {False}:  # the decision's step is left to read as a probability
        prompts = [tokenizer.apply_chat_template(build_messages(r, style=prompt_style, schema=s), tokenize=False,
                                                 add_generation_prompt=True) for r, s in zip(records, schemas)]
        reads = marginal_reads(model, tokenizer, [p + t for p, t in zip(prompts, stems)], schema_for(schema, taxonomy),
                               batch_size=batch_size, bf16=bf16)
        out = []
        for r, s, stem, (d, probs) in zip(records, schemas, stems, reads):
            raw = _argmax(probs)
            label = apply_offsets(probs, raw, label_offsets)
            text = f"{stem} {_argmax(d)}\n{s.label_step.key}: {label}"
            out.append(Judgement(r.id, text, label, probs, True, parse_trace(text, s), 0, raw_label=raw, step_probs=d))
        return out
    prefix_of = {id(r): p for r, p in zip(records, stems)}
    scored = score_labels_fast(model, tokenizer, records, taxonomy=taxonomy, prompt_style=prompt_style,
                               prefix=lambda r: prefix_of[id(r)], batch_size=batch_size, bf16=bf16, schema=schema)
    out = []
    for r, s, j in zip(records, schemas, scored):
        label = apply_offsets(j.probs, j.label, label_offsets)
        text = f"{prefix_of[id(r)]} {label}"
        out.append(Judgement(j.record_id, text, label, j.probs, True, parse_trace(text, s), 0, raw_label=j.label))
    return out


def marginal_judgements(
    model,
    tokenizer,
    records: list[Record],
    *,
    taxonomy: str = "hd3",
    prompt_style: str = "full",
    schema: StepSchema | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    bf16: bool = True,
    progress: bool = True,
    label_offsets: dict[str, float] | None = None,
    judgements: list[Judgement] | None = None,
) -> list[Judgement]:
    """Verdicts with the last step before them read as a probability (``evidence: marginal``, docs/reasoning-format.md).

    The model writes its steps greedily (:func:`she.evaluation.generate.generate_judgements`, or ``judgements``
    already generated for ``records``). For each trace, with ``S`` the choice step right before the verdict
    (:func:`marginal_step`) and ``E`` the steps before it: ``P(S = v | E)`` is read at ``"S:"`` and, for every
    value ``v``, ``P(label | E, S = v)`` at ``"S: v\\nVerdict:"`` (forced, one forward pass a value), and

        P(label) = sum_v P(S = v | E) P(label | E, S = v)          (:func:`she.evaluation.calibration.marginalise`)

    Why: a greedy step decides the verdict by the argmax of a near-even probability; after RL the decision schema's
    ``Relevant`` sits there on many pairs (docs/results.md, session 14), and its verdict then follows the token
    deterministically, out of the offsets' reach. ``raw_label`` is the argmax of the marginal, ``label`` that with
    ``label_offsets`` (fitted in this mode); ``step_probs`` keeps ``P(S = v | E)``. A trace without a readable ``S``
    line keeps its generated verdict distribution and label (``step_probs`` None)."""
    from she.evaluation.calibration import apply_offsets
    from she.evaluation.generate import generate_judgements
    from she.reasoning.prompts import build_messages

    job_schema = schema_for(schema, taxonomy)
    step = marginal_step(job_schema)
    if judgements is None:
        judgements = generate_judgements(model, tokenizer, records, taxonomy=taxonomy, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, bf16=bf16, progress=progress,
                                         schema=schema, prompt_style=prompt_style)
    if len(judgements) != len(records):
        raise ValueError(f"{len(judgements)} judgements for {len(records)} records")
    todo, stems = [], []  # the traces with an S line; prompt + steps up to and including "S:"
    for i, (r, j) in enumerate(zip(records, judgements)):
        line = j.parsed.step(step.name) if j.parsed is not None else None
        if line is None:
            continue
        prompt = tokenizer.apply_chat_template(build_messages(r, style=prompt_style, schema=schema_for(schema, r.taxonomy)),
                                               tokenize=False, add_generation_prompt=True)
        todo.append(i)
        stems.append(prompt + j.text[: line.span[0]] + f"{step.key}:")
    reads = dict(zip(todo, marginal_reads(model, tokenizer, stems, job_schema, batch_size=batch_size, bf16=bf16)))
    out = []
    for i, j in enumerate(judgements):
        if i not in reads:
            out.append(replace(j, label=apply_offsets(j.probs, j.raw_label, label_offsets)))
            continue
        d, probs = reads[i]
        raw = _argmax(probs)
        out.append(replace(j, label=apply_offsets(probs, raw, label_offsets), probs=probs, raw_label=raw, step_probs=d))
    return out


# The settings of fast scoring wherever it runs (she predict --fast, the service's fast mode). bf16 autocast on
# CPU too: about 2x fp32 on this project's CPU (docs/design.md), and what she predict and she eval use.
# 16 pairs a batch is `she predict --batch-size`'s default; batches are length-sorted, so smaller ones carry
# less padding.
FAST_BF16 = True
FAST_BATCH_SIZE = 16


class FastScorer:
    """Fast scoring of one loaded model, set up once: the single path behind ``she predict --fast`` and the
    service's ``mode: "fast"`` (:class:`she.serving.backend.JudgeBackend`).

    It binds :func:`score_labels_fast` to the model's own prompt style, step schema and taxonomy and to the
    speed settings above, so no caller picks its own precision or batch size by accident (the service once ran
    fast mode in fp32 at half ``she predict --fast``'s speed). The prefix is checked against the tokenizer
    now: a model whose labels cannot be read at the forced position fails here (``UserError``), not on its
    first pairs.
    """

    def __init__(self, model: Any, tokenizer: Any, *, taxonomy: str = "hd3", prompt_style: str = "full",
                 schema: StepSchema | None = None, prefix: str | None = None, batch_size: int = FAST_BATCH_SIZE,
                 bf16: bool = FAST_BF16) -> None:
        if batch_size < 1:
            raise UserError(f"fast-mode batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.taxonomy, self.prompt_style, self.schema = taxonomy, prompt_style, schema
        self.prefix = fast_prefix(taxonomy, schema) if prefix is None else prefix
        self.batch_size, self.bf16 = batch_size, bf16
        check_prefixes(tokenizer, [self.prefix], list(get_taxonomy(taxonomy).labels))

    def score(self, records: list[Record]) -> list[FastJudgement]:
        """P(label) for every record, in order (length-sorted batches of ``batch_size`` inside)."""
        return score_labels_fast(self.model, self.tokenizer, records, taxonomy=self.taxonomy,
                                 prompt_style=self.prompt_style, prefix=self.prefix, batch_size=self.batch_size,
                                 bf16=self.bf16, schema=self.schema)


__all__ = ["FAST_BATCH_SIZE", "FAST_BF16", "FastJudgement", "FastScorer", "check_prefixes",
           "computed_evidence_judgements", "fast_mode_is_exact", "fast_prefix", "forced_choice_probs",
           "forced_choice_tree", "marginal_judgements", "marginal_reads", "marginal_step", "prefix_label_tokens",
           "score_labels_fast"]
