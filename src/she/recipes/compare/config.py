"""The ``she compare`` configuration: the sections of the YAML file and the keys the driver sets itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from she.config import ConfigError, DataConfig, canonical_key, from_dict

# keys of each section that the driver sets itself (a value in the config would be silently overridden)
SFT_FIXED = ("model", "output_dir", "data", "target", "seed")
RL_FIXED = ("model", "output_dir", "data", "step_rewards", "reward_model", "judge", "seed", "per_device_batch_size")
PASSN_FIXED = ("seed",)
DPO_FIXED = ("model", "output_dir", "data", "rollouts", "seed")
RM_FIXED = ("model", "policy", "output_dir", "data", "rollouts", "seed")
CE_FIXED = ("output_dir", "data", "eval_split", "seed")
PRM_FIXED = ("policy", "output_dir", "data", "seed")
CURRICULUM_FIXED = ("pass_rates",)



@dataclass
class CompareEvalConfig:
    split: str = "test"  # train | validation | test
    max_eval: int | None = None  # seeded subsample of that split (None = all of it)
    batch_size: int = 16
    max_new_tokens: int = 96
    bf16: bool = True
    # calibrated verdicts (docs/reasoning-format.md): per generative row, fit per-class offsets on the verdict
    # log-probabilities on `calibration_max` validation pairs and report Macro F1 with them next to without
    calibrate: bool = False
    calibration_max: int = 300


@dataclass
class BootstrapConfig:
    n: int = 1000  # bootstrap replicates (resampling whole query groups)
    seed: int = 0
    alpha: float = 0.05  # 0.05 = 95 % intervals


@dataclass
class DifficultyConfig:
    """srpo_full's difficulty band: pass rates of the SFT policy under k rollouts on a pool of train prompts."""

    max_records: int | None = 200  # the pool: a seeded subsample of train (None = all); all srpo_full rows use it
    k: int | None = None  # rollouts per prompt (None = rl.num_generations)
    low: float = 0.0
    high: float = 1.0
    inclusive: bool = False  # default keeps 0 < p < 1: the prompts with GRPO reward variance
    cache_file: str | None = None  # default <out>/difficulty/pass_rates.jsonl (resumable)
    batch_size: int = 32
    max_new_tokens: int | None = None  # None = rl.max_completion_length (a generation costs what an RL one does)
    temperature: float | None = None  # None = rl.temperature
    bf16: bool = True


@dataclass
class DiverseConfig:
    n: int | None = None  # prompts to select (None = what the RL run will see: its steps x prompts_per_step)
    embedder: str = "auto"  # auto | minilm | hashing
    n_clusters: int | None = None
    dup_threshold: float = 0.95


@dataclass
class CompareConfig:
    """``she compare CONFIG``: see the module docstring and docs/baselines.md ("she compare").

    Job sections (``sft``, ``rl``, ``passn``, ``dpo``, ``rm``, ``cross_encoder``, ``prm``, ``curriculum``)
    are mappings of the fields of the job's own config; the fields the driver sets itself (start model,
    output folder, data, seed, ...) are refused with the key named.
    """

    model: str = "smollm2-135m"  # base model: SFT and label-only SFT start here
    output_dir: str = "runs/compare"
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # every job's seed
    sft: dict[str, Any] = field(default_factory=dict)  # SFTJobConfig fields (also used by label_only_sft)
    sft_model: str | None = None  # reuse an existing SFT folder instead of training <out>/sft
    judge: str | None = None  # judge folder (`she train prm`); None = train one from `prm:` when a row needs it
    rl: dict[str, Any] = field(default_factory=dict)  # RLJobConfig fields shared by every RL row
    passn: dict[str, Any] = field(default_factory=dict)  # PassAtNConfig fields shared by dpo and rm
    dpo: dict[str, Any] = field(default_factory=dict)
    rm: dict[str, Any] = field(default_factory=dict)
    cross_encoder: dict[str, Any] = field(default_factory=dict)
    prm: dict[str, Any] | None = None  # PRMJobConfig fields; `prm: {}` = defaults
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    diverse: DiverseConfig = field(default_factory=DiverseConfig)
    curriculum: dict[str, Any] | None = None  # CurriculumConfig fields (stages); None = the default two stages
    rows: list[str] | None = None  # None = every row
    budget: str = "strict"  # strict: difficulty rollouts are paid with srpo_full's RL steps | rl: not
    eval: CompareEvalConfig = field(default_factory=CompareEvalConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    # paired bootstrap intervals of Macro F1 differences [A, B] on the same pairs (A and B each pooled with
    # their `_seed<k>` rows); pairs with a row not in the run are skipped
    paired: list[list[str]] = field(default_factory=lambda: [["srpo_gated", "grpo"], ["srpo_gated", "sft"],
                                                             ["srpo_gated_verifier_only", "grpo"],
                                                             ["srpo_gated", "srpo_centered_pooled"]])
    eval_checkpoints: bool = False  # also score intermediate RL checkpoints (costly)
    checkpoint_eval_max: int = 50  # eval pairs per checkpoint


def build_section(cls: type, section: Mapping[str, Any] | None, where: str, fixed_keys: Sequence[str], **fixed: Any):
    """``cls`` from a config section plus the driver's own values; a section naming a driver key fails."""
    section = dict(section or {})
    bad = sorted({canonical_key(cls, k, warn=False) for k in section} & set(fixed_keys), key=str)
    if bad:
        raise ConfigError(f"{where}: {bad} are set by she compare itself and cannot be given here")
    obj = from_dict(cls, section, where)
    return dataclasses.replace(obj, **fixed) if fixed else obj


__all__ = ["CE_FIXED", "CURRICULUM_FIXED", "DPO_FIXED", "PASSN_FIXED", "PRM_FIXED", "RL_FIXED", "RM_FIXED", "SFT_FIXED",
           "BootstrapConfig", "CompareConfig", "CompareEvalConfig", "DifficultyConfig", "DiverseConfig",
           "build_section"]
