"""The generative step judge: format, one-pass scoring, MC/fact labels, training, AUC, remote judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from she.data.synthetic import generate
from she.evaluation.metrics import roc_auc
from she.models.registry import load_model_and_tokenizer
from she.reasoning.parse import parse_trace
from she.reasoning.prompts import user_message
from she.reasoning.rationale import write_rationale
from she.reasoning.schema import default_schema
from she.rewards.judge import (
    JudgeFormat,
    RemoteJudge,
    StepJudge,
    auto_verdicts,
    parse_remote_verdicts,
    verdict_token_ids,
)
from she.training.prm import (
    PolicySampler,
    build_prm_dataset,
    load_prm_rows,
    mc_needed,
    mean_verdict_loss,
    merge_step_labels,
    run_prm_job,
    split_rows_by_group,
    train_judge,
)

torch.set_num_threads(1)
SCHEMA = default_schema("hd3")


@pytest.fixture(scope="module")
def records():
    return generate(n_queries=4, products_per_query=2, seed=3)


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    return StepJudge(model, tok, batch_size=8)


def _items(records):
    return [(parse_trace(write_rationale(r), SCHEMA), r) for r in records]


# -- format ------------------------------------------------------------------------------------------
def test_verdict_words_must_be_single_distinct_tokens(judge):
    tok = judge.tokenizer
    assert auto_verdicts(tok) == ("+", "-")  # " good" is two tokens in the tiny tokenizer
    assert (judge.fmt.good, judge.fmt.bad) == ("+", "-")
    assert verdict_token_ids(tok, "+", "-") == (tok.encode("+")[0], tok.encode("-")[0])
    with pytest.raises(ValueError, match=r"' good' is 2 tokens"):
        verdict_token_ids(tok, " good", " bad")
    with pytest.raises(ValueError, match="must differ"):
        JudgeFormat(good="+", bad="+")

    class Collide:  # a tokenizer mapping both words to one id
        name_or_path = "fake"

        def encode(self, text, add_special_tokens=False):
            return [7]

    with pytest.raises(ValueError, match="same token 7"):
        verdict_token_ids(Collide(), "yes", "no")


def test_encode_places_one_placeholder_slot_after_each_step(judge):
    enc = judge.encode("Query: drill", ["Type: same", "Verdict: Exact"])
    assert len(enc.positions) == 2 and enc.n_steps == 2
    assert [enc.input_ids[p] for p in enc.positions] == [judge.good_id, judge.good_id]
    assert enc.positions[-1] == len(enc.input_ids) - 1
    marker = judge.tokenizer.encode(judge.fmt.marker, add_special_tokens=False)
    for p in enc.positions:
        assert enc.input_ids[p - len(marker) : p] == marker
    assert judge.tokenizer.decode(enc.input_ids).endswith("Type: same\nThis step is+\nVerdict: Exact\nThis step is+")


# -- one-pass scoring ----------------------------------------------------------------------------------
def test_one_forward_equals_step_by_step_forwards(judge, records):
    """Reference: k separate full-model forwards of prefixes built with the tokenizer directly."""
    tok, model = judge.tokenizer, judge.model
    for parsed, record in _items(records[:3]):
        fast = judge.score_steps(parsed, record)
        assert len(fast) == len(parsed.steps) == 5
        ids = tok.encode(judge.prefix_text(user_message(record)), add_special_tokens=False)
        marker = tok.encode(judge.fmt.marker, add_special_tokens=False)
        for k, step in enumerate(parsed.steps):
            ids = ids + tok.encode(("\n" if k else "") + step.text, add_special_tokens=False) + marker
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ref = torch.softmax(logits[[judge.good_id, judge.bad_id]].double(), -1)[0].item()
            assert fast[k] == pytest.approx(ref, abs=1e-5)
            ids = ids + [judge.good_id]


def test_scores_do_not_depend_on_batching_or_padding(judge, records):
    items = _items(records)
    # make one trace much longer so the others are padded in a shared batch
    long_parsed = parse_trace(write_rationale(records[0]).replace("Query: ", "Query: " + "very " * 30, 1), SCHEMA)
    items = [(long_parsed, records[0])] + items
    alone = [judge.score_steps(p, r) for p, r in items]
    judge.batch_size = 8
    together = judge.score_steps_batch(items)
    judge.batch_size = 3
    reversed_ = judge.score_steps_batch(items[::-1])[::-1]
    for a, b, c in zip(alone, together, reversed_):
        assert len(a) == len(b) == len(c)
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        assert torch.allclose(torch.tensor(a), torch.tensor(c), atol=1e-5)
    assert alone[0] != alone[1]  # the long query really is a different input
    assert judge.score_steps_batch([]) == []


def test_steps_beyond_max_length_get_no_score(judge, records):
    parsed, record = _items(records[:1])[0]
    n_prefix = len(judge.encode(user_message(record), []).input_ids)
    short = StepJudge(judge.model, judge.tokenizer, JudgeFormat(good="+", bad="-", max_length=n_prefix + 30))
    scores = short.score_steps(parsed, record)
    full = judge.score_steps(parsed, record)
    assert len(scores) == 5 and scores[-1] is None and scores[0] is not None
    kept = [s for s in scores if s is not None]
    assert kept == pytest.approx(full[: len(kept)], abs=1e-6)


# -- labels ----------------------------------------------------------------------------------------------
def _fake_sampler(record_traces: dict[str, str], good: int, total: int, calls: list):
    """Continuations: the rest of the record's correct trace ``good`` times, a wrong label otherwise."""

    def sampler(requests, n, temperature):
        assert n == total
        out = []
        for record, prefix in requests:
            calls.append(prefix)
            full = record_traces[record.id]
            assert full.startswith(prefix)
            rest = full[len(prefix):]
            wrong_label = "Irrelevant" if record.label != "Irrelevant" else "Exact"
            wrong = rest.replace(f"Verdict: {record.label}", f"Verdict: {wrong_label}")
            out.append([rest] * good + [wrong] * (total - good - 1) + ["garbage"])
        return out

    return sampler


def test_monte_carlo_shares_hard_and_soft(records):
    rec = records[0]
    traces = {rec.id: write_rationale(rec)}
    common = dict(rollouts_per_record=0, add_reference_traces=True, mc_continuations=4, use_facts=False,
                  facts_priority="mc")
    calls: list[str] = []
    rows, stats = build_prm_dataset([rec], _fake_sampler(traces, 1, 4, calls), label_mode="soft", **common)
    assert len(rows) == 1 and len(rows[0]["completions"]) == 5
    # 1 of 4 continuations reaches the gold label for the 4 steps before the verdict; the verdict step is
    # the (right) label itself, so its outcome is known without sampling
    assert rows[0]["labels"] == [0.25, 0.25, 0.25, 0.25, 1.0]
    assert rows[0]["label_sources"] == ["mc"] * 4 + ["outcome"]
    assert len(calls) == 4 and stats["generations_mc"] == 16
    rows_h, _ = build_prm_dataset([rec], _fake_sampler(traces, 1, 4, []), label_mode="hard", **common)
    assert rows_h[0]["labels"] == [True, True, True, True, True]
    rows_0, _ = build_prm_dataset([rec], _fake_sampler(traces, 0, 4, []), label_mode="hard", **common)
    assert rows_0[0]["labels"] == [False, False, False, False, True]


def test_monte_carlo_on_the_tiny_policy_shapes_and_variants(tiny_model_dir, records):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    recs = records[:2]
    out = {}
    for mode in ("soft", "hard"):
        sampler = PolicySampler(model, tok, max_new_tokens=12, batch_size=8, seed=5)
        rows, stats = build_prm_dataset(recs, sampler, rollouts_per_record=1, add_reference_traces=True,
                                        mc_continuations=2, use_facts=False, facts_priority="mc", label_mode=mode)
        assert stats["generations_rollouts"] == 2 and stats["rollouts"] == 4
        # every step before a trace's verdict costs M = 2 generations
        assert sampler.generations == 2 + stats["generations_mc"]
        assert stats["generations_mc"] == 2 * sum(
            lab_src == "mc" for r in rows for lab_src in r["label_sources"])
        for r in rows:
            assert len(r["labels"]) == len(r["completions"]) == len(r["label_sources"])
            assert all(0.0 <= float(v) <= 1.0 for v in r["labels"])
        out[mode] = rows
    ref_soft = [r for r in out["soft"] if r["rollout"] == "reference"]
    ref_hard = [r for r in out["hard"] if r["rollout"] == "reference"]
    assert len(ref_soft) == len(ref_hard) == 2
    for s, h in zip(ref_soft, ref_hard):  # same seed -> same continuations -> hard == (soft > 0)
        assert all(isinstance(v, float) for v in s["labels"]) and all(isinstance(v, bool) for v in h["labels"])
        assert h["labels"] == [v > 0 for v in s["labels"]]
        assert s["labels"][-1] == 1.0  # the rationale's verdict is the gold label


def test_merge_facts_override_mc_by_default():
    mc = [0.25, 0.0, 1.0, None]
    facts = [None, 1.0, 0.0, None]
    assert merge_step_labels(mc, facts) == ([0.25, 1.0, 0.0, None], ["mc", "facts", "facts", None])
    assert merge_step_labels(mc, facts, unknown="skip") == ([None, 1.0, 0.0, None], [None, "facts", "facts", None])
    assert merge_step_labels(mc, facts, priority="mc") == ([0.25, 0.0, 1.0, None], ["mc", "mc", "mc", None])
    assert merge_step_labels([None, None], [1.0, None], priority="mc") == ([1.0, None], ["facts", None])
    assert mc_needed(facts) == [True, False, False, True]
    assert mc_needed(facts, unknown="skip") == [False] * 4
    assert mc_needed(facts, priority="mc") == [True] * 4
    with pytest.raises(ValueError, match="facts_priority"):
        merge_step_labels(mc, facts, priority="judge")


def test_facts_override_mc_in_the_dataset(records):
    rec = next(r for r in records if r.facts.type_relation is not None and r.facts.negation != "yes")
    traces = {rec.id: write_rationale(rec)}
    calls: list[str] = []
    # every continuation is wrong: MC would say 0 for every step before the verdict
    rows, stats = build_prm_dataset([rec], _fake_sampler(traces, 0, 3, calls), rollouts_per_record=0,
                                    add_reference_traces=True, mc_continuations=3, label_mode="hard")
    row = rows[0]
    keys = [c.split(":")[0] for c in row["completions"]]
    assert keys == ["Query", "Product", "Type", "Attributes", "Verdict"]
    by_key = dict(zip(keys, zip(row["labels"], row["label_sources"])))
    assert by_key["Type"] == (True, "facts")  # the rule-based rationale's type is the fact
    assert by_key["Verdict"] == (True, "facts")
    assert by_key["Query"] == (False, "mc") and by_key["Product"] == (False, "mc")
    # MC was only run where no fact exists (Query and Product; Attributes too when it has no fact)
    asked = {p.rstrip("\n").rsplit("\n", 1)[-1].split(":")[0] for p in calls}
    assert "Type" not in asked and {"Query", "Product"} <= asked


def test_rows_file_roundtrip_and_errors(tmp_path):
    from she.training.prm import save_prm_rows

    rows = [{"prompt": "Query: a", "completions": ["Type: same", "Verdict: Exact"], "labels": [True, 0.5],
             "query_id": "q1"}]
    p = save_prm_rows(rows, tmp_path / "d.jsonl")
    assert load_prm_rows(p) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "labels": [True, 1.5]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'labels\[1\]' is 1.5"):
        load_prm_rows(bad)
    bad.write_text(json.dumps({**rows[0], "labels": [True]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'labels' must be a list with one entry per completion"):
        load_prm_rows(bad)


def test_split_rows_keeps_query_groups_together():
    rows = [{"prompt": "p", "completions": ["a"], "labels": [1], "query_id": f"q{i % 5}"} for i in range(20)]
    train, held = split_rows_by_group(rows, 0.4, seed=1)
    assert len(train) + len(held) == 20
    assert {r["query_id"] for r in train}.isdisjoint({r["query_id"] for r in held})
    assert len({r["query_id"] for r in held}) == 2


# -- training ---------------------------------------------------------------------------------------------
def test_a_few_training_steps_reduce_the_verdict_loss(tiny_model_dir, records):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    judge = StepJudge(model, tok)
    rows = []
    for i, r in enumerate(records):
        steps = write_rationale(r).split("\n")
        rows.append({"prompt": user_message(r), "completions": steps,
                     "labels": [bool((i + k) % 3) for k in range(len(steps))]})
    before = mean_verdict_loss(judge, rows)
    w0 = model.get_output_embeddings().weight.detach().clone()
    hist = train_judge(judge, rows, max_steps=25, learning_rate=3e-3, batch_size=4, logging_steps=5, progress=False)
    after = mean_verdict_loss(judge, rows)
    assert len(hist) == 5 and hist[-1]["step"] == 25
    assert not torch.equal(w0, model.get_output_embeddings().weight)
    assert after < before * 0.8, (before, after)


# -- AUC --------------------------------------------------------------------------------------------------
def test_roc_auc_hand_computed():
    # positives 0.35 and 0.8 vs negatives 0.1 and 0.4: pairs won 1 + 2 of 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1) / 2
    assert roc_auc([0.2, 0.2, 0.9], [True, False, True]) == pytest.approx(0.75)
    assert roc_auc([0.1, 0.2, 0.3], [False, False, True]) == 1.0
    assert roc_auc([0.1, 0.2, 0.3], [True, False, False]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert roc_auc([0.3, 0.7], [True, True]) is None
    with pytest.raises(ValueError):
        roc_auc([0.1], [True, False])


# -- saving and the job ---------------------------------------------------------------------------------
def test_save_and_load_keeps_format_and_scores(judge, records, tmp_path):
    d = judge.save_pretrained(tmp_path / "j")
    meta = json.loads((d / "she_judge.json").read_text())
    assert meta["format"]["good"] == "+" and meta["verdict_token_ids"] == [judge.good_id, judge.bad_id]
    again = StepJudge.from_pretrained(str(d))
    items = _items(records[:2])
    assert again.fmt == judge.fmt
    assert torch.allclose(torch.tensor(again.score_steps_batch(items)), torch.tensor(judge.score_steps_batch(items)), atol=1e-6)


def test_run_prm_job_on_tiny(tiny_model_dir, tmp_path):
    from she.config import DataConfig, PRMJobConfig

    cfg = PRMJobConfig(
        policy=str(tiny_model_dir), judge_model=str(tiny_model_dir), output_dir=str(tmp_path / "prm"),
        data=DataConfig(synthetic_queries=4, synthetic_products_per_query=2), split="all", max_records=6,
        eval_fraction=0.34, add_reference_traces=True, mc_continuations=1, max_new_tokens=8,
        generation_batch_size=16, max_steps=3, batch_size=4, bf16=False, logging_steps=1,
    )
    out = run_prm_job(cfg, progress=False)
    metrics = json.loads(Path(out["metrics_file"]).read_text())
    assert metrics["labelling"]["reference_traces"] == 6
    assert metrics["train_rows"] > 0 and metrics["eval_rows"] > 0
    for part in ("before", "after"):
        m = metrics[part]
        assert m["steps"] > 0 and 0 <= m["accuracy"] <= 1
        assert m["auc"] is None or 0 <= m["auc"] <= 1
    rows = load_prm_rows(out["dataset"])
    assert len(rows) == metrics["labelling"]["rows"]
    assert (Path(out["judge_dir"]) / "she_judge.json").exists()
    assert len(json.loads((tmp_path / "prm" / "log_history.json").read_text())) == 3


# -- remote judge -----------------------------------------------------------------------------------------
ANSWERS = {
    "good": "1: good\n2: **bad**\n3. good",
    "bare": "<think>1: bad?</think>\ngood\nbad\ngood",
    "partial": "1: good\n3: bad\n2: good\n2: bad",
    "garbage": "The product seems fine overall.",
}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["messages"][-1]["content"].split("\n")[0].removeprefix("Query: ").strip()
        if query == "error500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        payload = {"choices": [{"message": {"role": "assistant", "content": ANSWERS[query]}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _trace_for(query: str):
    from dataclasses import replace

    rec = replace(generate(n_queries=1, products_per_query=1, seed=0)[0], query=query)
    parsed = parse_trace("Query: x\nType: same\nVerdict: Exact", SCHEMA)
    return parsed, rec


def test_parse_remote_verdicts():
    assert parse_remote_verdicts(ANSWERS["good"], 3) == [1.0, 0.0, 1.0]
    assert parse_remote_verdicts(ANSWERS["bare"], 3) == [1.0, 0.0, 1.0]
    assert parse_remote_verdicts("good\nbad", 3) == [None, None, None]  # two bare verdicts for three steps
    assert parse_remote_verdicts(ANSWERS["partial"], 3) == [1.0, None, 0.0]  # step 2 contradicts itself
    assert parse_remote_verdicts(ANSWERS["garbage"], 2) == [None, None]
    assert parse_remote_verdicts(None, 1) == [None]


def test_remote_judge_against_a_local_server(server):
    judge = RemoteJudge(server, "m", timeout=5, max_retries=1, backoff=0.0)
    assert judge.score_steps(*_trace_for("good")) == [1.0, 0.0, 1.0]
    assert judge.score_steps(*_trace_for("partial")) == [1.0, 0.5, 0.0]
    assert judge.score_steps(*_trace_for("garbage")) == [0.5, 0.5, 0.5]
    assert judge.score_steps_batch([_trace_for("error500"), _trace_for("bare")]) == [[0.5, 0.5, 0.5], [1.0, 0.0, 1.0]]
    s = judge.stats
    assert (s.requests, s.failed_requests, s.unparseable_answers, s.steps, s.neutral_steps) == (5, 1, 2, 15, 7)
    assert any("HTTP 500" in e for e in s.errors)
    msgs = judge.messages(*_trace_for("good"))
    assert "1. Query: x\n2. Type: same\n3. Verdict: Exact" in msgs[1]["content"]


def test_remote_judge_dead_server_is_neutral():
    judge = RemoteJudge("http://127.0.0.1:9/v1", "m", timeout=1, max_retries=0, backoff=0.0)
    assert judge.score_steps(*_trace_for("good")) == [0.5, 0.5, 0.5]
    assert judge.stats.failed_requests == 1


def test_both_judges_are_batch_step_examiners():
    """HybridExaminer's batch call is a declared protocol, which both judges implement."""
    from she.rewards.judge import BatchStepExaminer, RemoteJudge

    assert issubclass(StepJudge, BatchStepExaminer) and issubclass(RemoteJudge, BatchStepExaminer)
