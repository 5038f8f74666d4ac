"""The ``she compare`` configuration: the sections of the YAML file and the keys the driver sets itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from she.config import CalibrationMethod, ConfigError, DataConfig, SFTJobConfig, canonical_key, from_dict

# keys of each section that the driver sets itself (a value in the config would be silently overridden)
SFT_FIXED = ("model", "output_dir", "data", "target", "seed")
RL_FIXED = ("model", "output_dir", "data", "step_rewards", "reward_model", "judge", "seed", "per_device_batch_size")
PASSN_FIXED = ("seed",)
DPO_FIXED = ("model", "output_dir", "data", "rollouts", "seed")
RM_FIXED = ("model", "policy", "output_dir", "data", "rollouts", "seed")
CE_FIXED = ("output_dir", "data", "eval_split", "seed")
PRM_FIXED = ("policy", "output_dir", "data", "seed")
CURRICULUM_FIXED = ("pass_rates",)
# the `data` keys the label_only section may change: they shape the label-only row's training sample only (the
# split is by query and untouched, and the evaluation pairs are every row's)
LABEL_ONLY_DATA = ("max_train", "balance_train")


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
    calibration_method: CalibrationMethod = "grid"  # grid | bagged | prior (she.evaluation.calibration.fit_label_offsets)
    # how a generative row's verdict is read (docs/reasoning-format.md): generated (the greedy trace's label
    # probabilities) | marginal (averaged over the values of the step before the verdict) | computed (the label-free
    # steps forced). Other modes evaluate into <row>/eval_<mode>, so one compare can be read several ways.
    evidence: str = "generated"


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
    output folder, data, seed, ...) are refused with the key named. ``label_only`` holds the label-only row's
    SFT fields over ``sft`` plus its training sample (``max_train``, ``balance_train``; :func:`label_only_parts`).
    """

    model: str = "smollm2-135m"  # base model: SFT and label-only SFT start here
    output_dir: str = "runs/compare"
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # every job's seed
    sft: dict[str, Any] = field(default_factory=dict)  # SFTJobConfig fields (also used by label_only_sft)
    # label_only_sft's own recipe (label_only_parts): SFTJobConfig fields that replace the `sft:` section's for that
    # row only, and max_train / balance_train for its training sample (drawn from the same training queries)
    label_only: dict[str, Any] = field(default_factory=dict)
    sft_model: str | None = None  # reuse an existing SFT folder instead of training <out>/sft
    judge: str | None = None  # judge folder (`she train prm`); None = train one from `prm:` when a row needs it
    rl: dict[str, Any] = field(default_factory=dict)  # RLJobConfig fields shared by every RL row
    # the prompts of the RL rows (docs/srpo.md, "Fresh prompts"): sft = the SFT's own training pairs (the default
    # until session 24); fresh = as many pairs, drawn the same way, from training queries the SFT sample does not
    # contain (new labels for RL rather than a third pass over pairs the SFT has fitted)
    rl_prompts: str = "sft"
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
    # a finished job's checkpoint-N folders are deleted (its final/ folder stays); true keeps them (e.g. to score
    # an SFT's epoch checkpoints afterwards). eval_checkpoints: true keeps them too.
    keep_checkpoints: bool = False


def build_section(cls: type, section: Mapping[str, Any] | None, where: str, fixed_keys: Sequence[str], **fixed: Any):
    """``cls`` from a config section plus the driver's own values; a section naming a driver key fails."""
    section = dict(section or {})
    bad = sorted({canonical_key(cls, k, warn=False) for k in section} & set(fixed_keys), key=str)
    if bad:
        raise ConfigError(f"{where}: {bad} are set by she compare itself and cannot be given here")
    obj = from_dict(cls, section, where)
    return dataclasses.replace(obj, **fixed) if fixed else obj


def _split_label_only(section: Mapping[str, Any] | None, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(data keys, SFT keys)`` of a ``label_only:`` section; a key that belongs to neither fails, named."""
    sft_names = {f.name for f in dataclasses.fields(SFTJobConfig)}
    data_names = {f.name for f in dataclasses.fields(DataConfig)}
    data: dict[str, Any] = {}
    sft: dict[str, Any] = {}
    unknown = []
    for key, value in dict(section or {}).items():
        name = canonical_key(SFTJobConfig, key, where, warn=False)
        if key == "data":
            raise ConfigError(f"{where}.data: give {' / '.join(LABEL_ONLY_DATA)} directly under label_only "
                              "(the rest of `data` is every row's)")
        if key in LABEL_ONLY_DATA:
            data[key] = value
        elif key in data_names and name not in sft_names:
            raise ConfigError(f"{where}.{key}: a `data` key the label-only row cannot change (it would change the "
                              f"split or the evaluation pairs every row shares); only {list(LABEL_ONLY_DATA)} "
                              "(its training sample) may differ")
        elif name == "traces_file":
            raise ConfigError(f"{where}.{key}: the label-only target is `Verdict: <label>`; teacher traces do not "
                              "apply to it")
        elif name in sft_names:
            sft[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown, key=str)}; allowed: {list(LABEL_ONLY_DATA)} "
                          "and the fields of the sft job")
    return data, sft


def label_only_parts(section: Mapping[str, Any] | None,
                     where: str = "label_only") -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a ``label_only:`` section into ``(data overrides, SFT overrides)``, checking every key and value.

    The data overrides (:data:`LABEL_ONLY_DATA`) apply to the training split only: the label-only row may train on
    more (or differently balanced) pairs of the same training queries, never on other evaluation pairs. Any other
    ``data`` key would change the split or the pairs every row is scored on, so it is refused by name; so are the
    keys the driver sets (``SFT_FIXED``) and ``traces_file`` (the label-only target is ``Verdict: <label>``)."""
    data, sft = _split_label_only(section, where)
    build_section(SFTJobConfig, sft, where, SFT_FIXED)  # types, and the keys the driver sets, named
    checked = from_dict(DataConfig, data, where)
    if checked.max_train is not None and checked.max_train < 1:
        raise ConfigError(f"{where}.max_train: must be >= 1 or null (all training pairs), got {checked.max_train}")
    return {k: getattr(checked, k) for k in data}, sft


def label_only_section(sft: Mapping[str, Any] | None, label_only: Mapping[str, Any] | None) -> dict[str, Any]:
    """The SFT section of the label-only job: the ``sft:`` section with the ``label_only:`` SFT keys on top
    (keys compared by their canonical names, so ``epochs`` in one and ``num_train_epochs`` in the other is one key)."""
    _, over = _split_label_only(label_only, "label_only")

    def canon(d: Mapping[str, Any]) -> dict[str, Any]:
        return {canonical_key(SFTJobConfig, k, warn=False): v for k, v in d.items()}

    return {**canon(sft or {}), **canon(over)}


__all__ = ["CE_FIXED", "CURRICULUM_FIXED", "DPO_FIXED", "LABEL_ONLY_DATA", "PASSN_FIXED", "PRM_FIXED", "RL_FIXED",
           "RM_FIXED", "SFT_FIXED", "BootstrapConfig", "CompareConfig", "CompareEvalConfig", "DifficultyConfig",
           "DiverseConfig", "build_section", "label_only_parts", "label_only_section"]
