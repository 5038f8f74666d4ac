"""A likelihood outcome reward: the policy's own probability of the gold label after its reasoning.

Why (docs/srpo.md, "The gold-probability outcome"): with a 0/1 label reward, a group whose rollouts all
give the same verdict has zero outcome variance and teaches nothing; at 8 rollouts a prompt about half the
groups are like that (``srpo/zero_var_groups``). Scoring a rollout by P(gold label | prompt, its reasoning),
read from the policy's logits at the verdict position (teacher-forced: the reasoning as written, up to the
label), ranks the rollouts of every group by how much their reasoning supports the truth, whichever verdict
was sampled. This is the reward of VeriFree / RLPR ("the policy's probability of the reference answer"),
made exact for a closed label set: the softmax runs over the first tokens of the taxonomy's labels only.
A per-prompt baseline (RLPR's "debiasing") is not needed: group centring removes any per-prompt constant.

Measured (docs/results.md): after the coverage SFT the verdict is a near-deterministic function of the
steps written (P ~ 0.9999 at the verdict token), so P(gold) is the 0/1 label reward to three decimals. The
information calibration exploits sits in the *log* of the small probabilities (offsets of +9 to +11 nats),
hence ``gold_logprob``: ``1 + max(log P(gold), -floor) / floor``, linear in log P(gold) between e^-floor
(0) and 1 (1), which ranks wrong rollouts by how wrong their reasoning leaves the verdict.

A trace with no parseable verdict scores 0, as under the label reward. The verdict's right/wrong (the
gated estimators' gate, label accuracy) stays the sampled label's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from she.data.schema import Record
from she.errors import UserError
from she.evaluation.generate import label_first_tokens
from she.models.generation import left_pad
from she.models.heads import capture_head_inputs, head_logits_fp32, plain_head
from she.models.metadata import autocast
from she.reasoning.parse import parse_trace, verdict_prefix
from she.reasoning.schema import StepSchema


def chat_prompt_ids(tokenizer: Any, prompts: list) -> list[list[int]]:
    """Chat messages through the tokenizer's template (as TRL renders conversational prompts); plain text prompts
    as TRL tokenizes them (the tokenizer's special tokens included)."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(tokenizer(prompt)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def gold_log_probabilities(last_logits: torch.Tensor, label_ids: torch.Tensor, gold_index: torch.Tensor) -> torch.Tensor:
    """log P(gold) [B] from next-token logits [B, V]: log-softmax over each row's label token ids [B, K], at
    ``gold_index`` [B]."""
    z = last_logits.float().gather(1, label_ids)
    return torch.log_softmax(z, dim=-1).gather(1, gold_index[:, None]).squeeze(1)


def log_floor_reward(log_p: torch.Tensor, floor: float) -> torch.Tensor:
    """``1 + max(log p, -floor) / floor``: 1 at P(gold) = 1, 0 at P(gold) <= e^-floor, linear in log P between."""
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    return 1.0 + log_p.clamp(min=-floor) / floor


class GoldLabelProbability:
    """Outcome reward = P(gold label | prompt, reasoning) under the current policy (no gradient); with
    ``log_floor``, :func:`log_floor_reward` of log P(gold) instead (``outcome: gold_logprob``).

    ``model_getter`` returns the policy (unwrapped) at call time, so the reward follows the weights as they
    train. :meth:`score` is memoised on its last call: TRL's reward function and SRPO's own outcome term
    score the same completions in one step, and pay for one forward pass; the trainer calls :meth:`forget`
    after that step's scoring, so a later batch with the same texts is scored with the new weights.
    """

    def __init__(self, model_getter: Callable[[], Any], tokenizer: Any, schema: StepSchema, *, bf16: bool = True,
                 batch_size: int = 16, log_floor: float | None = None,
                 tokenize_prompts: Callable[[list], list[list[int]]] | None = None) -> None:
        if log_floor is not None and log_floor <= 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}")
        self.log_floor = log_floor
        self.tokenize_prompts = tokenize_prompts or (lambda p: chat_prompt_ids(tokenizer, p))  # SRPOTrainer: TRL's own
        self.model_getter = model_getter
        self.tokenizer = tokenizer
        self.schema = schema
        self.bf16 = bf16
        self.batch_size = batch_size
        self.labels = list(schema.labels)
        first = label_first_tokens(tokenizer, self.labels)
        if first is None:
            raise ValueError(f"two labels of {self.labels} share their first token: P(label) cannot be read")
        self.first_tokens = first
        self._memo: dict[tuple[str, str], float] = {}

    def score(self, prompts: Sequence[Any], texts: Sequence[str], records: Sequence[Record]) -> list[float]:
        """P(gold) of each completion; ``prompts``: the chat messages (or text) the policy was given."""
        if not len(prompts) == len(texts) == len(records):
            raise ValueError(f"{len(prompts)} prompts, {len(texts)} texts, {len(records)} records")
        keys = [(r.id, t) for r, t in zip(records, texts)]
        if all(k in self._memo for k in keys):
            return [self._memo[k] for k in keys]
        todo: list[tuple[list[int], bool, int]] = []  # input ids, spaced, gold index
        verdict: list[bool] = []
        for ids, text, rec in zip(self.tokenize_prompts(list(prompts)), texts, records):
            ids = list(ids)
            parsed = parse_trace(text, self.schema)
            if parsed.label is None or parsed.label_span is None:  # no verdict: 0, as under the label reward; the
                todo.append((ids, True, 0))  # prompt is still run, so every rank runs as many forward passes
                verdict.append(False)        # (sharded weights, FSDP / ZeRO-3, are gathered in each one)
                continue
            prefix, spaced = verdict_prefix(text, parsed.label_span[0])
            todo.append((ids + self.tokenizer.encode(prefix, add_special_tokens=False), spaced,
                         self.labels.index(rec.label)))
            verdict.append(True)
        scores: list[float] = []
        for start in range(0, len(todo), self.batch_size):
            scores += self._forward(todo[start : start + self.batch_size])
        out = [p if ok else 0.0 for p, ok in zip(scores, verdict)]
        self._memo = dict(zip(keys, out))
        return out

    def forget(self) -> None:
        """Drop the memo: call it once the batch is scored, before the weights change."""
        self._memo = {}

    def _forward(self, chunk: list[tuple[list[int], bool, int]]) -> list[float]:
        rows = [(ids, self.first_tokens[spaced], gold) for ids, spaced, gold in chunk]
        log_p = choice_log_probs(self.model_getter(), self.tokenizer, rows, bf16=self.bf16)
        return (log_p.exp() if self.log_floor is None else log_floor_reward(log_p, self.log_floor)).tolist()


@torch.no_grad()
def choice_log_probs(model: Any, tokenizer: Any, rows: Sequence[tuple[list[int], list[int], int]], *,
                     bf16: bool = True) -> torch.Tensor:
    """log P(gold choice) [N] after each row's input ids: ``rows`` are (input ids, the choices' first token ids,
    the gold choice's index); one left-padded forward pass (no gradient, eval mode), the head in float32."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention = left_pad([ids for ids, _, _ in rows], pad, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() gives them
    label_ids = torch.tensor([c for _, c, _ in rows], device=device)
    gold = torch.tensor([g for _, _, g in rows], device=device)
    was_training = model.training
    model.eval()
    try:
        with autocast(bf16, device), capture_head_inputs(model) as hidden:
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=1, use_cache=False).logits[:, -1, :]
        if hidden:  # the label logits in float32 (she.models.heads: bf16 rounds them to 1/16 nat)
            logits = head_logits_fp32(plain_head(model), hidden[-1])
    finally:
        model.train(was_training)
    return gold_log_probabilities(logits, label_ids, gold)


class GoldStepProbability:
    """P(gold value of a choice step | prompt, the completion before the value) for ``srpo_likelihood``
    (docs/srpo.md, "Likelihood credit"), read from the policy at call time, teacher-forced, no gradient.

    ``steps``: the choice steps to read (e.g. ``["Relevant"]``), each with a gold value
    (:func:`she.rewards.verifier.choice_truth`). A step is read at ``<text before its line>Key:``, over the first
    tokens of its choices with a leading space (as the policy writes ``Relevant: yes``); a line that does not start
    with ``Key:`` or names no known choice, or a record without a gold value, is not read (None).
    """

    def __init__(self, model_getter: Callable[[], Any], tokenizer: Any, schema: StepSchema, steps: Sequence[str], *,
                 bf16: bool = True, batch_size: int = 16,
                 tokenize_prompts: Callable[[list], list[list[int]]] | None = None) -> None:
        by_key = {s.key: s for s in schema.steps}
        self.choices: dict[str, list[str]] = {}
        self.first_tokens: dict[str, list[int]] = {}
        for key in steps:
            spec = by_key.get(key)
            if spec is None or spec.kind != "choice":
                raise UserError(f"likelihood step {key!r} is not a choice step of the schema "
                                f"(its choice steps: {[s.key for s in schema.steps if s.kind == 'choice']})")
            first = label_first_tokens(tokenizer, list(spec.choices))
            if first is None:
                raise UserError(f"two values of {key!r} {list(spec.choices)} share their first token")
            self.choices[key], self.first_tokens[key] = list(spec.choices), first[True]
        self.model_getter = model_getter
        self.tokenizer = tokenizer
        self.bf16 = bf16
        self.batch_size = batch_size
        self.tokenize_prompts = tokenize_prompts or (lambda p: chat_prompt_ids(tokenizer, p))

    def score(self, prompts: Sequence[Any], texts: Sequence[str], records: Sequence[Record],
              parsed: Sequence[Any]) -> list[dict[int, tuple[float, bool]]]:
        """Per rollout, ``{index into parsed.steps: (P(gold value), sampled value == gold value)}`` for the first
        step of each likelihood key, where it is readable (a repeated key is a duplicate, never credited).

        Every rollout runs one row per likelihood key, read or not (an unreadable one runs its prompt and is thrown
        away), so every process runs as many forward passes as the others: with sharded weights (FSDP, ZeRO-3)
        each pass gathers them on every rank, as :class:`GoldLabelProbability` does."""
        from she.rewards.verifier import choice_truth

        todo: list[tuple[list[int], list[int], int]] = []
        where: list[tuple[int, int, bool] | None] = []
        prompt_ids = self.tokenize_prompts(list(prompts))
        for i, (ids, text, rec, p) in enumerate(zip(prompt_ids, texts, records, parsed)):
            for key, choices in self.choices.items():
                k = next((k for k, st in enumerate(p.steps) if st.key == key), None)
                step = p.steps[k] if k is not None else None
                truth = choice_truth(key, rec) if step is not None else None
                if (step is None or not step.text.startswith(f"{key}:") or truth not in choices
                        or step.conclusion not in choices):
                    todo.append((list(ids), self.first_tokens[key], 0))  # run, not read
                    where.append(None)
                    continue
                prefix = text[: step.span[0]] + f"{key}:"
                todo.append((list(ids) + self.tokenizer.encode(prefix, add_special_tokens=False),
                             self.first_tokens[key], choices.index(truth)))
                where.append((i, k, step.conclusion == truth))
        out: list[dict[int, tuple[float, bool]]] = [{} for _ in texts]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            log_p = choice_log_probs(self.model_getter(), self.tokenizer, chunk, bf16=self.bf16)
            for at, v in zip(where[start : start + self.batch_size], log_p.exp().tolist()):
                if at is not None:
                    out[at[0]][at[1]] = (v, at[2])
        return out


__all__ = ["GoldLabelProbability", "GoldStepProbability", "chat_prompt_ids", "choice_log_probs", "gold_log_probabilities",
           "log_floor_reward"]
