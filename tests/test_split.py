"""Query-disjoint splits: disjointness, determinism, input-order independence and exact sizes."""

from __future__ import annotations

import random

import pytest

from she.data.schema import Product, Record
from she.data.split import _block_sizes, split_by_query


def make(n_groups: int, per_group=lambda g: 1 + g % 4) -> list[Record]:
    return [Record(id=f"{g}-{k}", query=f"query {g}", product=Product(title=f"p{k}"), query_id=f"q{g}")
            for g in range(n_groups) for k in range(per_group(g))]


def assignment(parts: dict[str, list[Record]]) -> dict[str, str]:
    return {r.id: name for name, recs in parts.items() for r in recs}


def test_query_disjoint_and_complete():
    recs = make(50)
    parts = split_by_query(recs, seed=3)
    assert list(parts) == ["train", "validation", "test"]
    assert sorted(r.id for v in parts.values() for r in v) == sorted(r.id for r in recs)
    where: dict[str, set[str]] = {}
    for name, v in parts.items():
        for r in v:
            where.setdefault(r.group, set()).add(name)
    assert all(len(s) == 1 for s in where.values()) and len(where) == 50


def test_group_sizes_follow_fractions_exactly():
    parts = split_by_query(make(100), {"train": 0.8, "validation": 0.1, "test": 0.1})
    assert [len({r.group for r in v}) for v in parts.values()] == [80, 10, 10]
    # 7 groups * (.5, .25, .25) = 3.5, 1.75, 1.75 -> floors 3, 1, 1; the 2 left go to the largest
    # remainders (.75, .75) -> 3, 2, 2
    parts = split_by_query(make(7), {"a": 0.5, "b": 0.25, "c": 0.25})
    assert [len({r.group for r in v}) for v in parts.values()] == [3, 2, 2]
    assert _block_sizes(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]  # tie -> earlier split
    parts = split_by_query(make(10), {"train": 1.0, "test": 0.0})
    assert len(parts["train"]) == len(make(10)) and parts["test"] == []


def test_deterministic_and_independent_of_input_order():
    recs = make(60)
    a = assignment(split_by_query(recs, seed=7))
    assert assignment(split_by_query(list(recs), seed=7)) == a
    shuffled = list(recs)
    random.Random(1).shuffle(shuffled)
    parts = split_by_query(shuffled, seed=7)
    assert assignment(parts) == a
    # records keep their input order inside a split
    pos = {r.id: i for i, r in enumerate(shuffled)}
    for v in parts.values():
        assert [pos[r.id] for r in v] == sorted(pos[r.id] for r in v)
    assert assignment(split_by_query(recs, seed=8)) != a


def test_group_is_query_id_else_normalised_query():
    recs = [
        Record(id="1", query="Red Lamp", product=Product(title="t")),
        Record(id="2", query="red   lamp", product=Product(title="t")),
        Record(id="3", query="red lamp", product=Product(title="t"), query_id="other"),
    ] + [Record(id=f"x{i}", query=f"q{i}", product=Product(title="t")) for i in range(30)]
    for seed in range(5):
        a = assignment(split_by_query(recs, {"a": 0.5, "b": 0.5}, seed=seed))
        assert a["1"] == a["2"]
    # id 3 is its own group: across seeds it must sometimes land apart from ids 1/2
    assert any(assignment(split_by_query(recs, {"a": 0.5, "b": 0.5}, seed=s))["3"]
               != assignment(split_by_query(recs, {"a": 0.5, "b": 0.5}, seed=s))["1"] for s in range(20))


def test_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_query(make(3), {"train": 0.8, "test": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        split_by_query(make(3), {"train": 1.2, "test": -0.2})
    with pytest.raises(ValueError, match="at least one"):
        split_by_query(make(3), {})
    assert split_by_query([], seed=0) == {"train": [], "validation": [], "test": []}


def test_with_train_draw_keeps_the_held_out_pairs_and_redraws_training():
    """The classifiers' split: the config's own validation and test pairs, and a label-balanced draw of n pairs
    from every training query (the config's max_train / balance_train ignored)."""
    from collections import Counter

    from she.config import DataConfig
    from she.data.sources import label_balanced_sample, load_splits, with_train_draw

    cfg = DataConfig(max_train=20, balance_train=True, max_eval=30)
    own = load_splits(cfg)
    got = with_train_draw(cfg, 60, seed=3)
    for part in ("validation", "test"):
        assert [r.id for r in got[part]] == [r.id for r in own[part]]
    every_train = load_splits(DataConfig(max_train=None, balance_train=False, max_eval=30))["train"]
    assert len(every_train) > 60
    assert [r.id for r in got["train"]] == [r.id for r in label_balanced_sample(every_train, 60, random.Random(3))]
    assert max(Counter(r.label for r in got["train"]).values()) - min(Counter(r.label for r in got["train"]).values()) <= 1
    held = {r.query for part in ("validation", "test") for r in got[part]}
    assert not held & {r.query for r in got["train"]}
