"""Rated targets (``sft.rating_targets``): SFT labels drawn from the raters' mean rating mixed with the gold label.

Hand-computed distributions, the draw's frequencies against its targets, and what the draw leaves alone."""

from __future__ import annotations

import pytest

from she.data.labels import rated_targets, rating_distribution
from she.data.schema import Product, Record
from she.errors import UserError
from she.training.sft import relabel_by_rating


def test_rating_distribution_by_hand():
    assert rating_distribution(2 + 1 / 3, "hd3") == pytest.approx({"Irrelevant": 0.0, "Partial": 2 / 3, "Exact": 1 / 3})
    assert rating_distribution(5 / 3, "hd3") == pytest.approx({"Irrelevant": 1 / 3, "Partial": 2 / 3, "Exact": 0.0})
    assert rating_distribution(3.0, "hd3") == {"Irrelevant": 0.0, "Partial": 0.0, "Exact": 1.0}
    assert rating_distribution(1.0, "hd3") == {"Irrelevant": 1.0, "Partial": 0.0, "Exact": 0.0}
    assert rating_distribution(2.0, "hd3") == {"Irrelevant": 0.0, "Partial": 1.0, "Exact": 0.0}
    assert rating_distribution(2.0, "esci4") is None
    with pytest.raises(ValueError, match="outside"):
        rating_distribution(0.5, "hd3")


def test_rated_targets_by_hand():
    # Partial rated 2.33, mix 0.5: Partial 0.5 + 0.5 x 2/3, Exact 0.5 x 1/3
    assert rated_targets("Partial", 2 + 1 / 3, "hd3", 0.5) == pytest.approx(
        {"Irrelevant": 0.0, "Partial": 5 / 6, "Exact": 1 / 6})
    # Irrelevant rated 1.67 (under the 1.75 cut): the gold label keeps 1 - 2 mix / 3
    assert rated_targets("Irrelevant", 5 / 3, "hd3", 0.5)["Irrelevant"] == pytest.approx(2 / 3)
    assert rated_targets("exact", 3.0, "hd3", 0.5) == {"Irrelevant": 0.0, "Partial": 0.0, "Exact": 1.0}
    assert rated_targets("Exact", 2.67, "hd3", 0.0) == {"Irrelevant": 0.0, "Partial": 0.0, "Exact": 1.0}
    assert rated_targets("Exact", 2.0, "esci4", 0.5) is None
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="rating_targets"):
            rated_targets("Exact", 3.0, "hd3", bad)


def _rec(i: int, label: str | None, score: float | None, taxonomy: str = "hd3") -> Record:
    return Record(id=f"r{i}", query=f"q{i}", product=Product(title="t"), label=label, score=score, taxonomy=taxonomy)


def test_the_draw_matches_its_targets_and_leaves_the_rest():
    recs = [_rec(i, "Partial", 2 + 1 / 3) for i in range(3000)]
    out, changed = relabel_by_rating(recs, 0.5, seed=1)
    share_exact = sum(r.label == "Exact" for r in out) / len(out)
    assert changed == sum(r.label != "Partial" for r in out)
    assert abs(share_exact - 1 / 6) < 0.03  # 3,000 draws of p = 1/6: sd 0.007
    assert {r.label for r in out} == {"Partial", "Exact"}  # never a grade the rating does not touch
    assert [r.id for r in out] == [r.id for r in recs] and all(a.query == b.query for a, b in zip(out, recs))
    again, _ = relabel_by_rating(list(reversed(recs)), 0.5, seed=1)  # by id, not by order: a resume draws the same
    assert {r.id: r.label for r in again} == {r.id: r.label for r in out}
    assert relabel_by_rating(recs, 0.5, seed=2)[0] != out
    # no rating, no rating scale, mix 0: unchanged
    keep = [_rec(0, "Partial", None), _rec(1, "Exact", 2.0, taxonomy="esci4"), _rec(2, None, 2.5)]
    assert relabel_by_rating(keep, 0.5, seed=1) == (keep, 0)
    assert relabel_by_rating(recs, 0.0, seed=1) == (recs, 0)


def test_train_sft_refuses_rated_targets_with_teacher_traces(tmp_path):
    from she.config import SFTJobConfig
    from she.training.sft import train_sft

    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"id": "r0", "trace": "Verdict: Partial"}\n')
    cfg = SFTJobConfig(model="no-such-model", output_dir=str(tmp_path / "out"), traces_file=str(traces),
                       rating_targets=0.5)
    with pytest.raises(UserError, match="rating_targets"):  # before any model is loaded
        train_sft(cfg, [_rec(0, "Partial", 2.33)])


def test_train_sft_checks_the_mix_and_the_ratings_before_the_model(tmp_path):
    from she.config import SFTJobConfig
    from she.training.sft import train_sft

    for mix in (-0.5, 1.0):  # refused even on data without ratings, where the mix would never be read
        cfg = SFTJobConfig(model="no-such-model", output_dir=str(tmp_path / "out"), rating_targets=mix)
        with pytest.raises(UserError, match="rating_targets"):
            train_sft(cfg, [_rec(0, "Partial", None)])
    cfg = SFTJobConfig(model="no-such-model", output_dir=str(tmp_path / "out"), rating_targets=0.5)
    with pytest.raises(UserError, match="outside"):
        train_sft(cfg, [_rec(0, "Partial", 2.33), _rec(1, "Exact", 5.0)])
