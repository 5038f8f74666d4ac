"""scripts/oracle_steps.py, its pure part: the forced trace is the rationale writer's, cut right before the label."""

import pytest

from she.data.schema import Product, Record
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import resolve_schema


@pytest.fixture(scope="module")
def oracle(load_script):
    return load_script("oracle_steps")


@pytest.mark.parametrize("label", ["Irrelevant", "Partial", "Exact"])
def test_exact_prefix_is_the_written_trace_up_to_the_label(oracle, label):
    rec = Record(id="d", query="cordless 20v dewalt drills", product=Product(title="DEWALT 18-Volt Drill/Driver Kit"),
                 label=label)
    schema = resolve_schema("evidence")
    prefix = oracle.exact_prefix(rec, schema)
    assert write_rationale(rec, schema) == prefix + " " + label
    assert prefix.endswith("\nVerdict:") and "Missing: cordless, 20" in prefix and "Head: drill found" in prefix
    # label-free: every gold label gives the same forced steps
    others = {oracle.exact_prefix(Record(id="d", query=rec.query, product=rec.product, label=lab), schema)
              for lab in ("Irrelevant", "Partial", "Exact")}
    assert others == {prefix}
