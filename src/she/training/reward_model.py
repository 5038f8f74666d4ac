"""``she train rm`` and scalar-RM GRPO: the classic RLHF baseline, a thin adapter over TRL's ``RewardTrainer``.

1. **Training.** The same pass@N pairs as DPO (:mod:`she.training.pairs`: chosen = a rollout with the
   right label, rejected = one with a wrong label) train a sequence classifier with one output
   (``AutoModelForSequenceClassification``, ``num_labels=1``) with TRL's Bradley-Terry loss
   ``-log sigmoid(r(chosen) - r(rejected))``. The base is the SFT checkpoint by default (it already reads
   the prompt and the step format), or any registry name/folder; its LM head is replaced by a fresh
   scalar head.
2. **Use.** :class:`ScalarRewardModel` loads the saved folder and scores (prompt, completion) pairs with
   exactly the text the RM was trained on: ``tokenizer.apply_chat_template(prompt + [assistant turn])``,
   which is what TRL's ``RewardTrainer`` tokenises. Passed to :class:`she.training.srpo.SRPOTrainer` as
   ``reward_model=...`` (``RLJobConfig.reward_model``) it *replaces* the label outcome reward: GRPO's
   group-normalised advantage is then computed from RM scores -- "scalar-RM GRPO", the RLHF recipe in
   the same harness as GRPO and SRPO.

Why the RM sees the record rebuilt with *its own* prompt style and step schema (``she.json``) rather than
whatever prompt the RL run uses: an RM is only calibrated on the input format it was trained on. Scoring by
record keeps it on that format even when an RL config picks another prompt style for the policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from she.config import RewardModelJobConfig
from she.data.schema import Record
from she.errors import UserError
from she.models.metadata import schema_of
from she.reasoning.schema import StepSchema, resolve_schema

log = logging.getLogger(__name__)

RM_KIND = "scalar_rm"


def build_reward_config(cfg: RewardModelJobConfig, output_dir: str | Path):
    """A TRL ``RewardConfig`` from the job config (CPU without CUDA, bf16 only where supported)."""
    from trl import RewardConfig

    from she.training.trainer_setup import common_training_args

    return RewardConfig(
        **common_training_args(cfg, output_dir),
        warmup_steps=cfg.warmup_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
    )


def load_rm_base(name_or_dir: str, seed: int = 0):
    """(sequence-classification model with one output, tokenizer) from a causal-LM folder or registry name.

    The backbone weights come from the folder; the scalar head is new (seeded). The model's pad id is set
    from the tokenizer: sequence classifiers read the score at the last non-pad token.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from she.models.registry import resolve_model

    path = resolve_model(name_or_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def run_reward_model_job(cfg: RewardModelJobConfig, train_records: list[Record], *, progress: bool = True) -> Path:
    """Sample (or reuse) pass@N rollouts of ``cfg.policy`` (default ``cfg.model``), train the RM, save
    ``<output_dir>/final`` (weights, tokenizer, ``she.json`` with the prompt style and the policy's step schema,
    in which the RM's prompts are written); returns that folder."""
    from datasets import Dataset
    from trl import RewardTrainer

    from she.training.pairs import build_pairs_for_job, preference_rows
    from she.training.trainer_setup import save_final, train_resuming, write_job_config

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_job_config(out, cfg)
    policy = cfg.policy or cfg.model
    spec = schema_of(policy)
    schema = resolve_schema(spec, cfg.data.taxonomy)
    cache = cfg.rollouts.cache_file or out / "rollouts.jsonl"
    pairs, stats, style = build_pairs_for_job(policy, train_records, cfg.rollouts, cache,
                                              prompt_style=cfg.prompt_style, bf16=cfg.bf16, progress=progress,
                                              schema=schema)
    (out / "pairs_stats.json").write_text(json.dumps(stats, indent=2))
    train_ds = Dataset.from_list(preference_rows(pairs, {r.id: r for r in train_records}, style, schema))

    model, tok = load_rm_base(cfg.model, cfg.seed)
    tok.padding_side = "right"
    from she.training.checkpoints import ManifestCallback

    trainer = RewardTrainer(model=model, args=build_reward_config(cfg, out), train_dataset=train_ds,
                            processing_class=tok, callbacks=[ManifestCallback()])
    train_resuming(trainer, out, cfg.resume, log)
    return save_final(trainer, out, {"prompt_style": style, "kind": RM_KIND, "taxonomy": cfg.data.taxonomy,
                                     "schema": spec})


class ScalarRewardModel:
    """A trained scalar RM as a scorer of (prompt, completion) pairs, for GRPO or for analysis.

    ``score`` keeps the scores of its last call: :class:`SRPOTrainer` asks for the same batch twice (TRL's
    reward function, then its own rollout scoring), and the second ask is then free.
    """

    def __init__(self, model: Any, tokenizer: Any, *, prompt_style: str = "compact", batch_size: int = 16,
                 max_length: int | None = None, schema: StepSchema | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompt_style = prompt_style
        self.schema = schema  # the step schema of the RM's prompts (she.json); None = the built-in one
        self.batch_size = batch_size
        self.max_length = max_length
        if getattr(model.config, "num_labels", None) != 1:
            raise UserError(f"a scalar reward model needs num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model.eval()
        self._memo: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: Any = None, **kwargs: Any) -> ScalarRewardModel:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from she.models.metadata import load_she_meta

        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: not a reward model folder (no config.json); train one with `she train rm`")
        meta = load_she_meta(p)
        if meta.get("kind") not in (None, RM_KIND):
            raise UserError(f"{p}: she.json says kind={meta.get('kind')!r}, not a scalar reward model")
        model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(p)
        kwargs.setdefault("prompt_style", meta.get("prompt_style", "compact"))
        kwargs.setdefault("schema", resolve_schema(meta.get("schema"), meta.get("taxonomy") or "hd3"))
        rm = cls(model, tok, **kwargs)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return rm.to(device)

    def to(self, device: Any) -> ScalarRewardModel:
        self.model.to(device)
        return self

    def chat_text(self, prompt: list[dict[str, str]], completion: str) -> str:
        """The exact string the RM scores: the chat template over prompt + one assistant turn."""
        return self.tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)

    def score(self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        """One scalar per (chat prompt, completion text); batched, no gradients."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [self.chat_text(p, c) for p, c in zip(prompts, completions)]
        todo = sorted({t for t in texts if t not in self._memo}, key=len)
        found = {t: self._memo[t] for t in texts if t in self._memo}
        device = next(self.model.parameters()).device
        tok = self.tokenizer
        with torch.no_grad():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                enc = tok(chunk, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False,
                          truncation=self.max_length is not None, max_length=self.max_length)
                enc = {k: v.to(device) for k, v in enc.items()}
                logits = self.model(**enc).logits[:, 0].float().cpu().tolist()
                found.update(zip(chunk, logits))
        self._memo = found  # only this batch: the memo never grows
        return [found[t] for t in texts]

    def score_records(self, records: Sequence[Record], completions: Sequence[str]) -> list[float]:
        """Score completions for records, with the prompt rebuilt in the RM's own prompt style and schema."""
        from she.reasoning.prompts import build_messages
        from she.reasoning.schema import schema_for

        return self.score([build_messages(r, style=self.prompt_style, schema=schema_for(self.schema, r.taxonomy))
                           for r in records], completions)

    def reward_func(self):
        """A plain TRL reward function ``(prompts, completions, **kw) -> list[float]`` over the prompts TRL
        passes (for use with TRL's own trainers; SRPOTrainer uses :meth:`score_records`)."""

        def scalar_rm(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            if prompts and isinstance(prompts[0], str):
                raise ValueError("ScalarRewardModel.reward_func needs conversational prompts (chat messages)")
            return self.score(prompts, texts)

        return scalar_rm


__all__ = ["RM_KIND", "ScalarRewardModel", "build_reward_config", "load_rm_base", "run_reward_model_job"]
