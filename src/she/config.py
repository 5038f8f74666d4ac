"""Typed job configs loaded from YAML (the open-r1 pattern: one dataclass per job, YAML in, CLI overrides).

Unknown keys are errors (a typo in a config must not silently fall back to a default), and every error
names the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    """Where records come from. ``path: null`` means the embedded synthetic generator."""

    path: str | None = None
    format: str = "auto"  # auto | home-depot | esci | wands | jsonl
    taxonomy: str = "hd3"
    cuts: tuple[float, float] = (1.75, 2.5)  # Home Depot mean-rating thresholds
    on_error: str = "fail"  # fail | skip
    # synthetic generator (used when path is null)
    synthetic_queries: int = 300
    synthetic_products_per_query: int = 4
    # query-disjoint split
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train: int | None = None
    max_eval: int | None = None


@dataclass
class SFTJobConfig:
    model: str = "smollm2-135m"
    output_dir: str = "runs/sft"
    data: DataConfig = field(default_factory=DataConfig)
    target: str = "reasoning"  # reasoning | label  (label-only baseline)
    traces_file: str | None = None  # teacher traces JSONL ({id, trace}) from `she data teach`; else rule-based
    prompt_style: str = "compact"  # compact | full (see she.reasoning.prompts); saved with the model
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    weight_decay: float = 0.0
    bf16: bool = True  # bf16 autocast: ~2x faster on this CPU, and standard on GPUs
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    resume: bool = True  # resume from the last checkpoint in output_dir when there is one
    report_to: str = "tensorboard"


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    output_dir: str = "runs/eval"
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"  # which split of data to evaluate when data is split; "all" = the whole file
    batch_size: int = 16
    max_new_tokens: int = 96
    bf16: bool = True
    limit: int | None = None


def _demo_data() -> DataConfig:
    return DataConfig(max_train=480, max_eval=150)


def _demo_sft() -> SFTJobConfig:
    return SFTJobConfig(logging_steps=5, save_steps=30)


@dataclass
class DemoConfig:
    """Defaults sized so the whole demo runs in under 15 minutes on a 2-core CPU (docs/benchmarks.md)."""

    model: str = "smollm2-135m"
    output_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=_demo_data)
    sft: SFTJobConfig = field(default_factory=_demo_sft)
    eval_batch_size: int = 32
    max_new_tokens: int = 64
    eval_before: bool = True


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (list,):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], d: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping. A nested section updates the *parent's default* for it, so a
    partial ``data:`` section in a demo config keeps the demo's data defaults for the keys it omits."""
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(flds))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(flds)}")
    kwargs = {}
    for k, v in d.items():
        f = flds[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            base = f.default_factory()
            sub = from_dict(hints[k], v, f"{where}.{k}")
            kwargs[k] = dataclasses.replace(base, **{n: getattr(sub, n) for n in v})
        else:
            kwargs[k] = _convert(hints[k], v, f"{where}.{k}")
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) and apply dotted overrides like ``{"sft.epochs": 2}``."""
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(cls, raw, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class PRMJobConfig:
    """``she train prm``: label policy rollouts step by step, then fine-tune the generative judge.

    See docs/judge.md. The number of policy generations is about
    ``N * R + M * (steps that need Monte-Carlo labels)``, at most ``N * R * (1 + M * (S - 1))`` for N
    records, R rollouts each, M continuations and S schema steps.
    """

    policy: str = "runs/sft/final"  # the policy that writes rollouts and continuations (save_pretrained folder or name)
    judge_model: str = "smollm2-135m"  # base model of the judge (registry name or folder)
    output_dir: str = "runs/prm"
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "train"  # which split of `data` to label ("all" = every record)
    max_records: int | None = 200  # seeded subsample of that split (None = all)
    eval_fraction: float = 0.2  # share of query groups held out to measure the judge
    dataset_file: str | None = None  # an existing PRM dataset JSONL: skip labelling, just train
    # rollouts and Monte-Carlo labels (Math-Shepherd)
    rollouts_per_record: int = 1
    add_reference_traces: bool = False  # also label the rule-based rationale of each record
    mc_continuations: int = 4  # M continuations per step prefix
    rollout_temperature: float = 1.0
    mc_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    generation_batch_size: int = 32
    label_mode: str = "hard"  # hard (share > 0 -> 1) | soft (the share)
    use_mc: bool = True
    use_facts: bool = True  # human step facts through the offline verifier
    facts_priority: str = "facts"  # facts (facts override MC) | mc (MC overrides facts)
    unknown_steps: str = "mc"  # steps the facts cannot check: mc (label by MC) | skip
    # judge format
    verdict_words: tuple[str, str] | None = None  # None = automatic (" good"/" bad", else "+"/"-")
    max_length: int = 1024
    # training
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    bf16: bool = True
    eval_before: bool = True
    seed: int = 0
    logging_steps: int = 10


@dataclass
class RLJobConfig:
    """``she train srpo`` / ``she train grpo``: RL from an SFT checkpoint (docs/srpo.md).

    ``grpo`` is the same job with ``step_rewards: false`` (vanilla GRPO in the same harness).
    """

    model: str = "runs/sft/final"
    output_dir: str = "runs/srpo"
    data: DataConfig = field(default_factory=DataConfig)
    step_rewards: bool = True
    examiner: str = "verifier"  # verifier | hybrid (verifier first, judge fills the rest) | blend
    judge: str | None = None  # a judge folder from `she train prm` (needed for hybrid/blend)
    judge_weight: float = 0.5  # blend weight of the judge
    alpha: float = 1.0  # weight of the step advantage next to the outcome advantage
    credit_mode: str = "broadcast"  # broadcast | cumsum | min
    critical: dict[str, float] | None = None  # e.g. {first_error_weight: 2.0, confident_correct_weight: 1.5}
    partial_credit: bool = False  # ordinal partial credit in the outcome reward
    format_weight: float = 0.0
    prompt_style: str = "compact"
    num_generations: int = 4
    prompts_per_step: int = 2
    max_completion_length: int = 80
    max_steps: int = 50
    learning_rate: float = 1e-6
    beta: float = 0.0
    temperature: float = 1.0
    bf16: bool = True
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 25
    resume: bool = True
    report_to: str = "tensorboard"
