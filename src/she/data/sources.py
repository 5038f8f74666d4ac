"""One entry point from a :class:`~she.config.DataConfig` to query-disjoint train/validation/test records."""

from __future__ import annotations

import random

from she.config import DataConfig
from she.data.schema import Record


def load_data(cfg: DataConfig) -> list[Record]:
    if cfg.path is None:
        from she.data.synthetic import generate

        return generate(
            n_queries=cfg.synthetic_queries,
            products_per_query=cfg.synthetic_products_per_query,
            seed=cfg.split_seed,
            taxonomy=cfg.taxonomy,
        )
    from she.data.loaders import load_records

    records, _report = load_records(
        cfg.path, cfg.format, on_error=cfg.on_error, taxonomy=cfg.taxonomy, cuts=tuple(cfg.cuts)
    )
    return records


def load_splits(cfg: DataConfig) -> dict[str, list[Record]]:
    """Load and split by query. ``max_train``/``max_eval`` subsample *after* the split (seeded)."""
    from she.data.split import split_by_query

    records = load_data(cfg)
    train_frac = 1.0 - cfg.validation_fraction - cfg.test_fraction
    if train_frac <= 0:
        raise ValueError("validation_fraction + test_fraction must be < 1")
    splits = split_by_query(
        records,
        fractions={"train": train_frac, "validation": cfg.validation_fraction, "test": cfg.test_fraction},
        seed=cfg.split_seed,
    )
    caps = {"train": cfg.max_train, "validation": cfg.max_eval, "test": cfg.max_eval}
    for name, cap in caps.items():
        if cap is not None and len(splits.get(name, [])) > cap:
            # one RNG per split: changing the train cap must never change the test sample
            rng = random.Random(f"{cfg.split_seed}:{name}")
            splits[name] = rng.sample(splits[name], cap)
    return splits
