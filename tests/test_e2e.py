"""End to end on CPU with the tiny model: data -> SFT -> eval/predict, through the CLI and the API."""

import json
from pathlib import Path

import pytest

from she.cli import main


def _run(argv):
    try:
        main(argv)
    except SystemExit as e:  # argparse / user errors
        return e.code
    return 0


@pytest.mark.slow
def test_sft_then_eval_and_predict(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.jsonl"
    assert _run(["data", "generate", "--out", str(data), "--queries", "30", "--seed", "3"]) == 0
    n_records = sum(1 for _ in open(data))
    assert n_records == 120

    out = tmp_path / "sft"
    assert _run(["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "3"]) == 0
    final = out / "final"
    assert (final / "config.json").exists() and (final / "she.json").exists()
    assert json.loads((final / "she.json").read_text())["prompt_style"] == "compact"
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())

    ev = tmp_path / "eval"
    assert _run(["eval", "--model", str(final), "--data", str(data), "--split", "test", "--out", str(ev),
                 "--max-new-tokens", "24", "--no-bf16"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    for key in ("macro_f1", "accuracy", "per_class", "format_valid_rate", "n", "confusion"):
        assert key in m
    assert set(m["per_class"]) == {"Irrelevant", "Partial", "Exact"}
    assert m["n"] == sum(v["support"] for v in m["per_class"].values()) > 0
    assert 0.0 <= m["macro_f1"] <= 1.0
    assert (ev / "confusion.png").stat().st_size > 1000
    assert "Macro F1" in (ev / "report.md").read_text()
    preds = [json.loads(l) for l in open(ev / "predictions.jsonl")]
    assert len(preds) == m["n"]

    pout = tmp_path / "preds.jsonl"
    assert _run(["predict", "--model", str(final), "--data", str(data), "--out", str(pout),
                 "--max-new-tokens", "16"]) == 0
    lines = [json.loads(l) for l in open(pout)]
    assert len(lines) == n_records
    assert {"id", "label", "probs", "reasoning"} <= set(lines[0])
    for d in lines:
        if d["probs"] is not None:
            assert abs(sum(d["probs"].values()) - 1.0) < 1e-4


@pytest.mark.slow
def test_sft_resumes_from_checkpoint(tmp_path, tiny_model_dir):
    from she.config import DataConfig, SFTJobConfig
    from she.data.sources import load_splits
    from she.training.trainer_setup import last_checkpoint
    from she.training.sft import train_sft

    cfg = SFTJobConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2,
                       batch_size=4, report_to="none", data=DataConfig(synthetic_queries=20), bf16=False)
    train = load_splits(cfg.data)["train"]
    train_sft(cfg, train)
    assert last_checkpoint(cfg.output_dir).endswith("checkpoint-2")
    cfg.max_steps = 4
    train_sft(cfg, train)
    hist = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert hist[-1]["step"] == 4
    assert last_checkpoint(cfg.output_dir).endswith("checkpoint-4")


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "query": "drill", "product": {"title": "DeWalt drill"}, "label": "Exact"}\n'
                   '{"id": "2", "query": "", "product": {"title": "x"}}\n')
    assert _run(["data", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("she: error:") and "bad.jsonl:2" in err and "query" in err
    assert "Traceback" not in err

    rejects = tmp_path / "rej.jsonl"
    assert _run(["data", "validate", str(bad), "--on-error", "skip", "--rejects", str(rejects)]) == 1
    out = capsys.readouterr().out
    assert "1 ok, 1 rejected" in out
    rows = [json.loads(l) for l in open(rejects)]
    assert len(rows) == 1 and rows[0]["line"] == 2


def test_cli_unknown_model_message(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "query": "drill", "product": {"title": "DeWalt drill"}, "label": "Exact"}\n')
    # --split all: a one-pair file has no held-out test split, and eval no longer scores training pairs unasked
    assert _run(["eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--split", "all",
                 "--out", str(tmp_path / "o")]) == 2
    assert "neither a registered name" in capsys.readouterr().err


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft:\n  epocs: 1\n")
    assert _run(["demo", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['epocs']" in capsys.readouterr().err


def test_teach_then_sft_uses_teacher_traces(tmp_path, tiny_model_dir):
    """`she data teach` against a real local OpenAI-compatible server; wrong-label traces are rejected."""
    import http.server
    import threading

    answer = "Query: drill\nProduct: drill\nType: same\nAttributes: none\nVerdict: Exact"

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        data = tmp_path / "d.jsonl"
        assert _run(["data", "generate", "--out", str(data), "--queries", "6"]) == 0
        gold = {json.loads(l)["id"]: json.loads(l)["label"] for l in open(data)}
        traces = tmp_path / "traces.jsonl"
        assert _run(["data", "teach", str(data), "--out", str(traces), "--base-url",
                     f"http://127.0.0.1:{srv.server_address[1]}/v1", "--teacher-model", "t"]) == 0
    finally:
        srv.shutdown()
    got = [json.loads(l) for l in open(traces)]
    assert {d["id"] for d in got} == {i for i, lab in gold.items() if lab == "Exact"}
    assert all(d["trace"].endswith("Verdict: Exact") for d in got)

    from she.data.schema import Record
    from she.training.sft import build_sft_dataset, load_traces

    recs = [Record.from_dict(json.loads(l)) for l in open(data)]
    ds = build_sft_dataset(recs, traces=load_traces(traces))
    by_id = {r.id: ds[i]["completion"][0]["content"] for i, r in enumerate(recs)}
    for d in got:
        assert by_id[d["id"]] == d["trace"]


@pytest.mark.slow
def test_cli_prm_then_srpo_and_grpo(tmp_path, tiny_model_dir):
    """The RL commands run end to end from YAML on the tiny model: judge training, SRPO with a hybrid
    examiner, vanilla GRPO; each saves an ordinary model folder."""
    data = tmp_path / "d.jsonl"
    assert _run(["data", "generate", "--out", str(data), "--queries", "12"]) == 0
    prm_cfg = tmp_path / "prm.yaml"
    prm_cfg.write_text(
        f"policy: {tiny_model_dir}\njudge_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'prm'}\n"
        "max_records: 6\nmc_continuations: 1\nmax_new_tokens: 16\nadd_reference_traces: true\n"
        "max_steps: 2\nbatch_size: 4\nbf16: false\n"
    )
    assert _run(["train", "prm", "--config", str(prm_cfg), "--data", str(data)]) == 0
    judge_dir = tmp_path / "prm" / "judge"
    assert (judge_dir / "she_judge.json").exists()
    m = json.loads((tmp_path / "prm" / "metrics.json").read_text())
    assert m  # the held-out judge metrics were written

    rl_cfg = tmp_path / "rl.yaml"
    rl_cfg.write_text("examiner: hybrid\nmax_steps: 2\nnum_generations: 2\nprompts_per_step: 1\n"
                      "max_completion_length: 12\nbf16: false\nreport_to: none\nsave_steps: 1\n")
    for algo in ("srpo", "grpo"):
        out = tmp_path / algo
        assert _run(["train", algo, "--config", str(rl_cfg), "--model", str(tiny_model_dir), "--data", str(data),
                     "--judge", str(judge_dir), "--output-dir", str(out)]) == 0
        assert (out / "final" / "config.json").exists() and (out / "checkpoint-2").is_dir()
        hist = json.loads((out / "log_history.json").read_text())
        assert any("srpo/outcome_reward" in h for h in hist)


def test_eval_data_config_uses_the_jobs_split_and_caps(tmp_path, tiny_model_dir):
    """`she eval --data-config JOB.yaml` evaluates the same seeded, capped test sample as that job."""
    from she.config import DataConfig
    from she.data.sources import load_splits

    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: x\ndata:\n  synthetic_queries: 40\n  split_seed: 5\n  max_eval: 7\n")
    ev = tmp_path / "ev"
    assert _run(["eval", "--model", str(tiny_model_dir), "--data-config", str(cfg), "--out", str(ev),
                 "--max-new-tokens", "4", "--no-bf16"]) == 0
    expected = load_splits(DataConfig(synthetic_queries=40, split_seed=5, max_eval=7))["test"]
    got = [json.loads(line)["id"] for line in open(ev / "predictions.jsonl")]
    assert got == [r.id for r in expected] and len(got) == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n")
    assert _run(["eval", "--model", str(tiny_model_dir), "--data-config", str(bad), "--out", str(ev)]) == 2


def _tiny_demo(tmp_path, model_dir, sft_extra: str, rest: str) -> tuple[Path, dict]:
    """`she demo` of the tiny model on a tiny synthetic set, calibrated on 4 pairs: its folder and summary.json."""
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(
        f"model: {model_dir}\noutput_dir: {tmp_path / 'demo'}\n"
        "data: {synthetic_queries: 12, synthetic_products_per_query: 3, max_train: 16, max_eval: 8}\n"
        f"sft: {{max_steps: 2, batch_size: 4, bf16: false, save_steps: 2, report_to: none{sft_extra}}}\n"
        "eval_batch_size: 8\ncalibration_pairs: 4\n" + rest
    )
    assert _run(["demo", "--config", str(cfg)]) == 0
    return tmp_path / "demo", json.loads((tmp_path / "demo" / "summary.json").read_text())


@pytest.mark.slow
def test_demo_runs_sft_then_srpo_and_reports_both(tmp_path, tiny_model_dir):
    """The main job: base / SFT / SRPO side by side, with predicted-class shares and the SRPO curves."""
    out, summary = _tiny_demo(tmp_path, tiny_model_dir, "",
                              "max_new_tokens: 12\n"
                              "rl: {max_steps: 2, num_generations: 2, prompts_per_step: 1, max_completion_length: 12,\n"
                              "     bf16: false, save_steps: 1, examiner_check: warn}\n")
    names = list(summary["rows"])
    assert names[0] == "base (zero-shot)" and names[1] == "SFT" and names[2].startswith("SRPO (srpo_gated, 2 steps)")
    report = (out / "report.md").read_text()
    assert "predicted (Irr/Par/Exa)" in report and "| SRPO (srpo_gated, 2 steps) |" in report
    assert (out / "srpo" / "final" / "she.json").exists() and (out / "srpo" / "examiner_check.json").exists()
    assert (out / "srpo" / "collapse.png").exists() and "srpo" in summary["timings"]
    assert ("[base](eval_base/confusion.png), [sft](eval_sft/confusion.png), [srpo](eval_srpo/confusion.png)"
            in report and "[collapse signs](srpo/collapse.png)" in report)
    # both models were calibrated on validation pairs before their evaluations (both rows read alike), and the
    # SFT's offsets did not travel into the SRPO folder: its own calibration wrote them
    for stage, key in (("sft", "calibration_sft"), ("srpo", "calibration")):
        meta = json.loads((out / stage / "final" / "she.json").read_text())
        cal = json.loads((out / stage / "final" / "calibration.json").read_text())
        assert key in summary["timings"] and meta["label_offsets"] == cal["label_offsets"], stage


@pytest.mark.slow
def test_demo_reads_each_evidence_mode_with_its_own_offsets(tmp_path, tiny_model_dir):
    """`evidence: [computed, generated]`: the demo calibrates and evaluates the model in each read, the first one
    the headline; each read's offsets go to their own she.json key."""
    out, summary = _tiny_demo(tmp_path, tiny_model_dir, ", schema: evidence, prompt_style: compact",
                              "max_new_tokens: 24\neval_before: false\nrl: null\nevidence: [computed, generated]\n")
    assert list(summary["rows"])[:2] == ["SFT (computed evidence)", "SFT"]
    assert json.loads((out / "eval_sft_computed" / "metrics.json").read_text())["evidence"] == "computed"
    assert json.loads((out / "eval_sft" / "metrics.json").read_text())["evidence"] == "generated"
    meta = json.loads((out / "sft" / "final" / "she.json").read_text())
    for evidence, key, name in (("computed", "label_offsets_computed", "calibration_computed.json"),
                                ("generated", "label_offsets", "calibration.json")):
        cal = json.loads((out / "sft" / "final" / name).read_text())
        assert cal["evidence"] == evidence and meta[key] == cal["label_offsets"]
    assert "calibration_computed" in summary["timings"] and "eval_sft_computed" in summary["timings"]
    report = (out / "report.md").read_text()  # links to what was written: no base, no RL curves
    assert "[sft_computed](eval_sft_computed/confusion.png), [sft](eval_sft/confusion.png)." in report
    assert "eval_base" not in report and "RL curves" not in report


def test_demo_report_links_only_files_that_exist(tmp_path):
    from she.recipes.demo import _links

    folders = ["eval_base", "eval_sft_computed", "eval_srpo_computed"]
    assert _links(tmp_path, folders) == ""
    for f in ("eval_sft_computed/confusion.png", "eval_srpo_computed/confusion.png", "srpo/reward.png"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"png")
    assert _links(tmp_path, folders) == ("Confusion matrices: [sft_computed](eval_sft_computed/confusion.png), "
                                "[srpo_computed](eval_srpo_computed/confusion.png). RL curves: "
                                "[reward](srpo/reward.png).")


def test_demo_config_evidence_is_checked(tmp_path):
    """An unknown read is a config error naming the field; an empty list is refused before any training."""
    import typing

    from she.config import ConfigError, DemoConfig, Evidence, load_config
    from she.errors import UserError
    from she.models.metadata import EVIDENCE_MODES
    from she.recipes.demo import _reads

    bad = tmp_path / "bad.yaml"
    bad.write_text("evidence: [computed, guessed]\n")
    with pytest.raises(ConfigError, match="evidence"):
        load_config(DemoConfig, bad)
    assert typing.get_args(Evidence) == EVIDENCE_MODES  # the config's reads are the ones she.models knows
    assert _reads(DemoConfig(evidence="computed")) == ["computed"]
    assert _reads(DemoConfig(evidence=["computed", "generated", "computed"])) == ["computed", "generated"]
    with pytest.raises(UserError, match="evidence"):
        _reads(DemoConfig(evidence=[]))
