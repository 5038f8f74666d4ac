import pytest

from she.data.labels import get_taxonomy, map_label, rating_to_label


@pytest.mark.parametrize(
    "rating,label",
    [(1.0, "Irrelevant"), (1.67, "Irrelevant"), (1.75, "Partial"), (2.33, "Partial"), (2.5, "Exact"), (3.0, "Exact")],
)
def test_rating_cuts_default(rating, label):
    assert rating_to_label(rating) == label


def test_rating_cuts_configurable_and_checked():
    assert rating_to_label(2.33, cuts=(1.5, 2.25)) == "Exact"
    with pytest.raises(ValueError):
        rating_to_label(2.0, cuts=(2.5, 1.5))


def test_esci_to_hd3_follows_guideline():
    # the Home Depot guideline calls an accessory for the searched item irrelevant
    assert map_label("C", "esci4", "hd3") == "Irrelevant"
    assert map_label("Substitute", "esci4", "hd3") == "Partial"
    assert map_label("e", "esci4", "hd3") == "Exact"


def test_round_trips_preserve_extremes():
    for tax in ("esci4", "taobao4"):
        top = get_taxonomy(tax).labels[-1]
        bottom = get_taxonomy(tax).labels[0]
        assert map_label(map_label(top, tax, "hd3"), "hd3", tax) == top
        assert map_label(map_label(bottom, tax, "hd3"), "hd3", tax) == bottom


def test_ordinal_order_and_errors():
    t = get_taxonomy("hd3")
    assert [t.index(x) for x in ("Irrelevant", "Partial", "Exact")] == [0, 1, 2]
    assert t.normalize(" exact ") == "Exact"
    with pytest.raises(ValueError, match="unknown label"):
        t.normalize("Complement")
    with pytest.raises(ValueError, match="unknown taxonomy"):
        get_taxonomy("nope")
    with pytest.raises(ValueError, match="unknown taxonomy|no label mapping"):
        map_label("Exact", "hd3", "nope")
