"""SRPO on top of TRL: ``GRPOTrainer`` with per-token advantages from step rewards.

TRL's ``GRPOTrainer`` samples G completions per prompt, scores them with reward functions, turns the
rewards into one advantage per completion (group-normalised) and optimises a clipped policy loss in
which that advantage multiplies every completion token. SRPO keeps all of it except the advantage:

1. ``super()._generate_and_score_completions(inputs)`` does generation, reward computation (our
   :func:`outcome_reward` is the one reward function, so TRL's own advantage *is* vanilla GRPO's), the
   reference/old log-probs and TRL's logging. It returns a dict whose ``completion_ids`` and
   ``completion_mask`` are this process's completions, [B_local, T].
2. The override decodes each completion, parses it into steps, asks the examiner for a score per step
   and maps step character spans onto the policy's own generated tokens.
3. Group statistics must cover whole groups, and a group's G completions may sit on several processes,
   so -- exactly like TRL does with its rewards -- everything needed is gathered over processes
   (outcome rewards and token->step maps with ``accelerator.gather`` after padding, ragged step rewards
   with ``gather_object``), :func:`she.algorithms.advantages.srpo_advantages` is computed over the
   global batch, and this process keeps rows ``[rank * B_local, (rank + 1) * B_local)`` (TRL's
   ``process_slice``) and its own T columns.
4. ``output["advantages"]`` is replaced by that [B_local, T] tensor. TRL 1.16's ``_compute_loss``
   accepts (B, T) advantages (it only unsqueezes 1-D ones).

With ``step_rewards=False`` the same trainer is vanilla GRPO: the advantage is TRL's own, broadcast over
the completion tokens (``adv[:, None] * completion_mask``), so both arms of an experiment share every
line of code except the advantage.

See docs/srpo.md ("SRPOTrainer") for the TRL internals this relies on; tests/test_trl_contract.py fails
loudly if a TRL upgrade moves them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from she.algorithms.advantages import (
    CREDIT_MODES,
    ESTIMATORS,
    AdvantageInputs,
    AdvantageOptions,
    EXACT_ESTIMATORS,
    compute_advantages,
    expected_share_pin,
    leaf_probabilities,
    outcome_advantage,
    pad_step_rewards,
    share_pin_shift,
    teacher_leaf_term,
)
from she.data.schema import Record
from she.errors import UserError
from she.models.generation import (
    ROLLOUT_PREFILLS,
    ROLLOUT_SAMPLERS,
    fast_decoding,
    fast_sampling,
    generation_autocast,
    shared_prefill,
)
from she.models.prefix_tree import LOGP_PREFIXES, model_attention, pack_shared_prefixes, unpack
from she.training.lm_head import labelled_positions_only, resolve_labelled_positions
from she.reasoning.parse import ParsedTrace, parse_trace
from she.reasoning.schema import StepSchema, default_schema
from she.reasoning.segmentation import token_steps_for_completion
from she.rewards.hybrid import (
    SOURCE_CUT,
    SOURCE_DUPLICATE,
    SOURCES,
    StepExaminer,
    StepScores,
    VerifierExaminer,
    examine_batch,
    fault_counts,
    format_reward,
    outcome_reward,
)
from she.training.gold_prob import GoldLabelProbability, GoldStepProbability

log = logging.getLogger(__name__)

RECORD_ID_COLUMN = "record_id"
RECORD_JSON_COLUMN = "record"
OUTCOME_REWARD_NAME = "outcome"
OUTCOMES = ("label", "gold_prob", "gold_logprob")  # the outcome reward (SRPOTrainer ``outcome``)
LIKELIHOOD_DEFAULTS = ("Relevant", "Type")  # srpo_likelihood's default step: the first of these in the schema
GOLD_LOG_FLOOR = 20.0  # gold_logprob: log P(gold) at or below -20 (P ~ 2e-9) scores 0


# ------------------------------------------------------------------------------------------- datasets


def make_prompt_dataset(records: Sequence[Record], style: str = "compact", *, schema: StepSchema | None = None,
                        include_record_json: bool = False):
    """Conversational GRPO dataset: a ``prompt`` column (chat messages) and a ``record_id`` column.

    TRL passes every extra column through to the reward functions and to ``_generate_and_score_completions``
    (``remove_unused_columns`` is False for GRPO), which is how a completion finds its record (gold label and
    step facts). ``include_record_json`` also stores the whole record as JSON in a ``record`` column, so the
    trainer needs no ``records_by_id`` map (handy for datasets streamed from disk; bigger rows).
    """
    from datasets import Dataset

    from she.data.validation import check_labelled_unique
    from she.reasoning.prompts import build_messages

    check_labelled_unique(records, "RL needs labelled records")
    rows = []
    for r in records:
        row = {"prompt": build_messages(r, schema=schema, style=style), RECORD_ID_COLUMN: r.id}
        if include_record_json:
            row[RECORD_JSON_COLUMN] = r.to_json()
        rows.append(row)
    if not rows:
        raise UserError("make_prompt_dataset: no records")
    return Dataset.from_list(rows)


def build_grpo_config(
    output_dir: str | Path,
    *,
    num_generations: int = 4,
    per_device_train_batch_size: int | None = None,
    max_completion_length: int = 96,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    learning_rate: float = 1e-6,
    beta: float = 0.0,
    temperature: float = 1.0,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    logging_steps: int = 1,
    report_to: str = "none",
    save_strategy: str = "no",
    use_vllm: bool = False,
    vllm_mode: str = "colocate",
    vllm_gpu_memory_utilization: float = 0.3,
    vllm_server_base_url: str | None = None,
    **overrides: Any,
) -> GRPOConfig:
    """A ``GRPOConfig`` with the project's defaults: CPU when there is no CUDA, bf16 only where supported.

    ``per_device_train_batch_size`` defaults to ``num_generations`` (one prompt's group per device step),
    the smallest batch TRL accepts. ``gradient_checkpointing`` is off unless asked for (TRL's default is on:
    it recomputes activations at ~1/3 more compute, which a small model on CPU does not need). Any other ``GRPOConfig`` field can be passed in ``overrides``.
    The ``vllm_*`` settings are TRL's own fields, checked here first so that a missing vLLM or a typo'd
    mode fails before a model is loaded (:func:`she.training.distributed.check_vllm_settings`).
    """
    from she.training.distributed import check_vllm_settings
    from she.training.trainer_setup import device_args, report_to_list

    check_vllm_settings(use_vllm, vllm_mode, vllm_gpu_memory_utilization, vllm_server_base_url)
    return GRPOConfig(
        output_dir=str(output_dir),
        num_generations=num_generations,
        per_device_train_batch_size=per_device_train_batch_size or num_generations,
        max_completion_length=max_completion_length,
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        beta=beta,
        temperature=temperature,
        **device_args(bf16),
        gradient_checkpointing=gradient_checkpointing,  # TRL defaults to on; see JobConfig
        seed=seed,
        logging_steps=logging_steps,
        report_to=report_to_list(report_to),
        save_strategy=save_strategy,
        dataloader_num_workers=0,
        use_vllm=use_vllm,
        vllm_mode=vllm_mode,
        vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
        vllm_server_base_url=vllm_server_base_url,
        **overrides,
    )


# ------------------------------------------------------------------------------------ pure helpers


@dataclass
class RolloutScore:
    """Everything SRPO derives from one completion (one row of the batch).

    ``step_keys``/``step_scores``/``step_sources`` cover the *examined* steps (all parsed steps except the
    label step unless it is included); ``step_scores[k] is None`` means nobody scored step k and it gets no
    step reward. ``token_step`` maps each generated token to an index into the *rewarded* steps (the
    examined steps with a score, in order), -1 elsewhere; it is None when token maps were not needed.
    """

    text: str
    label: str | None
    gold: str
    outcome: float
    correct: bool
    format_ok: bool
    step_keys: list[str]
    step_scores: list[float | None]
    step_sources: list[str]
    token_step: list[int] | None = None
    truncated: bool = False
    # per examined step: (P(gold value), sampled value == gold value[, weight of its credit]) of a likelihood step
    # (srpo_likelihood), else None
    step_gold: list[tuple[float, bool] | tuple[float, bool, float] | None] | None = None

    @property
    def rewards(self) -> list[float]:
        """Step rewards of the rewarded steps, in text order (what ``token_step`` indexes)."""
        return [s for s in self.step_scores if s is not None]

    @property
    def gold_probs(self) -> list[float]:
        """P(gold value) of the rewarded steps (parallel to :attr:`rewards`), NaN where a step has none."""
        gold = self.step_gold or [None] * len(self.step_scores)
        return [math.nan if g is None else g[0] for g, s in zip(gold, self.step_scores) if s is not None]

    @property
    def gold_right(self) -> list[bool]:
        """Whether the sampled value of each rewarded step is its gold value (False where it has no P(gold)):
        the sign of ``srpo_likelihood``'s credit, taken from the value itself, not from the examiner's score."""
        gold = self.step_gold or [None] * len(self.step_scores)
        return [g is not None and g[1] for g, s in zip(gold, self.step_scores) if s is not None]

    @property
    def gold_weights(self) -> list[float]:
        """The weight of each rewarded step's likelihood credit (1 where none is given)."""
        gold = self.step_gold or [None] * len(self.step_scores)
        return [g[2] if g is not None and len(g) > 2 else 1.0 for g, s in zip(gold, self.step_scores) if s is not None]

    @property
    def reward_keys(self) -> list[str]:
        """Step keys of the rewarded steps (parallel to :attr:`rewards`)."""
        return [k for k, s in zip(self.step_keys, self.step_scores) if s is not None]


def rollout_outcome(text: str, record: Record, schema: StepSchema, *, partial_credit: bool = False,
                    format_weight: float = 0.0) -> tuple[float, ParsedTrace]:
    """Outcome reward of one completion: label reward plus ``format_weight`` times the format reward.

    The same function feeds TRL's reward function and SRPO's own outcome term, so the two never disagree.
    """
    parsed = parse_trace(text, schema)
    reward = outcome_reward(parsed.label, record.label, schema.taxonomy, partial_credit)
    if format_weight:
        reward += format_weight * format_reward(parsed)
    return reward, parsed


def examined_step_indices(parsed: ParsedTrace, include_label_step: bool = False) -> list[int]:
    """Indices into ``parsed.steps`` that can earn a step reward.

    The label (verdict) step is left out by default: the outcome reward already judges it, and rewarding
    it again would count the label twice on the very tokens that decide it.
    """
    return [k for k, s in enumerate(parsed.steps) if include_label_step or s.kind != "label"]


def credit_span(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The characters a step answers for: its line *and* the line break that ends it.

    Without the break, ending a line (or starting the next one) sits outside every step and earns no step
    credit while continuing a rewarded line does: broadcast credit then pays for longer lines.
    """
    s, e = span
    if text.startswith("\r\n", e):
        return s, e + 2
    if text.startswith("\n", e) or text.startswith("\r", e):
        return s, e + 1
    return s, e


def apply_trace_rules(keys: Sequence[str], scores: Sequence[float | None], sources: Sequence[str], *,
                      truncated: bool) -> tuple[list[float | None], list[str]]:
    """Step scores after the two trace-level rules (pure; docs/srpo.md, "What the examiner pays for"):

    * a step key already seen earlier in the trace scores 0 (``duplicate``): writing a step twice never
      earns twice;
    * a trace cut by the length limit (no end-of-sequence token) never reached its verdict: every examined
      step scores 0 (``cut``), so its last, cut line is not graded on what is left and the complete lines
      before it earn nothing for a trace that failed.
    """
    out_scores, out_sources, seen = [], [], set()
    for k, sc, src in zip(keys, scores, sources):
        if truncated:
            out_scores.append(0.0)
            out_sources.append(SOURCE_CUT)
        elif k in seen:
            out_scores.append(0.0)
            out_sources.append(SOURCE_DUPLICATE)
        else:
            out_scores.append(sc)
            out_sources.append(src)
        seen.add(k)
    return out_scores, out_sources


def completion_lengths(completion_ids: Tensor, completion_mask: Tensor, pad_token_id: int | None) -> list[int]:
    """Number of generated tokens per row of TRL's right-padded batch.

    TRL's mask is 1 exactly on the generated ids (up to and including EOS). The one exception is
    ``mask_truncated_completions=True``, which zeroes the whole mask of a truncated row; there the length is
    the row up to its trailing padding. (Such a row gets zero advantage anyway, but its reward still counts
    in its group's statistics, as in TRL.)
    """
    lengths = []
    for ids, m in zip(completion_ids.tolist(), completion_mask.tolist()):
        n = int(sum(m))
        if n == 0:
            n = len(ids)
            while n > 0 and pad_token_id is not None and ids[n - 1] == pad_token_id:
                n -= 1
        lengths.append(n)
    return lengths


def process_slice(process_index: int, local_batch_size: int) -> slice:
    """This process's rows of a gathered batch: the same slice TRL's ``_generate_and_score_completions`` takes."""
    return slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)


def token_step_tensor(rows: Sequence[Sequence[int]], width: int) -> Tensor:
    """Ragged per-row token->step maps -> a [B, width] long tensor padded with -1."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"row {i}: token->step map has {len(r)} entries but the batch has only {width} columns")
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def step_metrics(rows: Sequence[RolloutScore]) -> dict[str, float]:
    """Batch metrics from scored rollouts: per-step-type mean reward, who decided the steps, format, accuracy.

    ``srpo/step_reward/<Key>``: mean step score of that step type (scored steps only) -- which checks
    the policy gets right. ``srpo/step_source/<source>``: share of examined steps decided by the
    verifier, the judge, a blend, the neutral fallback, or nobody (``none``) -- how much of the step
    signal rests on human facts versus a judge's opinion.
    """
    by_key: dict[str, list[float]] = defaultdict(list)
    sources: dict[str, int] = defaultdict(int)
    n_steps = 0
    for r in rows:
        for k, s, src in zip(r.step_keys, r.step_scores, r.step_sources):
            n_steps += 1
            sources[src] += 1
            if s is not None:
                by_key[k].append(s)
    n = max(len(rows), 1)
    out = {
        "srpo/outcome_reward": sum(r.outcome for r in rows) / n,
        "srpo/label_accuracy": sum(r.correct for r in rows) / n,
        "srpo/format_ok": sum(r.format_ok for r in rows) / n,
        "srpo/rewarded_steps_per_completion": sum(len(r.rewards) for r in rows) / n,
    }
    for k in sorted(by_key):
        out[f"srpo/step_reward/{k}"] = sum(by_key[k]) / len(by_key[k])
    if n_steps:
        for src in SOURCES:
            if src in sources or src in ("verifier", "judge", "neutral"):
                out[f"srpo/step_source/{src}"] = sources.get(src, 0) / n_steps
    return out


def collapse_metrics(rows: Sequence[RolloutScore], labels: Sequence[str], group_size: int) -> dict[str, float]:
    """Signs of a policy collapsing onto one label, from the training rollouts of one batch (pure).

    ``srpo/pred_share/<label>``: share of rollouts that give that label (``None``: no label);
    ``srpo/share_gap/<label>``: that share minus the share of the batch's gold labels that are it;
    ``srpo/recall/<label>``: per gold class, the share of its rollouts that give it (classes present only);
    ``srpo/train_macro_f1``: Macro F1 of the rollouts' labels over the classes present in gold or predictions;
    ``srpo/verdict_entropy``: mean entropy (nats) of the label distribution inside each rollout group (0 when
    every rollout of a prompt says the same thing); ``srpo/zero_var_groups``: share of groups whose verdicts are
    all right or all wrong (the 0/1 label reward has no variance there, so GRPO learns nothing from them; a
    graded outcome such as ``gold_logprob`` may still separate them, which is the point of it).
    """
    import math

    n = len(rows)
    if n == 0:
        return {}
    out: dict[str, float] = {}
    for lab in labels:
        out[f"srpo/pred_share/{lab}"] = sum(r.label == lab for r in rows) / n
    out["srpo/pred_share/none"] = sum(r.label not in labels for r in rows) / n
    for lab in labels:  # predicted minus gold share: what the share pin (share_pin) pulls back to 0
        out[f"srpo/share_gap/{lab}"] = out[f"srpo/pred_share/{lab}"] - sum(r.gold == lab for r in rows) / n
    f1s = []
    for lab in labels:
        tp = sum(r.label == lab and r.gold == lab for r in rows)
        n_gold = sum(r.gold == lab for r in rows)
        n_pred = sum(r.label == lab for r in rows)
        if n_gold:
            out[f"srpo/recall/{lab}"] = tp / n_gold
        if n_gold or n_pred:
            f1s.append(2 * tp / (n_gold + n_pred))
    out["srpo/train_macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    if group_size >= 1 and n % group_size == 0:
        ents, zero_var = [], 0
        for g in range(n // group_size):
            grp = rows[g * group_size:(g + 1) * group_size]
            counts: dict[str | None, int] = defaultdict(int)
            for r in grp:
                counts[r.label] += 1
            ents.append(-sum(c / group_size * math.log(c / group_size) for c in counts.values()))
            zero_var += len({r.correct for r in grp}) == 1
        out["srpo/verdict_entropy"] = sum(ents) / len(ents)
        out["srpo/zero_var_groups"] = zero_var / (n // group_size)
    return out


def expected_collapse_metrics(probs: Tensor, pred: Tensor, gold: Tensor, labels: Sequence[str],
                              group_size: int) -> dict[str, float]:
    """:func:`collapse_metrics`' class shares, share gaps and recalls, and the accuracy, as the policy's expectations
    over enumerated leaves (``probs`` [B]: each leaf's probability within its group; ``pred``/``gold`` class ids)."""
    prompts = probs.shape[0] // group_size
    if prompts == 0:
        return {}
    p = probs.float()
    golds = gold[::group_size]
    out = {"srpo/expected_accuracy": float((p * (pred == gold)).sum()) / prompts}
    for k, lab in enumerate(labels):
        out[f"srpo/pred_share/{lab}"] = float((p * (pred == k)).sum()) / prompts
        out[f"srpo/share_gap/{lab}"] = out[f"srpo/pred_share/{lab}"] - float((golds == k).sum()) / prompts
        n_gold = int((golds == k).sum())
        if n_gold:
            out[f"srpo/recall/{lab}"] = float((p * ((pred == k) & (gold == k))).sum()) / n_gold
    return out


def likelihood_metrics(rows: Sequence[RolloutScore]) -> dict[str, float]:
    """``srpo/gold_step_prob``: the policy's mean P(gold value) over the likelihood steps read in the batch (what
    ``srpo_likelihood`` sharpens; it should rise), and ``srpo/gold_step_read``: the share of rollouts with one."""
    values = [g[0] for r in rows for g in (r.step_gold or []) if g is not None]
    read = sum(any(g is not None for g in (r.step_gold or [])) for r in rows)
    out = {"srpo/gold_step_read": read / max(len(rows), 1)}
    if values:
        out["srpo/gold_step_prob"] = sum(values) / len(values)
    return out


def advantage_metrics(adv: Tensor, outcome_part: Tensor, mask: Tensor, correct: Tensor) -> dict[str, float]:
    """How the advantage of a batch is made up (pure; [B, T] tensors, ``correct`` [B] bool).

    ``srpo/step_advantage_abs_mean``: mean |A - A_out| over completion tokens; ``srpo/step_share``: the
    share of total |advantage| mass that comes from the step term; ``srpo/pos_adv_mass_wrong``: the share of
    total |advantage| mass that is *positive* advantage on tokens of wrong-verdict rollouts (0 by
    construction for the gated estimators; what farming the majority path looks like for the others).
    """
    m = mask.bool()
    if not m.any():
        return {}
    step = (adv - outcome_part)[m].abs()
    total = step.sum() + outcome_part[m].abs().sum()
    wrong = (~correct.bool())[:, None] & m
    pos_wrong = adv.clamp(min=0)[wrong].sum()
    mass = adv[m].abs().sum()
    return {
        "srpo/step_advantage_abs_mean": step.mean().item(),
        "srpo/step_share": (step.sum() / total).item() if total > 0 else 0.0,
        "srpo/pos_adv_mass_wrong": (pos_wrong / mass).item() if mass > 0 else 0.0,
    }


def class_weight_vector(golds: Sequence[str], class_weights: Mapping[str, float] | None) -> Tensor | None:
    """Per-row outcome weights from each row's gold class (None when no class weights are set)."""
    if class_weights is None:
        return None
    missing = sorted({g for g in golds if g not in class_weights})
    if missing:
        raise UserError(f"class_weights has no weight for gold label(s) {missing} (it has {sorted(class_weights)})")
    return torch.tensor([float(class_weights[g]) for g in golds], dtype=torch.float32)


def class_ids(labels: Sequence[str | None], classes: Sequence[str], *, what: str) -> Tensor:
    """Labels as indices into ``classes`` [B] (long); a label that is not a class (no verdict) is -1 for the
    predictions (``what="pred"``) and an error for anything else (a gold label must be a class)."""
    index = {c: k for k, c in enumerate(classes)}
    bad = sorted({str(x) for x in labels if x not in index})
    if bad and what != "pred":
        raise UserError(f"{what} label(s) {bad} are not among the classes {list(classes)}")
    return torch.tensor([index.get(x, -1) for x in labels], dtype=torch.long)  # type: ignore[arg-type]


def balanced_class_weights(labels: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    """Inverse-frequency weights ``n / (K * n_c)`` over the classes present (mean weight 1 over rows)."""
    counts = {c: sum(1 for x in labels if x == c) for c in classes}
    present = {c: k for c, k in counts.items() if k}
    if not present:
        raise UserError("balanced class weights need at least one labelled record")
    n, k = sum(present.values()), len(present)
    return {c: n / (k * present.get(c, n / k)) for c in classes}


# ------------------------------------------------------------------------------------------ trainer


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``max_bad_steps`` optimizer steps in a row: training cannot go on."""


@dataclass
class SRPOBatch:
    """What the last ``_generate_and_score_completions`` call computed (for tests, debugging, callbacks).

    ``rollouts``/``token_step``/``trl_advantages``/``advantages`` are this process's rows; ``outcome_rewards``
    and ``step_rewards`` are the gathered global batch the group statistics were computed on.
    """

    mode: str
    rollouts: list[RolloutScore]
    outcome_rewards: Tensor  # [B_global]
    step_rewards: list[list[float]] = field(default_factory=list)  # global, ragged
    step_keys: list[list[str]] = field(default_factory=list)  # global, ragged: the key of each rewarded step
    golds: list[str] = field(default_factory=list)  # global: each row's gold label
    preds: list[str | None] = field(default_factory=list)  # global: each row's verdict (None: none parsed)
    step_gold_probs: list[list[float]] = field(default_factory=list)  # global, ragged: P(gold value), NaN: none
    step_gold_right: list[list[bool]] = field(default_factory=list)  # global, ragged: sampled value == gold value
    step_gold_weights: list[list[float]] = field(default_factory=list)  # global, ragged: weight of the credit
    token_step: Tensor | None = None  # [B_local, T]
    trl_advantages: Tensor | None = None  # [B_local], TRL's own
    advantages: Tensor | None = None  # [B_local, T], what the loss uses
    leaf_logp: Tensor | None = None  # [B_global]: enumerated leaves' log-probabilities (exact estimators)
    ref_leaf_logp: Tensor | None = None  # [B_global]: the same under the reference model (a teacher's term)
    teacher_logp: Tensor | None = None  # [B_global]: log q of each leaf's verdict under the teacher


class SRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantage is SRPO's per-token (B, T) advantage; vanilla GRPO with ``step_rewards=False``.

    Arguments beyond ``GRPOTrainer``'s (which are passed through as keywords, except ``reward_funcs``: the
    trainer builds its own outcome reward so that TRL's advantage is exactly vanilla GRPO's):

    records_by_id: record id -> :class:`Record` (gold label and step facts), for a dataset with a
        ``record_id`` column (:func:`make_prompt_dataset`). Not needed when the dataset has a ``record``
        column of record JSON.
    examiner: scores steps (:mod:`she.rewards.hybrid`); default :class:`VerifierExaminer` (human facts only;
        steps it cannot check get no step reward rather than an invented neutral one).
    step_rewards: False = vanilla GRPO (the examiner, if any, is still run for the step metrics).
    advantage: the estimator, by name from :data:`she.algorithms.advantages.ESTIMATORS` (``grpo``,
        ``srpo_centered``, ``srpo_centered_pooled``, ``srpo_gated``, ``srpo_gated_min``); default
        ``srpo_gated`` with step rewards, ``grpo`` without. ``grpo`` without class weights is TRL's own advantage.
    alpha, credit_mode, critical, scale, first_error_weight, flawed_share, incorrect_below: the estimator's
        options (:class:`she.algorithms.advantages.AdvantageOptions`); ``scale`` follows ``args.scale_rewards``
        (``group`` -> True, ``none`` -> False).
    class_weights: ``{label: weight}`` on the group-normalised outcome advantage of a prompt with that gold
        label (after normalisation, where it does not cancel); the same for every estimator, GRPO included.
    share_pin: lambda of the share pin (:func:`she.algorithms.advantages.share_pin_shift`): a rollout's verdict
        class is paid ``-lambda * (its share of the batch's verdicts - its share of the batch's gold labels)``,
        centred in its group, on top of the outcome advantage; 0 (default) is off. Every estimator, GRPO included.
    schema, taxonomy: the step schema the policy writes (None: the built-in one of ``taxonomy``).
    partial_credit, format_weight: the outcome reward (:func:`rollout_outcome`).
    include_label_step: also give the verdict step a step reward (off: the outcome already covers it).
    reward_steps: step keys that may earn a step reward (None: every examined step). E.g. ``["Missing"]``: only
        the steps computed exactly from the strings, none of the label-derived Type/Attributes checks.
    outcome: the outcome reward: ``label`` (1 for the gold label, partial_credit/format_weight as set) or
        ``gold_prob`` (the policy's own P(gold label | prompt, its reasoning) at the verdict position,
        :mod:`she.training.gold_prob`: a graded outcome that separates rollouts with the same verdict), or
        ``gold_logprob`` (the same, linear in log P(gold) above a floor of -20 nats). The
        same number feeds TRL's reward function and SRPO's outcome term, so GRPO and SRPO see one outcome.
    reward_model: optional scalar reward model (:class:`she.training.reward_model.ScalarRewardModel`, or anything
        with ``score_records(records, completion_texts) -> list[float]``). When set, its score *replaces* the
        label outcome reward everywhere (TRL's reward function, hence GRPO's advantage, and SRPO's outcome
        term): scalar-RM GRPO with ``step_rewards=False``. ``correct``/label accuracy stay label-based metrics.
    rollout_sampler: ``inverse_cdf`` (default) or ``torch``: how rollouts are sampled on a CPU
        (she.models.generation; on other devices always torch's).
    rollout_prefill: ``shared`` (default): the prompt's forward pass made once for its G rollouts and its KV
        cache copied to them (she.models.generation.shared_prefill; the same tokens up to matmul rounding);
        ``per_rollout``: TRL's, every rollout computes its prompt. On a CPU only (measured and tested there; GPUs keep
        TRL's path, and vLLM caches prefixes itself).
    logp_prefix: how the loss, the reference model and the old/leaf log-probabilities score the rollouts:
        ``per_row`` (default, TRL's: every row a full sequence) or ``shared``: the rows that share a prompt packed
        into one sequence whose shared prefix is computed once (she.models.prefix_tree; the same log-probabilities
        and gradients up to matmul rounding, tests/test_prefix_tree.py).
    labelled_positions_only: TRL's fused LM head projects only the completion positions on a CPU too (the same
        values, she.training.lm_head); False: TRL's CPU path, every position; None (default): env
        ``SHE_LM_HEAD_POSITIONS`` (``labelled`` unless set to ``all``).
    max_bad_steps: an optimizer step whose loss is NaN/inf is skipped (gradients dropped, parameters and
        optimizer moments untouched, counted and logged); this many skipped steps *in a row* raise
        :class:`NonFiniteLossError` (one bad batch is noise, a streak means the run has diverged).
    dump_advantages_dir: debugging aid (default: env ``SHE_DUMP_ADVANTAGES``): every process writes, per
        generation round, a ``torch.save`` file with its advantages and the *global* row index of each
        local row (:meth:`dump_advantages`), so that runs on different process counts can be compared row
        by row (tests/test_distributed.py).
    """

    def __init__(
        self,
        model: Any,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        *,
        records_by_id: Mapping[str, Record] | None = None,
        examiner: StepExaminer | None = None,
        step_rewards: bool = True,
        advantage: str | None = None,
        alpha: float = 1.0,
        credit_mode: str = "broadcast",
        critical: Mapping[str, Any] | None = None,
        first_error_weight: float = 2.0,
        flawed_share: float = 0.5,
        incorrect_below: float = 0.5,
        class_weights: Mapping[str, float] | None = None,
        share_pin: float = 0.0,
        schema: StepSchema | None = None,
        taxonomy: str = "hd3",
        partial_credit: bool = False,
        format_weight: float = 0.0,
        include_label_step: bool = False,
        reward_steps: Sequence[str] | None = None,
        outcome: str = "label",
        reward_model: Any | None = None,
        likelihood_steps: Sequence[str] | None = None,
        likelihood_objective: str = "logprob",
        likelihood_clip: float = 4.0,
        likelihood_decouple: bool = True,
        likelihood_class_weights: str | Mapping[str, float] | None = None,
        rollout_sampler: str = "inverse_cdf",
        rollout_prefill: str = "shared",
        logp_prefix: str = "per_row",
        labelled_positions_only: bool | None = None,
        teacher_probs: Mapping[str, Mapping[str, float]] | None = None,
        teacher_weight: float = 1.0,
        teacher_beta: float = 2.0,
        max_bad_steps: int = 5,
        dump_advantages_dir: str | Path | None = None,
        **grpo_kwargs: Any,
    ) -> None:
        if "reward_funcs" in grpo_kwargs:
            raise ValueError(
                "SRPOTrainer builds its own reward function (the outcome reward, so that TRL's advantage is vanilla "
                "GRPO's and SRPO's outcome term uses the same numbers); do not pass reward_funcs"
            )
        if credit_mode not in CREDIT_MODES:
            raise UserError(f"credit_mode must be one of {CREDIT_MODES}, got {credit_mode!r}")
        self.schema = schema or default_schema(taxonomy)
        if schema is not None and schema.taxonomy != taxonomy:
            raise UserError(f"schema taxonomy {schema.taxonomy!r} differs from taxonomy={taxonomy!r}")
        self.taxonomy = taxonomy
        self.records_by_id = dict(records_by_id) if records_by_id is not None else None
        self.examiner = examiner if examiner is not None else VerifierExaminer()
        self.step_rewards = bool(step_rewards)
        self.advantage = advantage or ("srpo_gated" if self.step_rewards else "grpo")
        if self.advantage not in ESTIMATORS:
            raise UserError(f"advantage must be one of {sorted(ESTIMATORS)}, got {self.advantage!r}")
        if not self.step_rewards and self.advantage not in ("grpo", "grpo_exact"):
            raise UserError(f"step_rewards=False is vanilla GRPO; advantage={self.advantage!r} needs step rewards")
        self.class_weights = dict(class_weights) if class_weights is not None else None
        if isinstance(share_pin, bool) or not isinstance(share_pin, (int, float)) or not 0 <= share_pin < math.inf:
            raise UserError(f"share_pin must be a finite number >= 0, got {share_pin!r}")
        self.share_pin = float(share_pin)
        self.teacher_probs = {str(k): dict(v) for k, v in teacher_probs.items()} if teacher_probs is not None else None
        if self.teacher_probs is not None:
            if self.advantage not in EXACT_ESTIMATORS:
                raise UserError(f"a teacher's term is built for the exact estimators {EXACT_ESTIMATORS} (enumerated "
                                f"leaves), got advantage {self.advantage!r}")
            if not (0 <= teacher_weight < math.inf) or not (0 < teacher_beta < math.inf):
                raise UserError(f"teacher_weight must be >= 0 and teacher_beta > 0, got {teacher_weight} / {teacher_beta}")
            if not (args is not None and args.beta > 0):
                raise UserError("a teacher's term is KL-regularised towards the reference model: it needs beta > 0 "
                                "(the reference pass TRL runs only then)")
        self.teacher_weight = float(teacher_weight)
        self.teacher_beta = float(teacher_beta)
        self.first_error_weight = float(first_error_weight)
        self.flawed_share = float(flawed_share)
        self.incorrect_below = float(incorrect_below)
        self.alpha = float(alpha)
        self.credit_mode = credit_mode
        self.critical = dict(critical) if critical is not None else None
        self.partial_credit = partial_credit
        self.format_weight = float(format_weight)
        self.include_label_step = include_label_step
        self.reward_steps = None if reward_steps is None else frozenset(reward_steps)
        self.reward_model = reward_model
        if reward_model is not None and (partial_credit or self.format_weight):
            raise UserError("with a reward_model the RM score is the only outcome reward; "
                            "partial_credit and format_weight do not apply (turn them off)")
        if outcome not in OUTCOMES:
            raise UserError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if outcome != "label" and (reward_model is not None or partial_credit or self.format_weight):
            raise UserError(f"outcome={outcome!r} is the only outcome reward: reward_model, partial_credit and "
                            "format_weight do not apply (turn them off)")
        self.outcome = outcome
        self.gold_prob: GoldLabelProbability | None = None  # built after TRL's init (needs the policy)
        self.likelihood_steps = self._likelihood_steps(likelihood_steps)
        self.likelihood = dict(likelihood_objective=likelihood_objective, likelihood_clip=float(likelihood_clip),
                               likelihood_decouple=bool(likelihood_decouple))
        self.step_prob: GoldStepProbability | None = None  # srpo_likelihood: built after TRL's init
        self.likelihood_weights = self._likelihood_class_weights(likelihood_class_weights)
        if rollout_sampler not in ROLLOUT_SAMPLERS:
            raise UserError(f"rollout_sampler must be one of {ROLLOUT_SAMPLERS}, got {rollout_sampler!r}")
        self.rollout_sampler = rollout_sampler
        if rollout_prefill not in ROLLOUT_PREFILLS:
            raise UserError(f"rollout_prefill must be one of {ROLLOUT_PREFILLS}, got {rollout_prefill!r}")
        self.rollout_prefill = rollout_prefill
        if logp_prefix not in LOGP_PREFIXES:
            raise UserError(f"logp_prefix must be one of {LOGP_PREFIXES}, got {logp_prefix!r}")
        self.logp_prefix = logp_prefix
        self.labelled_positions_only = resolve_labelled_positions(labelled_positions_only)
        self._check_likelihood_rewarded()
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 1:
            raise UserError(f"max_bad_steps must be an integer >= 1, got {max_bad_steps!r}")
        self.max_bad_steps = max_bad_steps
        self.nonfinite_steps = 0  # optimizer steps skipped because the loss was not finite (whole run)
        self.consecutive_nonfinite_steps = 0
        self._window_nonfinite: float | None = None  # first non-finite loss seen in the current update window
        self._faults_seen: dict[str, int] = {}  # examiner fault totals already logged
        self.last_batch: SRPOBatch | None = None
        self._record_cache: dict[str, Record] = {}
        dump = dump_advantages_dir if dump_advantages_dir is not None else os.environ.get("SHE_DUMP_ADVANTAGES")
        self.dump_advantages_dir = Path(dump) if dump else None
        self._generation_rounds = 0
        if args is not None:
            self._check_args(args)
        if train_dataset is not None:
            self._check_dataset(train_dataset, "train_dataset")

        reward = self._make_reward_func()
        super().__init__(model=model, reward_funcs=[reward], args=args, train_dataset=train_dataset, **grpo_kwargs)
        self._check_args(self.args)
        self.scale = self.args.scale_rewards != "none"
        self.batch_scale = self.args.scale_rewards == "batch"
        if reward_model is not None and hasattr(reward_model, "to"):
            reward_model.to(self.accelerator.device)
        if outcome != "label":
            self.gold_prob = GoldLabelProbability(lambda: self.accelerator.unwrap_model(self.model),
                                                  self._tokenizer_for_decoding(), self.schema, bf16=bool(self.args.bf16),
                                                  log_floor=GOLD_LOG_FLOOR if outcome == "gold_logprob" else None,
                                                  tokenize_prompts=lambda prompts: self._tokenize_prompts(prompts)[0])
        if self.likelihood_steps:
            self.step_prob = GoldStepProbability(lambda: self.accelerator.unwrap_model(self.model),
                                                 self._tokenizer_for_decoding(), self.schema, self.likelihood_steps,
                                                 bf16=bool(self.args.bf16),
                                                 tokenize_prompts=lambda prompts: self._tokenize_prompts(prompts)[0])

    def _likelihood_steps(self, steps: Sequence[str] | None) -> list[str]:
        """The steps ``srpo_likelihood`` reads P(gold value) of: ``steps``, or the schema's first decision step
        (:data:`LIKELIHOOD_DEFAULTS`: the decision schema's ``Relevant``, else ``Type`` where facts annotate it)."""
        if self.advantage != "srpo_likelihood":
            if steps:
                raise UserError(f"likelihood_steps is for advantage 'srpo_likelihood', not {self.advantage!r}")
            return []
        if steps is None:
            keys = [st.key for st in self.schema.steps]
            found = [k for k in LIKELIHOOD_DEFAULTS if k in keys]
            if not found:
                raise UserError(f"advantage 'srpo_likelihood' reads one of the decision steps {LIKELIHOOD_DEFAULTS} by "
                                f"default; this schema has none ({keys}): set likelihood_steps (a choice step)")
            return found[:1]
        if not steps:
            raise UserError("likelihood_steps is empty: srpo_likelihood needs at least one choice step")
        return list(steps)

    def _likelihood_class_weights(self, spec: str | Mapping[str, float] | None) -> dict[str, dict[str, float]] | None:
        """``{step key: {gold value: weight}}`` on the likelihood credit, or None (all 1): ``balanced`` is
        ``n / (K n_v)`` over the training records' gold values of each likelihood step (K values seen: mean weight 1
        a record); a mapping ``{value: weight}`` applies to every likelihood step (values it leaves out weigh 1)."""
        if spec is None:
            return None
        if not self.likelihood_steps:
            raise UserError("likelihood_class_weights is for advantage 'srpo_likelihood'")
        if isinstance(spec, Mapping):
            bad = {v: w for v, w in spec.items()
                   if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0}
            if bad:
                raise UserError(f"likelihood_class_weights must map step values to finite numbers >= 0, got {bad}")
            if any(not isinstance(v, str) for v in spec):
                raise UserError(f"likelihood_class_weights keys are step values as strings, got {list(spec)} (in YAML "
                                "quote yes/no: unquoted they are read as booleans)")
            if self.records_by_id is not None:
                from she.rewards.verifier import choice_truth

                seen = {choice_truth(k, r) for k in self.likelihood_steps for r in self.records_by_id.values()}
                unknown = sorted(set(spec) - seen)
                if unknown:
                    raise UserError(f"likelihood_class_weights names {unknown}, which no training record has as the "
                                    f"gold value of {self.likelihood_steps} (values: {sorted(v for v in seen if v)})")
            return {k: dict(spec) for k in self.likelihood_steps}
        if spec != "balanced":
            raise UserError(f"likelihood_class_weights must be null, 'balanced' or {{value: weight}}, got {spec!r}")
        if self.records_by_id is None:
            raise UserError("likelihood_class_weights: balanced counts the training records' gold values: pass "
                            "records_by_id")
        from she.rewards.verifier import choice_truth

        out: dict[str, dict[str, float]] = {}
        for key in self.likelihood_steps:
            counts: dict[str, int] = defaultdict(int)
            for rec in self.records_by_id.values():
                value = choice_truth(key, rec)
                if value is not None:
                    counts[value] += 1
            n = sum(counts.values())
            out[key] = {v: n / (len(counts) * c) for v, c in counts.items()}
        return out

    def _likelihood_weight(self, key: str, record: Record) -> float:
        """The weight of a likelihood step's credit in a rollout of ``record`` (1 without class weights)."""
        if self.likelihood_weights is None:
            return 1.0
        from she.rewards.verifier import choice_truth

        return self.likelihood_weights.get(key, {}).get(choice_truth(key, record), 1.0)

    def _check_likelihood_rewarded(self) -> None:
        """A likelihood step left out of ``reward_steps`` has no token map, so it would get no credit: the run would
        be GRPO under another name."""
        left_out = [k for k in self.likelihood_steps if self.reward_steps is not None and k not in self.reward_steps]
        if left_out:
            raise UserError(f"likelihood_steps {left_out} are not in reward_steps {sorted(self.reward_steps)}: they "
                            "would get no credit; add them to reward_steps (or set reward_steps: null)")

    # -- setup checks ------------------------------------------------------------------------------

    def _check_args(self, args: GRPOConfig) -> None:
        if not self.step_rewards:
            return
        if args.scale_rewards not in ("group", "none", "batch"):
            raise UserError(f"scale_rewards={args.scale_rewards!r}: use 'group', 'batch' or 'none'")
        if args.scale_rewards == "batch" and self.advantage.startswith("srpo_centered"):
            raise UserError("scale_rewards='batch' is supported by the grpo and gated estimators only (the centred "
                            "ones normalise step rewards per group)")
        if getattr(args, "off_policy_mask_threshold", None) is not None or args.loss_type == "vespo":
            raise UserError(
                "off_policy_mask_threshold and loss_type='vespo' use the advantage's sign per *sequence*; with "
                "per-token SRPO advantages that is ill-defined. Use step_rewards=False or another loss."
            )

    def _check_dataset(self, dataset: Any, name: str) -> None:
        cols = set(getattr(dataset, "column_names", None) or [])
        if not cols:
            return  # an IterableDataset without known columns: rows are checked as they come
        if RECORD_JSON_COLUMN in cols:
            return
        if RECORD_ID_COLUMN not in cols:
            raise ValueError(
                f"{name} has neither a {RECORD_ID_COLUMN!r} nor a {RECORD_JSON_COLUMN!r} column (columns: "
                f"{sorted(cols)}); build it with make_prompt_dataset"
            )
        if self.records_by_id is None:
            raise ValueError(f"{name} has a {RECORD_ID_COLUMN!r} column: pass records_by_id")
        missing = [rid for rid in dataset[RECORD_ID_COLUMN] if rid not in self.records_by_id]
        if missing:
            raise ValueError(f"{name}: {len(missing)} record id(s) not in records_by_id, e.g. {missing[:3]}")

    # -- records and rewards -----------------------------------------------------------------------

    def resolve_record(self, row: Mapping[str, Any]) -> Record:
        """The record behind one dataset row (``record`` JSON column, else ``record_id`` + ``records_by_id``)."""
        if row.get(RECORD_JSON_COLUMN) is not None:
            raw = row[RECORD_JSON_COLUMN]
            key = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)
            if key not in self._record_cache:  # every rollout of a prompt carries the same JSON: parse once
                try:
                    self._record_cache[key] = Record.from_dict(json.loads(raw) if isinstance(raw, str) else dict(raw))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"column {RECORD_JSON_COLUMN!r}: bad record JSON: {e}") from None
            rec = self._record_cache[key]
        else:
            if RECORD_ID_COLUMN not in row:
                raise ValueError(f"dataset row has neither {RECORD_JSON_COLUMN!r} nor {RECORD_ID_COLUMN!r}: {sorted(row)}")
            rid = str(row[RECORD_ID_COLUMN])
            if self.records_by_id is None or rid not in self.records_by_id:
                raise ValueError(f"record id {rid!r} is not in records_by_id")
            rec = self.records_by_id[rid]
        if rec.label is None:
            raise UserError(f"record {rec.id}: no gold label")
        if rec.taxonomy != self.taxonomy:
            raise UserError(f"record {rec.id}: taxonomy {rec.taxonomy!r}, but the trainer uses {self.taxonomy!r}")
        return rec

    def _reward_inputs(self, completions: list, kwargs: Mapping[str, Any]) -> tuple[list[Record], list[str]]:
        """The records and completion texts behind one call of a TRL reward function."""
        columns = [k for k in (RECORD_JSON_COLUMN, RECORD_ID_COLUMN) if k in kwargs]
        if not columns:
            raise ValueError(f"reward function: no {RECORD_ID_COLUMN!r}/{RECORD_JSON_COLUMN!r} column in {sorted(kwargs)}")
        records = [self.resolve_record({k: kwargs[k][i] for k in columns}) for i in range(len(completions))]
        return records, [c[-1]["content"] if isinstance(c, list) else c for c in completions]

    def _make_reward_func(self) -> Callable[..., list[float]]:
        """TRL reward function: the outcome reward of each completion, logged by TRL under its name:
        ``rewards/outcome`` (the label reward), ``rewards/gold_prob`` (``outcome="gold_prob"``) or
        ``rewards/reward_model`` (a reward model's score)."""

        def outcome(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            records, texts = self._reward_inputs(completions, kwargs)
            return [rollout_outcome(text, rec, self.schema, partial_credit=self.partial_credit,
                                    format_weight=self.format_weight)[0] for text, rec in zip(texts, records)]

        def gold_prob(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            records, texts = self._reward_inputs(completions, kwargs)
            return self.gold_prob.score(prompts, texts, records)

        def reward_model(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            records, texts = self._reward_inputs(completions, kwargs)
            return [float(x) for x in self.reward_model.score_records(records, texts)]

        outcome.__name__ = OUTCOME_REWARD_NAME
        if self.reward_model is not None:
            return reward_model
        gold_prob.__name__ = self.outcome  # rewards/gold_prob or rewards/gold_logprob
        return outcome if self.outcome == "label" else gold_prob

    # -- scoring -----------------------------------------------------------------------------------

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        """TRL's generation inside one bf16 autocast region (the weights cast once a call, not once a token: the same
        tokens), with ``rollout_sampler="inverse_cdf"`` sampling by inversion (the same distribution, faster on a
        CPU), with ``rollout_prefill="shared"`` each prompt's forward pass made once for its G rollouts, and on a CPU
        the decoding attention, KV cache and prepacked linear layers of ``fast_decoding`` (``SHE_DECODING=plain``
        turns them off): she.models.generation, measured in docs/benchmarks.md ("Rollout generation")."""
        model = self.accelerator.unwrap_model(self.model_wrapped)  # what TRL's generation calls generate on
        with generation_autocast(bool(self.args.bf16) and not self.use_vllm, self.accelerator.device), \
                fast_sampling(self.rollout_sampler == "inverse_cdf" and not self.use_vllm
                              and self.accelerator.device.type == "cpu"), \
                shared_prefill(model, self.rollout_prefill == "shared" and not self.use_vllm
                               and self.accelerator.device.type == "cpu"), \
                fast_decoding(model, False if self.use_vllm else None, pack=bool(self.args.bf16)):  # CPU only
            return super()._generate_single_turn(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Tensor, attention_mask: Tensor,
                                           logits_to_keep: int, batch_size: int | None = None,
                                           compute_entropy: bool = False, compute_aux_loss: bool = False,
                                           **multimodal: Any):
        """TRL's log-probabilities of the completion tokens (the policy's in the loss, the reference model's in
        scoring), with its fused LM head projecting only the completion positions on a CPU too, as it does on a GPU
        (she.training.lm_head: the same values; ``labelled_positions_only=False`` restores TRL's CPU path); with
        ``logp_prefix="shared"`` (text-only models) the rows that share a prompt scored as one packed sequence."""
        with labelled_positions_only(self.labelled_positions_only):
            if self.logp_prefix == "shared" and not compute_aux_loss \
                    and all(v is None for v in multimodal.values()):
                return self._packed_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)

    def _packed_logps(self, model: Any, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int,
                      compute_entropy: bool) -> tuple[Tensor, Tensor | None, None]:
        """TRL's per-token outputs [B, logits_to_keep] from one forward pass over the packed prefix tree of the
        batch (she.models.prefix_tree): each group of rows with the same prompt is one sequence, its shared prefix
        computed once, its rows' own tokens as segments that see the prefix and themselves."""
        pad = self._tokenizer_for_decoding().pad_token_id or 0
        packing = pack_shared_prefixes(input_ids.cpu(), attention_mask.cpu(), logits_to_keep, pad_token_id=pad)
        device = input_ids.device
        attention = model_attention(self.accelerator.unwrap_model(model), packing.attention.to(device))
        with self.accelerator.autocast():
            out = model(input_ids=packing.input_ids.to(device), attention_mask=attention,
                        position_ids=packing.position_ids.to(device), shift_labels=packing.shift_labels.to(device),
                        fused_lm_head=True)
        logps = unpack(out.log_probs, packing)
        entropy = unpack(out.entropy, packing) if compute_entropy else None
        return logps, entropy, None

    def _tokenizer_for_decoding(self):
        tok = self.processing_class
        return getattr(tok, "tokenizer", tok)  # a multimodal processor wraps the tokenizer

    def score_rollouts(self, inputs: Sequence[Mapping[str, Any]], completion_ids: Tensor, completion_mask: Tensor,
                       *, with_token_steps: bool = True) -> list[RolloutScore]:
        """Decode, parse, examine and (optionally) map tokens to steps for this process's completions.

        Decoding uses ``skip_special_tokens=True``, as TRL does for the reward functions, so the parsed text
        is the text the outcome reward saw; token->step maps are built from the same ids and checked against
        that text (``token_steps_for_completion(..., text=...)``).
        """
        tok = self._tokenizer_for_decoding()
        if len(inputs) != completion_ids.shape[0]:
            raise RuntimeError(f"{len(inputs)} input rows but {completion_ids.shape[0]} completions")
        lengths = completion_lengths(completion_ids, completion_mask, tok.pad_token_id)
        ids_rows = [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]
        records = [self.resolve_record(x) for x in inputs]
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in ids_rows]
        parsed_rows, outcomes = [], []
        for text, rec in zip(texts, records):
            reward, parsed = rollout_outcome(text, rec, self.schema, partial_credit=self.partial_credit,
                                             format_weight=self.format_weight)
            parsed_rows.append(parsed)
            outcomes.append(reward)
        if self.reward_model is not None:  # the RM score is the outcome (same call as TRL's: memoised)
            outcomes = [float(x) for x in self.reward_model.score_records(records, texts)]
        elif self.gold_prob is not None:  # P(gold): the same call as TRL's reward function (memoised)
            outcomes = self.gold_prob.score([x["prompt"] for x in inputs], texts, records)
        examined = [examined_step_indices(p, self.include_label_step) for p in parsed_rows]
        scores: list[StepScores] = examine_batch(self.examiner, list(zip(parsed_rows, records)))
        ends = {*getattr(self, "eos_token_ids", [tok.eos_token_id]), tok.pad_token_id} - {None}
        gold_by_step = (self.step_prob.score([x["prompt"] for x in inputs], texts, records, parsed_rows)
                        if self.step_prob is not None else [{} for _ in texts])
        rows = []
        for i, (p, rec, idx, sc) in enumerate(zip(parsed_rows, records, examined, scores)):
            keys = [p.steps[k].key for k in idx]
            truncated = not ids_rows[i] or ids_rows[i][-1] not in ends
            step_scores, sources = apply_trace_rules(keys, [sc.scores[k] for k in idx], [sc.sources[k] for k in idx],
                                                     truncated=truncated)
            if self.reward_steps is not None:  # only these step types earn a step reward
                step_scores = [s if key in self.reward_steps else None for key, s in zip(keys, step_scores)]
            # P(gold value) of a likelihood step, unless the trace rules zeroed the step (cut, duplicate): its
            # score then says nothing about the value sampled, and it gets the outcome only
            step_gold = [gold_by_step[i].get(k) if src not in (SOURCE_CUT, SOURCE_DUPLICATE) else None
                         for k, src in zip(idx, sources)]
            step_gold = [None if g is None else (*g[:2], self._likelihood_weight(key, rec))
                         for g, key in zip(step_gold, keys)]
            token_step = None
            if with_token_steps:
                spans = [credit_span(texts[i], p.steps[k].span) for k, s in zip(idx, step_scores) if s is not None]
                token_step = token_steps_for_completion(tok, ids_rows[i], spans, text=texts[i], skip_special_tokens=True)
            rows.append(RolloutScore(
                text=texts[i], label=p.label, gold=rec.label, outcome=outcomes[i], correct=p.label == rec.label,
                format_ok=p.format_ok, step_keys=keys, step_scores=step_scores, step_sources=sources,
                token_step=token_step, truncated=truncated, step_gold=step_gold,
            ))
        return rows

    # -- the hook ----------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else (self.num_generations_eval or self.num_generations)
        trl_adv = output["advantages"]
        mask = output["completion_mask"]
        if trl_adv.dim() != 1 or trl_adv.shape[0] != mask.shape[0]:
            raise RuntimeError(
                f"TRL returned advantages of shape {tuple(trl_adv.shape)} for completion_mask {tuple(mask.shape)}; "
                "SRPOTrainer expects [B_local] (see tests/test_trl_contract.py)"
            )
        own = self.advantage != "grpo" or self.class_weights is not None or self.share_pin > 0
        rows = self.score_rollouts(inputs, output["completion_ids"], mask,
                                   with_token_steps=self.advantage not in ("grpo", "grpo_exact"))
        if self.gold_prob is not None:
            self.gold_prob.forget()  # the memo served TRL's reward call and score_rollouts; the weights move next
        batch = self._gather_rows(rows, mode)
        batch.trl_advantages = trl_adv.detach().clone()
        if self.advantage in EXACT_ESTIMATORS:  # enumerated leaves: their probabilities weigh them (no gradient)
            batch.leaf_logp = self.accelerator.gather(self._leaf_logps(output)).cpu()
            if self.teacher_probs is not None:  # the reference's leaf log-probabilities, the teacher's of each leaf
                batch.ref_leaf_logp = self.accelerator.gather(
                    self._leaf_logps(output, output["ref_per_token_logps"])).cpu()
                batch.teacher_logp = self.accelerator.gather(
                    self._teacher_logps(inputs, rows).to(batch.leaf_logp.device)).cpu()
        if own:
            adv = self._srpo_local_advantages(rows, mask, group_size, batch, mode)
        else:
            adv = trl_adv[:, None] * mask.to(trl_adv.dtype)  # vanilla GRPO, broadcast over the tokens
        batch.advantages = adv
        self.last_batch = batch
        output["advantages"] = adv
        if self.dump_advantages_dir is not None:
            self.dump_advantages(batch, inputs, mask)
        self._generation_rounds += 1
        return output

    def _leaf_logps(self, output: Mapping[str, Any], per_token_logps: Tensor | None = None) -> Tensor:
        """log pi of each (enumerated) completion [B_local]: the sum over its trained tokens (the env mask's 1s) of
        the policy's token log-probabilities, one no-gradient forward pass as TRL's for its old log-probabilities
        (or of ``per_token_logps`` when given: the reference model's, which TRL computed already)."""
        completion_ids, mask = output["completion_ids"], output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        if per_token_logps is None:
            ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
            attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            with torch.no_grad():
                per_token_logps = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, completion_ids.shape[1],
                    batch_size=self.args.per_device_train_batch_size)[0]
        return (per_token_logps.float() * mask.float()).sum(dim=1)

    def _teacher_logps(self, inputs: Sequence[Mapping[str, Any]], rows: Sequence[RolloutScore]) -> Tensor:
        """log q [B_local] of each leaf's verdict under the teacher (``teacher_probs[record id][label]``, floored
        at 1e-6); a record the teacher did not read, or a leaf without a verdict, is an internal error here (the
        job reads every prompt's record and every enumerated leaf ends with a label)."""
        out = []
        for row, score in zip(inputs, rows):
            rid = str(self.resolve_record(row).id)
            probs = self.teacher_probs.get(rid)
            if probs is None or score.label not in probs:
                raise RuntimeError(f"teacher has no probability for record {rid!r}, label {score.label!r}")
            out.append(math.log(max(float(probs[score.label]), 1e-6)))
        return torch.tensor(out, dtype=torch.float32)

    def dump_advantages(self, batch: SRPOBatch, inputs: Sequence[Mapping[str, Any]], mask: Tensor) -> Path:
        """Write this process's part of the current generation round to ``dump_advantages_dir``.

        File ``adv-r{round:05d}-p{process:03d}.pt`` (a ``torch.load``-able dict): ``rows`` (the global row
        index of each local row: TRL's ``process_slice``), ``advantages`` [B_local, T_local],
        ``completion_mask``, ``trl_advantages``, ``texts``, ``record_ids``, the gathered ``outcome_rewards``
        and ``step_rewards``, and ``round``, ``global_step``, ``process_index``, ``num_processes``. Purely
        additive: training never reads it back.
        """
        acc = self.accelerator
        b_local = mask.shape[0]
        d = self.dump_advantages_dir
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"adv-r{self._generation_rounds:05d}-p{acc.process_index:03d}.pt"
        torch.save({
            "round": self._generation_rounds, "global_step": int(self.state.global_step),
            "process_index": acc.process_index, "num_processes": acc.num_processes,
            "rows": torch.arange(b_local) + acc.process_index * b_local,
            "advantages": batch.advantages.detach().cpu(), "completion_mask": mask.detach().cpu(),
            "trl_advantages": None if batch.trl_advantages is None else batch.trl_advantages.detach().cpu(),
            "texts": [r.text for r in batch.rollouts],
            "record_ids": [str(x.get(RECORD_ID_COLUMN, "")) for x in inputs],
            "outcome_rewards": batch.outcome_rewards.detach().cpu(), "step_rewards": batch.step_rewards,
        }, path)
        return path

    def _gather_rows(self, rows: list[RolloutScore], mode: str) -> SRPOBatch:
        """Gather scored rollouts of all processes (small Python objects) and log global step metrics."""
        from accelerate.utils import gather_object

        light = [RolloutScore(r.text, r.label, r.gold, r.outcome, r.correct, r.format_ok, r.step_keys,
                              r.step_scores, r.step_sources, truncated=r.truncated, step_gold=r.step_gold)
                 for r in rows]  # token maps stay local
        all_rows: list[RolloutScore] = gather_object(light)
        group = self.num_generations if mode == "train" else (self.num_generations_eval or self.num_generations)
        metrics = {**step_metrics(all_rows), **collapse_metrics(all_rows, self.schema.labels, group)}
        metrics["srpo/truncated"] = sum(r.truncated for r in all_rows) / max(len(all_rows), 1)
        if self.step_prob is not None:
            metrics.update(likelihood_metrics(all_rows))
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if all_rows and len(all_rows) % group == 0:  # reasoning-path diversity inside rollout groups
            from she.reasoning.paths import mean_group_path_diversity

            self._metrics[mode]["srpo/path_diversity"].append(
                mean_group_path_diversity([r.text for r in all_rows], group, self.schema))
        self._log_examiner_faults(mode)
        self._log_examiner_metrics(mode)
        device = self.accelerator.device
        outcome_all = self.accelerator.gather(torch.tensor([r.outcome for r in rows], dtype=torch.float32, device=device))
        return SRPOBatch(mode=mode, rollouts=rows, outcome_rewards=outcome_all.cpu(),
                         step_rewards=[r.rewards for r in all_rows], step_keys=[r.reward_keys for r in all_rows],
                         golds=[r.gold for r in all_rows], preds=[r.label for r in all_rows],
                         step_gold_probs=[r.gold_probs for r in all_rows],
                         step_gold_right=[r.gold_right for r in all_rows],
                         step_gold_weights=[r.gold_weights for r in all_rows])

    def _log_examiner_metrics(self, mode: str) -> None:
        """Log an examiner's own ``metrics()`` (e.g. how many steps facts annotated during the run decided,
        :class:`she.rewards.live_facts.LiveFactsExaminer`): counts summed over processes, others their max."""
        fn = getattr(self.examiner, "metrics", None)
        if not callable(fn):
            return
        values = dict(fn())
        if not values:
            return
        keys = sorted(values)
        local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float32, device=self.accelerator.device)
        every = self.accelerator.gather(local).view(-1, len(keys))
        for j, k in enumerate(keys):
            col = every[:, j]
            self._metrics[mode][k].append(float(col.sum() if "decisions" in k else col.max()))

    def _log_examiner_faults(self, mode: str) -> None:
        """Log ``judge/faults/<kind>``: examiner faults (e.g. remote-judge timeouts) since the last batch,
        summed over processes. Nothing is logged for examiners that keep no ``fault_counts``."""
        counts = fault_counts(self.examiner)
        if not counts:
            return
        keys = sorted(counts)
        local = torch.tensor([counts[k] for k in keys], dtype=torch.long, device=self.accelerator.device)
        total = self.accelerator.gather(local).view(-1, len(keys)).sum(0).tolist()
        for k, v in zip(keys, total):
            self._metrics[mode][f"judge/faults/{k}"].append(float(v - self._faults_seen.get(k, 0)))
            self._faults_seen[k] = int(v)

    # -- non-finite losses -------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """TRL's step (forward + backward), then: drop the gradients of an update whose loss is not finite.

        Why here: ``Trainer`` calls ``optimizer.step()`` unconditionally after the last micro-batch of an
        update, and ``backward`` of a NaN loss has already written NaN gradients. Setting every ``.grad``
        to ``None`` makes that step a no-op for the parameters *and* for AdamW's moments and step count
        (torch optimizers skip parameters without a gradient, weight decay included), so the bad batch
        leaves no trace. Once a micro-batch is bad, the rest of its accumulation window is dropped too
        (half an update is not the update that was asked for). The decision is taken over all processes
        at the last micro-batch, because DDP's all-reduce would spread one process's NaN to every rank.
        The learning-rate schedule still advances (the step happened; it just changed nothing).
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._window_nonfinite is None and not bool(torch.isfinite(loss).all()):
            self._window_nonfinite = float(loss.detach().float().reshape(-1)[0].item())
        if self._window_nonfinite is not None:
            model.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self._end_update_window(model)
        return loss

    def _end_update_window(self, model: Any) -> None:
        bad_value = self._window_nonfinite
        self._window_nonfinite = None
        bad = bad_value is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([int(bad)], dtype=torch.long, device=self.accelerator.device)
            bad = bool(self.accelerator.gather(flag).sum().item())
            if bad:
                model.zero_grad(set_to_none=True)
        self._metrics["train"]["srpo/nonfinite_loss_skipped"].append(float(bad))
        if not bad:
            self.consecutive_nonfinite_steps = 0
            return
        step = self.state.global_step + 1  # the Trainer increments global_step after the optimizer step
        self.nonfinite_steps += 1
        self.consecutive_nonfinite_steps += 1
        what = f"loss {bad_value}" if bad_value is not None else "a non-finite loss on another process"
        log.warning("step %d: %s; optimizer update skipped (%d in a row, limit max_bad_steps=%d; %d in this run)",
                    step, what, self.consecutive_nonfinite_steps, self.max_bad_steps, self.nonfinite_steps)
        if self.consecutive_nonfinite_steps >= self.max_bad_steps:
            first = step - self.consecutive_nonfinite_steps + 1
            raise NonFiniteLossError(
                f"the loss was not finite in {self.consecutive_nonfinite_steps} consecutive optimizer steps "
                f"(steps {first}-{step}, max_bad_steps={self.max_bad_steps}); stopping. The weights are still those "
                f"after step {first - 1} and the checkpoints in {self.args.output_dir} are untouched. Usual causes: "
                "a learning rate too high, bf16 overflow, or rewards/advantages out of range."
            )

    def _log_expected_shares(self, probs: Tensor, pred: Tensor, gold: Tensor, group_size: int, mode: str) -> None:
        """Enumerated leaves are every verdict once, so their sampled shares say nothing: the class shares, gaps and
        recalls :func:`collapse_metrics` logged for this round are replaced by the policy's expected ones."""
        for name, value in expected_collapse_metrics(probs, pred, gold, self.schema.labels, group_size).items():
            logged = self._metrics[mode][name]
            if logged:
                logged[-1] = value
            else:
                logged.append(value)

    def _srpo_local_advantages(self, rows: list[RolloutScore], mask: Tensor, group_size: int, batch: SRPOBatch,
                               mode: str) -> Tensor:
        acc = self.accelerator
        device = mask.device
        b_local, t_local = mask.shape
        token_step = token_step_tensor([r.token_step or [] for r in rows], t_local).to(device)
        correct = torch.tensor([r.correct for r in rows], dtype=torch.long, device=device)  # NCCL-safe dtype
        # pad the time dimension to the longest process, then gather: every process sees the global batch
        token_step_all = acc.gather(acc.pad_across_processes(token_step, dim=1, pad_index=-1)).cpu()
        mask_all = acc.gather(acc.pad_across_processes(mask, dim=1, pad_index=0)).cpu()
        correct_all = acc.gather(correct).cpu()
        keys = {st.key: k for k, st in enumerate(self.schema.steps)}
        shift = None
        labels = self.schema.labels
        if batch.leaf_logp is not None:  # enumerated leaves: expected class shares, the pin centred under pi
            probs = leaf_probabilities(batch.leaf_logp, group_size)
            pred, gold = class_ids(batch.preds, labels, what="pred"), class_ids(batch.golds, labels, what="gold")
            self._log_expected_shares(probs, pred, gold, group_size, mode)
            if self.share_pin > 0:
                shift = expected_share_pin(probs, pred, gold, len(labels), group_size, self.share_pin)
            if batch.teacher_logp is not None:  # the teacher's KL-regularised term, centred under pi like the pin
                h = teacher_leaf_term(batch.leaf_logp, batch.ref_leaf_logp, batch.teacher_logp, group_size,
                                      self.teacher_beta)
                log_ratio = (batch.teacher_logp - h) / self.teacher_beta  # log pi - log pi_ref, per leaf
                self._metrics[mode]["srpo/teacher_kl"].append(float((probs * log_ratio).sum()) * group_size
                                                              / probs.numel())  # mean KL(pi || pi_ref) a prompt
                shift = self.teacher_weight * h + (shift if shift is not None else 0.0)
        elif self.share_pin > 0:
            shift = share_pin_shift(class_ids(batch.preds, labels, what="pred"),
                                    class_ids(batch.golds, labels, what="gold"), len(labels), group_size,
                                    self.share_pin)
            self._metrics[mode]["srpo/share_pin_abs"].append(float(shift.abs().mean()))
        adv, stats = local_srpo_advantages(
            batch.outcome_rewards, batch.step_rewards, token_step_all, mask_all, correct_all, group_size,
            process_index=acc.process_index, local_shape=(b_local, t_local), estimator=self.advantage,
            options=AdvantageOptions(alpha=self.alpha, credit_mode=self.credit_mode, critical=self.critical,
                                     scale=self.scale, batch_scale=self.batch_scale,
                                     first_error_weight=self.first_error_weight,
                                     flawed_share=self.flawed_share, incorrect_below=self.incorrect_below,
                                     **self.likelihood),
            step_types_all=[[keys.get(k, len(keys)) for k in row] for row in batch.step_keys],
            outcome_weight=class_weight_vector(batch.golds, self.class_weights), outcome_shift=shift,
            step_gold_all=batch.step_gold_probs if self.step_prob is not None else None,
            step_right_all=batch.step_gold_right if self.step_prob is not None else None,
            step_weight_all=batch.step_gold_weights if self.likelihood_weights is not None else None,
            leaf_logp_all=batch.leaf_logp,
        )
        for name, value in stats.items():
            self._metrics[mode][name].append(value)
        batch.token_step = token_step
        return adv.to(device=device, dtype=torch.float32)


def _ragged(rows: Sequence[Sequence[Any]] | None, step_mask: Tensor, fill: Any, dtype: torch.dtype,
            what: str) -> Tensor | None:
    """Ragged per-rollout values of the rewarded steps -> [B, S] like ``step_mask`` (``fill`` in the padding)."""
    if rows is None:
        return None
    out = torch.full(step_mask.shape, fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row) != int(step_mask[i].sum()):
            raise ValueError(f"row {i}: {len(row)} {what} for {int(step_mask[i].sum())} step rewards")
        out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def local_srpo_advantages(
    outcome_all: Tensor,
    step_rewards_all: Sequence[Sequence[float]],
    token_step_all: Tensor,
    mask_all: Tensor,
    correct_all: Tensor,
    group_size: int,
    *,
    process_index: int,
    local_shape: tuple[int, int],
    estimator: str = "srpo_gated",
    options: AdvantageOptions | None = None,
    step_types_all: Sequence[Sequence[int]] | None = None,
    outcome_weight: Tensor | None = None,
    outcome_shift: Tensor | None = None,
    step_gold_all: Sequence[Sequence[float]] | None = None,
    step_right_all: Sequence[Sequence[bool]] | None = None,
    step_weight_all: Sequence[Sequence[float]] | None = None,
    leaf_logp_all: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Advantages of ``estimator`` over the gathered batch, then this process's [B_local, T_local] part (pure).

    Inputs are what every process holds after gathering: ``outcome_all`` [B], ``step_rewards_all`` (ragged,
    B rows, in process order) and ``step_types_all`` (the same shape: schema step ids), ``token_step_all``/
    ``mask_all`` [B, T_max] (each process's rows padded on the right to the longest process's T with -1 / 0,
    as ``accelerator.pad_across_processes`` does), ``correct_all`` [B] (label right), ``outcome_weight`` [B]
    (class-aware weights, or None), ``outcome_shift`` [B] (the share pin's term, or None) and ``step_gold_all``
    (ragged like the step rewards: P(gold value), NaN where a step has none; for ``srpo_likelihood``, with
    ``step_right_all``: whether each step's sampled value is the gold one; ``step_weight_all``: the weight of each
    step's credit; ``leaf_logp_all`` [B]: enumerated leaves' log-probabilities, for the exact estimators). Groups may straddle processes; their statistics are computed on the
    whole group here. Returns (local advantages, :func:`advantage_metrics` of the global batch).
    """
    b_local, t_local = local_shape
    if token_step_all.shape[1] < t_local:
        raise ValueError(f"gathered token maps have {token_step_all.shape[1]} columns, fewer than T_local={t_local}")
    opts = options or AdvantageOptions()
    step_values, step_mask = pad_step_rewards(step_rewards_all)
    step_type = _ragged(step_types_all, step_mask, -1, torch.long, "step types")
    step_gold = _ragged(step_gold_all, step_mask, math.nan, torch.float32, "gold probabilities")
    step_right = _ragged(step_right_all, step_mask, False, torch.bool, "right/wrong flags")
    step_weight = _ragged(step_weight_all, step_mask, 1.0, torch.float32, "credit weights")
    x = AdvantageInputs(outcome_all, step_values, step_mask, token_step_all, mask_all, group_size,
                        outcome_correct=correct_all.bool(), step_type=step_type, outcome_weight=outcome_weight,
                        outcome_shift=outcome_shift,
                        step_gold_prob=step_gold, step_gold_right=step_right, step_gold_weight=step_weight,
                        leaf_logp=leaf_logp_all)
    adv_all = compute_advantages(estimator, x, opts)
    outcome_part = outcome_advantage(outcome_all, group_size, outcome_weight, eps=opts.eps, scale=opts.scale,
                                     batch_scale=opts.batch_scale, shift=outcome_shift)[:, None] * mask_all.float()
    stats = advantage_metrics(adv_all, outcome_part, mask_all, correct_all)
    return adv_all[process_slice(process_index, b_local), :t_local], stats


__all__ = [
    "NonFiniteLossError",
    "OUTCOME_REWARD_NAME",
    "RECORD_ID_COLUMN",
    "RECORD_JSON_COLUMN",
    "RolloutScore",
    "SRPOBatch",
    "SRPOTrainer",
    "build_grpo_config",
    "completion_lengths",
    "examined_step_indices",
    "expected_collapse_metrics",
    "advantage_metrics",
    "apply_trace_rules",
    "balanced_class_weights",
    "class_ids",
    "class_weight_vector",
    "collapse_metrics",
    "credit_span",
    "likelihood_metrics",
    "local_srpo_advantages",
    "make_prompt_dataset",
    "process_slice",
    "rollout_outcome",
    "step_metrics",
    "token_step_tensor",
]
