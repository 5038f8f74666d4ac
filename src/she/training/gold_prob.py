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
from she.evaluation.generate import label_first_tokens
from she.models.heads import capture_head_inputs, head_logits_fp32, plain_head
from she.models.metadata import autocast
from she.reasoning.parse import parse_trace, verdict_prefix
from she.reasoning.schema import StepSchema


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
        self.tokenize_prompts = tokenize_prompts or self._chat_prompt_ids  # SRPOTrainer passes TRL's own
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

    def _chat_prompt_ids(self, prompts: list) -> list[list[int]]:
        """Chat messages through the tokenizer's template (as TRL renders conversational prompts); plain text
        prompts as TRL tokenizes them (the tokenizer's special tokens included)."""
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(self.tokenizer(prompt)["input_ids"])
            else:
                text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
                out.append(self.tokenizer.encode(text, add_special_tokens=False))
        return out

    @torch.no_grad()
    def _forward(self, chunk: list[tuple[list[int], bool, int]]) -> list[float]:
        model = self.model_getter()
        device = next(model.parameters()).device
        width = max(len(ids) for ids, _, _ in chunk)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in chunk], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() gives them
        label_ids = torch.tensor([self.first_tokens[spaced] for _, spaced, _ in chunk], device=device)
        gold = torch.tensor([g for _, _, g in chunk], device=device)
        was_training = model.training
        model.eval()
        try:
            with autocast(self.bf16, device), capture_head_inputs(model) as hidden:
                logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                               logits_to_keep=1, use_cache=False).logits[:, -1, :]
            if hidden:  # the label logits in float32 (she.models.heads: bf16 rounds them to 1/16 nat)
                logits = head_logits_fp32(plain_head(model), hidden[-1])
        finally:
            model.train(was_training)
        log_p = gold_log_probabilities(logits, label_ids, gold)
        return (log_p.exp() if self.log_floor is None else log_floor_reward(log_p, self.log_floor)).tolist()


__all__ = ["GoldLabelProbability", "gold_log_probabilities", "log_floor_reward"]
