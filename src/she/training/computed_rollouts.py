"""Rollouts whose evidence is computed, not sampled (``rl.rollout_evidence: computed``, docs/srpo.md).

The best reads of a judge on the decision and evidence schemas force the computed evidence and let the policy
decide after it (``evidence: computed``: the steps a program can compute from the pair are written by the
rationale writer, every one right). A policy trained by RL on its *own* sampled evidence is then read on
another distribution than the one it was trained on. Here the rollouts match the read: each prompt's computed
steps (:func:`she.reasoning.rationale.computed_evidence`, up to the verdict key, or up to the key of the choice
step right before it on the decision schema) are appended to the prompt, the policy samples only what follows
(the decision value and the verdict), and the returned completion is the steps plus the sample, with TRL's
``env_mask`` 0 on the forced steps: they are parsed, examined and rewarded like any trace, and get no gradient
(TRL multiplies its loss mask by it).

A TRL ``rollout_func`` (``GRPOTrainer(rollout_func=...)``); generation is the trainer's own
``_generate_single_turn``, so SRPOTrainer's autocast region and sampling by inversion apply.

``rl.rollout_evidence: enumerated`` (:func:`enumerated_evidence_rollout`) samples nothing: after the same forced
steps, the G rollouts of a prompt are every possible rest of the trace, each once (:func:`leaf_texts`: the decision
value and the verdict, 2 x 3 on the decision schema), and the exact estimators (``grpo_exact``, ``srpo_exact``;
she.algorithms.advantages, section 11) weigh each by its probability under the policy.
"""

from __future__ import annotations

from typing import Any, Callable

from she.data.schema import Record
from she.errors import UserError
from she.reasoning.prompts import user_message
from she.reasoning.rationale import computed_stem, write_rationale
from she.reasoning.schema import StepSchema, marginal_step


def stem_tokens(tok, prompt_ids: list[int], stem: str) -> list[int]:
    """The ids of ``stem`` as they come after ``prompt_ids`` when prompt and stem are tokenized as one text, which
    is how the computed read of ``she eval`` forces them (a stem tokenized on its own may differ at its start,
    e.g. SentencePiece's leading "▁"). A tokenizer that merges across the boundary is refused."""
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=False)
    full = tok(prompt_text + stem, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        raise RuntimeError("rollout_evidence=computed: the prompt's tokens change when the computed steps follow it "
                           f"(the tokenizer merges across the boundary); prompt ends {prompt_text[-40:]!r}")
    return full[len(prompt_ids):]


def computed_evidence_rollout(records: list[Record], schema: StepSchema) -> Callable[[list, Any], dict]:
    """A TRL ``rollout_func`` for prompts built from ``records`` (matched by their user message): the computed
    stem of each prompt forced, the rest sampled by the trainer. Stems are written once, here, so a schema that
    cannot be computed fails before any model is loaded."""
    stems: dict[str, str] = {}
    for r in records:
        key, stem = user_message(r), computed_stem(r, schema)
        if stems.setdefault(key, stem) != stem:  # the same prompt text, other facts: the policy could not tell them apart
            raise UserError(f"record {r.id}: its prompt is another record's, but its computed steps differ "
                            f"({stems[key]!r} vs {stem!r}); deduplicate the pairs or drop the conflicting facts")

    def rollout(prompts: list, trainer) -> dict:
        tok = trainer._tokenizer_for_decoding()
        prompt_ids, images, multimodal = trainer._tokenize_prompts(prompts)
        stem_ids = []
        for p, ids in zip(prompts, prompt_ids):
            key = p[-1]["content"] if isinstance(p, list) else p
            if key not in stems:
                raise RuntimeError(f"rollout_evidence=computed: a prompt that none of the job's records wrote: {key!r}")
            stem_ids.append(stem_tokens(tok, list(ids), stems[key]))
        group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        sampled, _ = trainer._generate_single_turn([p + s for p, s in zip(prompt_ids, stem_ids)], images, multimodal,
                                                    group)
        return {"prompt_ids": prompt_ids,
                "completion_ids": [s + list(c) for s, c in zip(stem_ids, sampled)],
                "logprobs": None,  # TRL recomputes the old policy's where it needs them
                "env_mask": [[0] * len(s) + [1] * len(c) for s, c in zip(stem_ids, sampled)]}

    return rollout


def leaf_texts(schema: StepSchema, stem: str) -> list[str]:
    """Every rest of a trace after ``stem`` (:func:`computed_stem`): ``" v\nVerdict: label"`` for each value v of the
    choice step the stem ends at and each label, in the schema's order, or ``" label"`` after a stem ending at the
    verdict key."""
    labels, verdict = list(schema.labels), schema.label_step.key
    if stem.endswith(f"\n{verdict}:") or stem == f"{verdict}:":
        return [f" {lab}" for lab in labels]
    step = marginal_step(schema)
    if not stem.endswith(f"{step.key}:"):
        raise RuntimeError(f"rollout_evidence=enumerated: a computed stem ends neither at {verdict}: nor at "
                           f"{step.key}: ({stem[-40:]!r})")
    return [f" {v}\n{verdict}: {lab}" for v in step.choices for lab in labels]


def enumerated_evidence_rollout(records: list[Record], schema: StepSchema) -> Callable[[list, Any], dict]:
    """A TRL ``rollout_func``: each prompt's computed stem forced, then its G rollouts are the G leaves of
    :func:`leaf_texts` in order, each ended by the end-of-sequence token, nothing sampled (``num_generations`` must
    be the number of leaves). The leaves are checked against the trace the schema writes for each record's gold
    label, so a format the SFT did not learn fails here, before a model is loaded."""
    stems: dict[str, str] = {}
    leaves: list[str] | None = None
    for r in records:
        key, stem = user_message(r), computed_stem(r, schema)
        if stems.setdefault(key, stem) != stem:
            raise UserError(f"record {r.id}: its prompt is another record's, but its computed steps differ "
                            f"({stems[key]!r} vs {stem!r}); deduplicate the pairs or drop the conflicting facts")
        mine = leaf_texts(schema, stem)
        if leaves is None:
            leaves = mine
        elif mine != leaves:
            raise RuntimeError(f"record {r.id}: its leaves {mine} differ from the other records' {leaves}")
        if r.label is not None:
            gold = write_rationale(r, schema)
            if not gold.startswith(stem) or gold[len(stem):].rstrip() not in mine:
                raise RuntimeError(f"record {r.id}: the schema's gold trace does not end with one of the enumerated "
                                   f"leaves after its computed steps (it ends {gold[len(stem):]!r})")

    def rollout(prompts: list, trainer) -> dict:
        tok = trainer._tokenizer_for_decoding()
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if group != len(leaves or []):
            raise UserError(f"rollout_evidence: enumerated needs num_generations = the number of leaves "
                            f"({len(leaves or [])}: {leaves}), got {group}")
        completions, env = [], []
        for i, (p, ids) in enumerate(zip(prompts, prompt_ids)):
            key = p[-1]["content"] if isinstance(p, list) else p
            if key not in stems:
                raise RuntimeError(f"rollout_evidence=enumerated: a prompt that none of the job's records wrote: {key!r}")
            if prompts[i - i % group] != p:
                raise RuntimeError("rollout_evidence=enumerated: the prompts of a group are not contiguous copies")
            stem = stem_tokens(tok, list(ids), stems[key])
            leaf = stem_tokens(tok, list(ids) + stem, leaves[i % group]) + [tok.eos_token_id]
            completions.append(stem + leaf)
            env.append([0] * len(stem) + [1] * len(leaf))
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None, "env_mask": env}

    rollout.num_leaves = len(leaves or [])  # type: ignore[attr-defined]
    return rollout


__all__ = ["computed_evidence_rollout", "enumerated_evidence_rollout", "leaf_texts", "stem_tokens"]
