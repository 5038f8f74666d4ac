"""One entry point from a :class:`~she.config.DataConfig` to query-disjoint train/validation/test records."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter

from she.config import ConfigError, DataConfig
from she.data.schema import Record
from she.data.split import SPLIT_KEY
from she.data.validation import DataError
from she.errors import UserError

log = logging.getLogger(__name__)


PARTS = ("train", "validation", "test")


def _files(cfg: DataConfig) -> dict[str, str]:
    """The parts the config names as files of their own (``train_file`` / ``validation_file`` / ``test_file``)."""
    files = {name: f for name, f in zip(PARTS, (cfg.train_file, cfg.validation_file, cfg.test_file)) if f}
    if files and cfg.path is not None:
        raise ConfigError("data: give either path (split by query here) or train_file / validation_file / test_file "
                          "(each used as it is), not both")
    return files


def _load(cfg: DataConfig, path: str) -> list[Record]:
    from she.data.loaders import load_records

    records, _report = load_records(path, cfg.format, on_error=cfg.on_error, taxonomy=cfg.taxonomy,
                                    cuts=tuple(cfg.cuts), encoding=cfg.encoding)
    return records


def load_data(cfg: DataConfig) -> list[Record]:
    """Every record of the data: ``path``, else the named part files one after another, else the generator."""
    files = _files(cfg)
    if files:
        return [r for f in files.values() for r in _load(cfg, f)]
    if cfg.path is None:
        from she.data.synthetic import generate

        return generate(
            n_queries=cfg.synthetic_queries,
            products_per_query=cfg.synthetic_products_per_query,
            seed=cfg.split_seed,
            taxonomy=cfg.taxonomy,
            label_noise=cfg.synthetic_label_noise,
        )
    return _load(cfg, cfg.path)


def presplit(records: list[Record], where: str = "data") -> dict[str, list[Record]] | None:
    """The parts recorded by ``she data split`` (``query_meta["split"]``), or None when no record carries one.

    A file mixing marked and unmarked records is an error: splitting it again would leak, using the marks
    alone would drop the unmarked records."""
    marked = [r for r in records if SPLIT_KEY in r.query_meta]
    if not marked:
        return None
    if len(marked) != len(records):
        raise DataError(f"{len(marked)} of {len(records)} records carry the split of `she data split` "
                        f"(query_meta.{SPLIT_KEY}) and the others do not; use the split files as written",
                        path=where)
    bad = sorted({r.query_meta[SPLIT_KEY] for r in marked} - set(PARTS))
    if bad:
        raise DataError(f"query_meta.{SPLIT_KEY} {bad[0]!r}: expected one of {list(PARTS)}", path=where)
    out: dict[str, list[Record]] = {name: [] for name in PARTS}
    for r in records:
        out[r.query_meta[SPLIT_KEY]].append(r)
    return out


def _split(cfg: DataConfig, records: list[Record]) -> tuple[dict[str, list[Record]], str]:
    """(uncapped parts, how they were made)."""
    from she.data.split import split_by_query

    files = _files(cfg)
    if files:
        return ({name: _load(cfg, files[name]) if name in files else [] for name in PARTS},
                "the files named as " + ", ".join(f"{k}_file" for k in files) + " (used as they are)")
    where = cfg.path or "synthetic data"
    marked = presplit(records, where)
    if marked is not None:
        log.info("%s: records carry the parts of `she data split`; using them, not splitting again", where)
        return marked, "written by `she data split` (not split again)"
    train_frac = 1.0 - cfg.validation_fraction - cfg.test_fraction
    if train_frac <= 0:
        raise UserError("validation_fraction + test_fraction must be < 1")
    splits = split_by_query(
        records,
        fractions={"train": train_frac, "validation": cfg.validation_fraction, "test": cfg.test_fraction},
        seed=cfg.split_seed,
    )
    return splits, (f"query-disjoint split with split_seed {cfg.split_seed}, validation/test fractions "
                    f"{cfg.validation_fraction:g}/{cfg.test_fraction:g}: the split the training commands make")


def _cap(cfg: DataConfig, splits: dict[str, list[Record]]) -> dict[str, list[Record]]:
    caps = {"train": cfg.max_train, "validation": cfg.max_eval, "test": cfg.max_eval}
    for name, cap in caps.items():
        if cap is not None and len(splits.get(name, [])) > cap:
            # one RNG per split: changing the train cap must never change the test sample
            rng = random.Random(f"{cfg.split_seed}:{name}")
            if name == "train" and cfg.balance_train:
                splits[name] = label_balanced_sample(splits[name], cap, rng)
            else:
                splits[name] = rng.sample(splits[name], cap)
    return splits


def load_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    """Load and split by query. ``max_train``/``max_eval`` subsample *after* the split (seeded).

    Data that is already split is used as it is: the part files of ``train_file`` / ``validation_file`` /
    ``test_file``, or records written by ``she data split`` (they carry their part), so training on
    ``splits/train.jsonl`` uses every one of its rows."""
    records = [] if _files(cfg) else load_data(cfg)
    splits, _how = _split(cfg, records)
    return _cap(cfg, splits)


def eval_records(cfg: DataConfig, split: str | None = None) -> tuple[list[Record], str]:
    """The records ``she eval`` scores, and a line saying which part that is.

    ``split`` None: the test part (else validation) of data that is already split, the seeded test split of
    any other data. Training pairs are scored only when asked (``split`` "train" or "all")."""
    files = _files(cfg)
    records = [] if files else load_data(cfg)
    src = cfg.path or (", ".join(files.values()) if files else "the synthetic data")
    if split == "all":
        records = load_data(cfg) if files else records
        return records, f"scoring all {len(records)} pairs of {src} (--split all: training pairs included)"
    splits, how = _split(cfg, records)
    n = sum(len(v) for v in splits.values())
    seeded = how.startswith("query-disjoint")
    if split is None:
        split = "test" if splits["test"] or not splits["validation"] else "validation"
        if not splits[split] and splits["train"]:
            if seeded:
                raise UserError(f"{src}: its held-out test split is empty (too few queries: {how}); pass --split all "
                                "to score every pair, training pairs included")
            raise UserError(f"{src} holds only training pairs ({how}); pass --split train to score them anyway")
    chosen = _cap(cfg, splits)[split]
    if not chosen:
        have = ", ".join(f"{k} {len(v)}" for k, v in splits.items() if v) or "none"
        raise UserError(f"{src} has no {split} pairs ({how}; it holds: {have})")
    return chosen, f"scoring the {split} part of {src}: {len(chosen)} of {n} pairs ({how})"


def label_balanced_sample(records: list[Record], n: int, rng: random.Random) -> list[Record]:
    """Draw ``n`` records with labels as equal as the data allows.

    Why: the Home Depot development file is 45 % Exact; an SFT set drawn at random taught SmolLM2 to say
    Exact almost always (Macro F1 0.22). Equal shares put the rarer grades in front of the model as
    often as the common one. A label with fewer than its share contributes all it has and the
    remainder is spread over the other labels, so exactly ``min(n, len(records))`` records come back.
    The result is shuffled so that the trainer never sees one label in a block.
    """
    by_label: dict[str, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    pools = {k: rng.sample(v, len(v)) for k, v in sorted(by_label.items())}
    n = min(n, len(records))
    take = {k: 0 for k in pools}
    remaining = n
    open_labels = [k for k in pools if pools[k]]
    while remaining > 0 and open_labels:
        share = max(1, remaining // len(open_labels))
        for k in list(open_labels):
            extra = min(share, len(pools[k]) - take[k], remaining)
            take[k] += extra
            remaining -= extra
            if take[k] == len(pools[k]):
                open_labels.remove(k)
            if remaining == 0:
                break
    out = [r for k, pool in pools.items() for r in pool[: take[k]]]
    rng.shuffle(out)
    return out


def with_train_draw(cfg: DataConfig, n: int, seed: int = 0) -> dict[str, list[Record]]:
    """``cfg``'s split with its training sample replaced by a label-balanced draw of ``n`` pairs from *all* its
    training queries (``random.Random(seed)``); the validation and test pairs are :func:`load_splits`'s (each
    split has its own seeded cap, so the training cap never moves them). One load of the data. For classifiers
    fitted beside a model on the same held-out pairs (``scripts/evidence_ceiling.py``, ``scripts/probe_label.py``)."""
    splits = load_splits(dataclasses.replace(cfg, max_train=None, balance_train=False))
    splits["train"] = label_balanced_sample(splits["train"], n, random.Random(seed))
    return splits


def fresh_train_sample(cfg: DataConfig, used: list[Record], n: int, salt: str = "fresh") -> list[Record]:
    """``n`` pairs of ``cfg``'s training part whose queries are in none of ``used``'s pairs: new labelled pairs for a
    later stage (RL prompts the SFT never saw). Drawn label-balanced when ``cfg.balance_train`` (as ``used`` was),
    else at random, with ``random.Random(f"{split_seed}:{salt}")``. The split is by query and the validation and test
    pairs are :func:`load_splits`'s, so nothing held out can be drawn. Fails, named, when no such pair exists; fewer
    than ``n`` come back when the split has fewer (the caller says what it got)."""
    if n < 1:
        raise ConfigError(f"fresh training sample: n must be >= 1, got {n}")
    seen = {r.group for r in used}
    pool = [r for r in load_splits(dataclasses.replace(cfg, max_train=None, balance_train=False))["train"]
            if r.group not in seen]
    if not pool:
        raise UserError(f"no training pair outside the {len(seen)} queries already used: the training split has "
                        "no fresh query (raise data.max_train less, or use rl_prompts: sft)")
    rng = random.Random(f"{cfg.split_seed}:{salt}")
    if cfg.balance_train:
        return label_balanced_sample(pool, n, rng)
    return rng.sample(pool, min(n, len(pool)))


def prior_train(cfg: DataConfig, train: list[Record]) -> list[Record]:
    """The training records whose label shares are the split's prior: ``train`` itself, or, when it is a
    label-balanced sample (``balance_train``), the whole training part of the same split (a balanced sample
    has no majority, and its tie-break would name an arbitrary class)."""
    if not cfg.balance_train:
        return train
    return load_splits(dataclasses.replace(cfg, balance_train=False, max_train=None))["train"]


def majority_label(records: list[Record], labels) -> str:
    """The most frequent label; ties go to the label that comes first in the taxonomy."""
    counts = Counter(r.label for r in records)
    if not counts:
        raise UserError("majority baseline: no training records")
    return max(labels, key=lambda lab: (counts.get(lab, 0), -list(labels).index(lab)))
