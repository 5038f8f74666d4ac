"""Calibrated verdicts (issue 13, item 2): offsets fitted by hand-checkable cases, applied as documented."""

import math

import pytest

import numpy as np

from she.errors import UserError
from she.evaluation.calibration import apply_offsets, bootstrap_draws, fit_label_offsets, pool_probs

LABELS = ["Irrelevant", "Partial", "Exact"]


def P(i, p, e):
    return {"Irrelevant": i, "Partial": p, "Exact": e}


def test_apply_offsets_by_hand():
    probs = P(0.2, 0.3, 0.5)
    assert apply_offsets(probs, "Exact", None) == "Exact"
    assert apply_offsets(None, "Partial", {"Partial": 5.0}) == "Partial"  # no probabilities: the generated label
    # log 0.3 + 0.6 = -0.604 > log 0.5 = -0.693 -> Partial
    assert apply_offsets(probs, "Exact", {"Irrelevant": 0.0, "Partial": 0.6, "Exact": 0.0}) == "Partial"
    assert apply_offsets(probs, "Exact", {"Irrelevant": 0.0, "Partial": 0.4, "Exact": 0.0}) == "Exact"


def test_fit_recovers_a_prior_shift():
    # an Exact bias on every pair (p_Exact 0.5) over a still-ranked gold class (p_gold 0.35, the third 0.15);
    # on Exact pairs p_Exact = 0.7: offsets between log(0.5/0.35) and log(0.7/0.15) on the other two recover gold
    gold, probs = [], []
    for g in LABELS * 10:
        p = {lab: 0.15 for lab in LABELS}
        if g == "Exact":
            p["Exact"] = 0.7
        else:
            p["Exact"], p[g] = 0.5, 0.35
        gold.append(g)
        probs.append(p)
    raw = [max(p, key=p.get) for p in probs]
    assert raw.count("Exact") == 30  # collapsed without offsets
    b = fit_label_offsets(probs, raw, gold, LABELS)
    assert b["Irrelevant"] == 0.0
    calibrated = [apply_offsets(p, r, b) for p, r in zip(probs, raw)]
    assert calibrated == gold  # the ranking was there; the offsets read it


def test_fit_finds_a_fine_offset_for_a_soft_judge():
    # a soft verdict distribution (the evidence schema's): Partial and Exact a few hundredths of a nat apart.
    # Pair 1 needs b_P - b_E > log(0.42/0.40) = 0.049, pair 2 needs it < log(0.44/0.38) = 0.147: only an offset
    # inside (0.049, 0.147) gets both right -- the 0.5-nat steps of a wide grid jump over the whole window
    gold = ["Partial", "Exact", "Irrelevant"]
    probs = [P(0.18, 0.40, 0.42), P(0.18, 0.38, 0.44), P(0.6, 0.2, 0.2)]
    raw = [max(p, key=p.get) for p in probs]
    b = fit_label_offsets(probs, raw, gold, LABELS)
    assert math.log(0.42 / 0.40) < b["Partial"] - b["Exact"] < math.log(0.44 / 0.38)
    assert [apply_offsets(p, r, b) for p, r in zip(probs, raw)] == gold
    coarse = fit_label_offsets(probs, raw, gold, LABELS, grid=[x / 2 for x in range(-24, 25)])
    assert [apply_offsets(p, r, coarse) for p, r in zip(probs, raw)] != gold


def test_fit_keeps_zero_when_nothing_helps_and_rows_without_probs_keep_their_label():
    gold = ["Exact", "Partial", "Irrelevant"]
    probs = [P(0.1, 0.1, 0.8), None, P(0.7, 0.2, 0.1)]
    raw = ["Exact", "Partial", "Irrelevant"]
    b = fit_label_offsets(probs, raw, gold, LABELS)
    assert b == {"Irrelevant": 0.0, "Partial": 0.0, "Exact": 0.0}
    assert apply_offsets(probs[1], raw[1], b) == "Partial"


def test_fit_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        fit_label_offsets([None], ["Exact", "Exact"], ["Exact", "Exact"], LABELS)
    with pytest.raises(ValueError, match="not among"):
        fit_label_offsets([None], ["Exact"], ["Great"], LABELS)
    with pytest.raises(ValueError, match="no pairs"):
        fit_label_offsets([], [], [], LABELS)
    assert math.isfinite(fit_label_offsets([P(0, 0, 1)], ["Exact"], ["Exact"], LABELS)["Exact"])


def _noisy_pairs(n, seed):
    """A soft judge with an Exact prior: gold in thirds, p = softmax(signal on gold + noise + prior)."""
    rng = np.random.default_rng(seed)
    gold = [LABELS[i % 3] for i in range(n)]
    probs = []
    for g in gold:
        z = rng.normal(0, 1.0, 3) + np.array([0.0, 0.2, 0.8]) + 1.2 * np.array([lab == g for lab in LABELS])
        e = np.exp(z - z.max())
        probs.append(dict(zip(LABELS, (e / e.sum()).tolist())))
    return probs, [max(p, key=p.get) for p in probs], gold


def test_bagged_is_the_mean_of_grid_fits_on_the_bootstrap_draws():
    probs, raw, gold = _noisy_pairs(60, 0)
    groups = [i // 2 for i in range(60)]  # two pairs a query
    grid = [x / 10 for x in range(-20, 21)]
    bagged = fit_label_offsets(probs, raw, gold, LABELS, method="bagged", n_boot=7, seed=3, groups=groups, grid=grid)
    loop = []
    for ix in bootstrap_draws(60, 7, 3, groups):
        fit = fit_label_offsets([probs[i] for i in ix], [raw[i] for i in ix], [gold[i] for i in ix], LABELS, grid=grid)
        loop.append([fit[lab] for lab in LABELS])
    assert [bagged[lab] for lab in LABELS] == pytest.approx(np.mean(loop, axis=0).tolist(), abs=1e-4)
    assert bagged["Irrelevant"] == 0.0 and len({tuple(x) for x in loop}) > 1  # the fits differ: there is noise


def test_bootstrap_draws_take_whole_groups():
    groups = ["a", "a", "b", "c", "c", "c"]
    for ix in bootstrap_draws(6, 20, 1, groups):
        drawn = [groups[i] for i in ix]
        for g in set(drawn):  # every drawn query brings all its pairs, as often as it was drawn
            assert drawn.count(g) % groups.count(g) == 0
    assert all(len(ix) == 6 for ix in bootstrap_draws(6, 5, 0))  # rows resampled one by one without groups
    with pytest.raises(ValueError, match="groups has 2 items for 6 pairs"):
        bootstrap_draws(6, 1, 0, ["a", "b"])


def test_prior_method_matches_the_gold_shares():
    # p_Exact is the largest on every pair, the gold class ranks second on non-Exact pairs: shares matched to
    # gold's thirds recover every label (the two other classes' probabilities order them), by hand as in
    # test_fit_recovers_a_prior_shift
    gold, probs = [], []
    for g in LABELS * 10:
        p = {lab: 0.15 for lab in LABELS}
        p["Exact"], p[g] = (0.7, 0.7) if g == "Exact" else (0.5, 0.35)
        gold.append(g)
        probs.append(p)
    raw = ["Exact"] * 30
    b = fit_label_offsets(probs, raw, gold, LABELS, method="prior")
    pred = [apply_offsets(p, r, b) for p, r in zip(probs, raw)]
    assert [pred.count(lab) for lab in LABELS] == [10, 10, 10] and pred == gold


def test_unknown_calibration_method_is_a_clear_error():
    with pytest.raises(UserError, match="calibration method 'median': pick one of grid, bagged, prior"):
        fit_label_offsets([P(0.2, 0.3, 0.5)], ["Exact"], ["Exact"], LABELS, method="median")


def test_pool_probs_is_the_normalised_geometric_mean_by_hand():
    a = {"Irrelevant": 0.5, "Partial": 0.25, "Exact": 0.25}
    b = {"Exact": 0.5, "Partial": 0.25, "Irrelevant": 0.25}  # another key order: the first judge's order is kept
    # equal weights: sqrt(0.5 * 0.25) for Irrelevant and Exact, 0.25 for Partial, then normalised
    g = math.sqrt(0.125)
    want = {"Irrelevant": g / (2 * g + 0.25), "Partial": 0.25 / (2 * g + 0.25), "Exact": g / (2 * g + 0.25)}
    got = pool_probs([a, b])
    assert list(got) == ["Irrelevant", "Partial", "Exact"]
    assert got == pytest.approx(want, abs=1e-12)
    # weights 1 / 0 give the first judge back; one judge is itself
    assert pool_probs([a, b], [1.0, 0.0]) == pytest.approx(a, abs=1e-12)
    assert pool_probs([b]) == pytest.approx(b, abs=1e-12)
    # offsets on the pooled log-probabilities: log p_pool = mean of the logs - log Z, so a pooled read with offsets
    # equals the argmax of the mean log-probabilities plus the offsets
    off = {"Irrelevant": 0.0, "Partial": 0.6, "Exact": 0.1}
    mean_log = {c: (math.log(a[c]) + math.log(b[c])) / 2 + off[c] for c in a}
    assert apply_offsets(got, None, off) == max(mean_log, key=mean_log.get) == "Partial"
    # a zero probability is floored as apply_offsets floors it, not a -inf
    assert pool_probs([{"x": 0.0, "y": 1.0}, {"x": 1.0, "y": 0.0}])["x"] == pytest.approx(0.5)


def test_pool_probs_bad_input():
    with pytest.raises(ValueError, match="no label"):
        pool_probs([])
    with pytest.raises(ValueError, match="different labels"):
        pool_probs([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="summing to 1"):
        pool_probs([{"a": 1.0}, {"a": 1.0}], [0.5, 0.6])
    with pytest.raises(ValueError, match="one non-negative weight per judge"):
        pool_probs([{"a": 1.0}, {"a": 1.0}], [1.0])


def test_calibrate_writes_she_json_and_eval_uses_it(tmp_path, tiny_model_dir, monkeypatch):
    """`she calibrate` fits on scripted verdict probabilities, writes she.json; `she eval` then passes the
    offsets to generation and reports the uncalibrated scores too."""
    import json
    import shutil

    import she.evaluation.evaluate as ev
    from she.data.synthetic import generate
    from she.evaluation.generate import Judgement
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import builtin_schema

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    recs = [r for r in generate(n_queries=10, products_per_query=3, seed=2)][:24]
    seen = []

    def scripted(model_, tok, records, *, label_offsets=None, **kw):
        seen.append(label_offsets)
        out = []
        for r in records:  # an Exact bias over a ranked gold class, as in test_fit_recovers_a_prior_shift
            p = {lab: 0.15 for lab in LABELS}
            if r.label == "Exact":
                p["Exact"] = 0.7
            else:
                p["Exact"], p[r.label] = 0.5, 0.35
            raw = "Exact"
            parsed = parse_trace("Verdict: Exact", builtin_schema("hd3"))
            out.append(Judgement(r.id, "Verdict: Exact", apply_offsets(p, raw, label_offsets), p, True, parsed, 3,
                                 raw_label=raw))
        return out

    monkeypatch.setattr(ev, "generate_judgements", scripted)
    rep = ev.calibrate(str(model), recs, progress=False)
    assert rep["before"]["pred_share"]["Exact"] == 1.0 and rep["after"]["macro_f1"] == 1.0
    meta = json.loads((model / "she.json").read_text())
    assert meta["label_offsets"] == rep["label_offsets"] and (model / "calibration.json").exists()
    m = ev.evaluate(str(model), recs, tmp_path / "eval", progress=False)
    assert seen[-1] == rep["label_offsets"] and m["macro_f1"] == 1.0 and m["uncalibrated"]["macro_f1"] < 0.5
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert any(p.get("raw_label") == "Exact" and p["label"] != "Exact" for p in preds)
    ev.evaluate(str(model), recs, tmp_path / "eval2", progress=False, calibrated=False)
    assert seen[-1] is None


@pytest.mark.parametrize("evidence, reader, schema", [("computed", "computed_evidence_judgements", "evidence"),
                                                      ("marginal", "marginal_judgements", "decision")])
def test_calibrate_and_eval_keep_each_evidence_modes_offsets_apart(evidence, reader, schema, tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    """``she calibrate/eval --evidence computed|marginal`` fit and read their own offsets (``label_offsets_<mode>``,
    ``calibration_<mode>.json``) and leave the generated mode's alone; the reader is scripted."""
    import json
    import shutil

    import she.evaluation.evaluate as ev
    import she.evaluation.fast as fast
    from she.data.schema import Product, Record
    from she.evaluation.generate import Judgement
    from she.models.metadata import load_she_meta, save_she_meta
    from she.reasoning.parse import parse_trace
    from she.reasoning.schema import default_schema

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    meta = load_she_meta(model)
    meta.update(schema=schema, label_offsets={"Irrelevant": 0.0, "Partial": 1.0, "Exact": 0.0})
    save_she_meta(model, meta)
    recs = [Record(id=f"r{i}", query=q, product=Product(title=q), label=lab)
            for i, (q, lab) in enumerate([("drill", "Partial"), ("faucet", "Partial"), ("lumber", "Exact"),
                                          ("hose", "Irrelevant"), ("hammer", "Exact")])]
    seen = []

    def scripted(model_, tok, records, *, label_offsets=None, **kw):
        seen.append(label_offsets)
        out = []
        for r in records:  # an Exact bias over the gold class: offsets can undo it
            p = P(0.15, 0.15, 0.15)
            p["Exact"], p[r.label] = (0.7, 0.7) if r.label == "Exact" else (0.5, 0.35)
            text = "Verdict: Exact"
            out.append(Judgement(r.id, text, apply_offsets(p, "Exact", label_offsets), p, True,
                                 parse_trace(text, default_schema("hd3")), 0, raw_label="Exact"))
        return out

    monkeypatch.setattr(fast, reader, scripted)
    rep = ev.calibrate(str(model), recs, progress=False, evidence=evidence)
    meta = json.loads((model / "she.json").read_text())
    assert meta[f"label_offsets_{evidence}"] == rep["label_offsets"] and rep["after"]["macro_f1"] == 1.0
    assert meta["label_offsets"] == {"Irrelevant": 0.0, "Partial": 1.0, "Exact": 0.0}  # the generated mode's, kept
    assert (model / f"calibration_{evidence}.json").exists() and not (model / "calibration.json").exists()
    m = ev.evaluate(str(model), recs, tmp_path / "eval", progress=False, evidence=evidence)
    assert seen[-1] == rep["label_offsets"] and m["evidence"] == evidence and m["macro_f1"] == 1.0
