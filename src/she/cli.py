"""The ``she`` command line.

    she model prepare smollm2-135m
    she data validate|stats|split|generate ...
    she data facts build|show|export ...
    she data filter|diverse ...   (difficulty band / diverse subset, docs/sampling.md)
    she train sft [--config configs/sft.yaml] [--data FILE] ...
    she train dpo|rm|cross-encoder --config ...   (baselines, docs/baselines.md)
    she train curriculum --config configs/curriculum-demo.yaml
    she eval --model DIR --data FILE --out DIR
    she predict --model DIR --data FILE --out preds.jsonl [--fast]
    she serve --model DIR [--host 127.0.0.1] [--port 8000]   (docs/serving.md)
    she annotate serve --data FILE --facts facts.sqlite --tokens FILE [--model DIR --judge DIR] --port N
    she demo
    she compare configs/compare-cpu.yaml [--output-dir DIR] [--rows a,b,c]   (docs/baselines.md)

User errors (bad files, bad configs, unknown models) print one clear line and exit with status 2;
``SHE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local folders
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FORMATS = ["auto", "home-depot", "esci", "wands", "jsonl"]


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, help="data file or folder (default: the synthetic generator)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--taxonomy", default=None, help="hd3 | esci4 | taobao4")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="bad rows: fail (default) or skip them and write a rejects file")


def _data_overrides(a) -> dict:
    return {"data.path": a.data, "data.format": a.format, "data.taxonomy": a.taxonomy, "data.on_error": a.on_error}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="she", description="Stepwise Hybrid Examination: LLM relevance judges")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("model", help="model cache").add_subparsers(dest="model_cmd", required=True)
    mp = m.add_parser("prepare", help="convert a registered model into a save_pretrained folder in the cache")
    mp.add_argument("name", choices=["smollm2-135m", "tiny"])
    mp.add_argument("--force", action="store_true")

    d = sub.add_parser("data", help="validate, describe, split or generate data").add_subparsers(dest="data_cmd", required=True)
    dv = d.add_parser("validate", help="check every row; report file, line and field of each bad row")
    dv.add_argument("path")
    dv.add_argument("--format", default="auto", choices=FORMATS)
    dv.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    dv.add_argument("--rejects", default=None, help="rejects file (default: <input>.rejects.jsonl)")
    ds = d.add_parser("stats", help="counts, label mix, query types, fact coverage")
    ds.add_argument("path")
    ds.add_argument("--format", default="auto", choices=FORMATS)
    dsp = d.add_parser("split", help="query-disjoint seeded train/validation/test split to JSONL")
    dsp.add_argument("path")
    dsp.add_argument("--out", required=True)
    dsp.add_argument("--format", default="auto", choices=FORMATS)
    dsp.add_argument("--seed", type=int, default=0)
    dsp.add_argument("--fractions", default="0.8,0.1,0.1", help="train,validation,test")
    dg = d.add_parser("generate", help="write the synthetic catalogue and query log as JSONL")
    dg.add_argument("--out", required=True)
    dg.add_argument("--queries", type=int, default=300)
    dg.add_argument("--products-per-query", type=int, default=4)
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--taxonomy", default="hd3")

    dt = d.add_parser("teach", help="SFT traces from an OpenAI-compatible teacher; wrong-label traces rejected")
    dt.add_argument("path")
    dt.add_argument("--out", required=True, help="traces JSONL: {id, trace} per accepted record")
    dt.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    dt.add_argument("--teacher-model", required=True)
    dt.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    dt.add_argument("--format", default="auto", choices=FORMATS)
    dt.add_argument("--n", type=int, default=1, help="samples per record")
    from she.recipes.sampling import add_data_parsers, add_train_parser

    add_data_parsers(d, _add_data_args)  # she data filter | diverse (docs/sampling.md)
    df = d.add_parser("facts", help="fact store: human step facts by record id (SQLite) for the verifier")
    dfs = df.add_subparsers(dest="facts_cmd", required=True)
    dfb = dfs.add_parser("build", help="validate annotation JSONL files into a fact store")
    dfb.add_argument("paths", nargs="+", help='JSONL: {"id": ..., "facts": {...}} or full records with facts')
    dfb.add_argument("--out", required=True, help="the store file, e.g. facts.sqlite (replaced atomically)")
    dfb.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    dfb.add_argument("--rejects", default=None, help="rejects file (default: <out>.rejects.jsonl)")
    dfw = dfs.add_parser("show", help="print the stored facts of record ids as JSON lines")
    dfw.add_argument("--store", required=True)
    dfw.add_argument("ids", nargs="+")
    dfe = dfs.add_parser("export", help="write the store's facts as JSONL (rebuildable), optionally the answer log")
    dfe.add_argument("--store", required=True)
    dfe.add_argument("--out", required=True, help='facts JSONL: {"id", "facts"} per record')
    dfe.add_argument("--answers", default=None, help="also write the annotation log (annotator, time, ...) here")

    t = sub.add_parser("train", help="training jobs").add_subparsers(dest="train_cmd", required=True)
    ts = t.add_parser("sft", help="supervised warm start on reasoning traces (TRL SFTTrainer)")
    ts.add_argument("--config", default=None, help="YAML SFT config")
    ts.add_argument("--model", default=None, help="registered name or save_pretrained folder")
    ts.add_argument("--output-dir", default=None)
    ts.add_argument("--target", default=None, choices=["reasoning", "label"])
    ts.add_argument("--epochs", type=float, default=None)
    ts.add_argument("--max-steps", type=int, default=None)
    ts.add_argument("--lora", action="store_true", default=None)
    ts.add_argument("--traces", default=None, help="teacher traces JSONL from `she data teach` (else rule-based)")
    ts.add_argument("--schema", default=None,
                    help="step schema: default | coverage (adds a Missing step) | a YAML/JSON schema file")
    _add_data_args(ts)

    for algo, helptext in (("srpo", "SRPO: stepwise hybrid-examined RL (TRL GRPOTrainer + per-token step advantages)"),
                           ("grpo", "vanilla GRPO: the same trainer with step rewards off")):
        tr = t.add_parser(algo, help=helptext)
        tr.add_argument("--config", default=None, help="YAML RL config")
        tr.add_argument("--model", default=None, help="SFT checkpoint folder (or registered name)")
        tr.add_argument("--output-dir", default=None)
        tr.add_argument("--max-steps", type=int, default=None)
        tr.add_argument("--judge", default=None, help="judge folder from `she train prm` (examiner hybrid/blend)")
        tr.add_argument("--facts-store", default=None, help="fact store from `she data facts build`")
        tr.add_argument("--reward-model", default=None,
                        help="scalar RM folder from `she train rm`: its score replaces the label reward (scalar-RM GRPO)")
        _add_data_args(tr)
    for algo, helptext in (("dpo", "baseline: DPO on pass@N preference pairs of the SFT policy (TRL DPOTrainer)"),
                           ("rm", "baseline: scalar reward model on the same pass@N pairs (TRL RewardTrainer)"),
                           ("cross-encoder", "baseline: MiniLM cross-encoder classifier over [query, product]")):
        tb = t.add_parser(algo, help=helptext)
        tb.add_argument("--config", default=None, help="YAML config (docs/baselines.md)")
        tb.add_argument("--model", default=None, help="base model: SFT folder (dpo, rm) or BERT-like folder/minilm")
        tb.add_argument("--output-dir", default=None)
        tb.add_argument("--max-steps", type=int, default=None)
        _add_data_args(tb)
    tp = t.add_parser("prm", help="train the generative stepwise reward model (the judge)")
    tp.add_argument("--config", default=None, help="YAML PRM config")
    tp.add_argument("--policy", default=None, help="policy folder whose rollouts are labelled")
    tp.add_argument("--judge-model", default=None)
    tp.add_argument("--output-dir", default=None)
    tp.add_argument("--max-steps", type=int, default=None)
    tp.add_argument("--facts-store", default=None, help="fact store from `she data facts build`")
    _add_data_args(tp)
    add_train_parser(t, _add_data_args)  # she train curriculum

    e = sub.add_parser("eval", help="generate, parse and score judgements; metrics.json, report.md, confusion.png")
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--split", default=None, help="all (default with --data) | train | validation | test")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=96)
    e.add_argument("--no-bf16", action="store_true")
    e.add_argument("--data-config", default=None,
                   help="YAML of any job (its `data:` section is used): the same seeded split and caps as that job")
    _add_data_args(e)

    pr = sub.add_parser("predict", help="one JSON line per pair: label, class probabilities, reasoning")
    pr.add_argument("--model", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--max-new-tokens", type=int, default=96)
    pr.add_argument("--fast", action="store_true",
                    help="label only, one forward pass, no reasoning (approximate for reasoning models; docs/serving.md)")
    _add_data_args(pr, required=True)

    sv = sub.add_parser("serve", help="HTTP relevance service + OpenAI-compatible chat endpoint (docs/serving.md)")
    sv.add_argument("--model", required=True, help="registered name or save_pretrained folder")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=64, help="pairs per model batch")
    sv.add_argument("--batch-wait-ms", type=float, default=5, help="longest wait to fill a batch")
    sv.add_argument("--max-request-pairs", type=int, default=256)
    sv.add_argument("--max-text-chars", type=int, default=2000)
    sv.add_argument("--max-new-tokens", type=int, default=96, help="reasoning length in full mode")
    sv.add_argument("--taxonomy", default=None, help="default: the model's she.json, else hd3")

    dm = sub.add_parser("demo", help="the main job: data -> base eval -> SFT -> eval -> report")
    dm.add_argument("--config", default=None)
    dm.add_argument("--model", default=None)
    dm.add_argument("--output-dir", default=None)
    dm.add_argument("--max-steps", type=int, default=None)
    dm.add_argument("--skip-base-eval", action="store_true", help="do not evaluate the untrained model")
    _add_data_args(dm)

    from she.annotation.commands import add_parser as add_annotate_parser

    add_annotate_parser(sub)  # she annotate serve (docs/annotation.md)

    cp = sub.add_parser("compare", help="every baseline and ablation from one SFT start at equal budget; resumable "
                                        "(docs/baselines.md)")
    cp.add_argument("config", help="YAML compare config (configs/compare-*.yaml)")
    cp.add_argument("--output-dir", default=None)
    cp.add_argument("--rows", default=None, help="comma-separated rows to run (default: the config's rows, else all)")
    return p


def _cmd_model(a) -> None:
    from she.models.registry import prepare

    print(prepare(a.name, force=a.force))


def _cmd_data(a) -> None:
    from she.data import commands

    if a.data_cmd == "validate":
        rep = commands.validate(a.path, a.format, a.on_error, a.rejects)
        print(f"{a.path}: {rep.n_ok} ok, {rep.n_rejected} rejected of {rep.n_read} rows"
              + (f"; rejects written to {rep.rejects_path}" if rep.n_rejected else ""))
        if rep.errors:
            sys.exit(1)
    elif a.data_cmd == "stats":
        from she.data.loaders import load_records

        records, _ = load_records(a.path, a.format)
        print(commands.format_stats(commands.stats(records)))
    elif a.data_cmd == "split":
        fr = [float(x) for x in a.fractions.split(",")]
        if len(fr) != 3:
            raise ValueError("--fractions needs three numbers: train,validation,test")
        paths = commands.split(a.path, a.format, a.out, dict(zip(["train", "validation", "test"], fr)), a.seed)
        for name, path in paths.items():
            print(f"{name}: {path}")
    elif a.data_cmd == "generate":
        from she.data.loaders import save_jsonl
        from she.data.synthetic import generate

        recs = generate(n_queries=a.queries, products_per_query=a.products_per_query, seed=a.seed, taxonomy=a.taxonomy)
        save_jsonl(recs, a.out)
        print(f"wrote {len(recs)} records to {a.out}")
    elif a.data_cmd == "teach":
        from she.data.loaders import load_records
        from she.reasoning.teacher import TeacherClient, generate_traces
        from she.data.validation import atomic_write_lines

        records, _ = load_records(a.path, a.format)
        client = TeacherClient(a.base_url, a.teacher_model, api_key=a.api_key)
        accepted, stats = generate_traces(records, client, n=a.n)
        atomic_write_lines(a.out, (json.dumps({"id": r.id, "trace": t}, ensure_ascii=False) + "\n" for r, t in accepted))
        print(json.dumps(stats.to_dict(), indent=2))
    elif a.data_cmd == "facts":
        _cmd_facts(a)
    elif a.data_cmd in ("filter", "diverse"):
        from she.recipes.sampling import cmd_data

        cmd_data(a)


def _cmd_facts(a) -> None:
    from she.data.factstore import FactStore

    if a.facts_cmd == "build":
        rep = FactStore.build(a.paths, a.out, on_error=a.on_error, rejects_path=a.rejects)
        print(rep.summary())
        for dup in rep.duplicates[:10]:
            print(f"  duplicate: {dup.message()}")
        if rep.n_duplicates > 10:
            print(f"  ... and {rep.n_duplicates - 10} more duplicates")
        return
    if a.facts_cmd == "export":
        from she.data.annotations import export_facts

        n_facts, n_answers = export_facts(a.store, a.out, answers_out=a.answers)
        print(f"wrote {n_facts} fact lines to {a.out}" + (f" and {n_answers} answers to {a.answers}" if a.answers else ""))
        return
    missing = []
    with FactStore.open(a.store) as store:
        for rid in a.ids:
            facts = store.get(rid)
            if facts is None:
                missing.append(rid)
                continue
            print(json.dumps({"id": rid, "facts": facts.known(), "src": store.source_of(rid)}, ensure_ascii=False))
    if missing:
        print(f"she: not in {a.store}: {', '.join(missing)}", file=sys.stderr)
        sys.exit(1)


def _cmd_train(a) -> None:
    from she.config import PRMJobConfig, RLJobConfig, SFTJobConfig, load_config
    from she.data.sources import load_splits
    from she.training.sft import train_sft

    if a.train_cmd in ("srpo", "grpo"):
        from she.training.rl import run_rl_job

        over = {"model": a.model, "output_dir": a.output_dir, "max_steps": a.max_steps, "judge": a.judge,
                "facts_store": a.facts_store, "reward_model": a.reward_model, **_data_overrides(a)}
        cfg = load_config(RLJobConfig, a.config, over)
        if a.train_cmd == "grpo":
            cfg.step_rewards = False
        splits = load_splits(cfg.data)
        print(f"saved {run_rl_job(cfg, splits['train'], check_records=splits.get('validation') or None)}")
        return
    if a.train_cmd == "prm":
        from she.training.prm import run_prm_job

        over = {"policy": a.policy, "judge_model": a.judge_model, "output_dir": a.output_dir,
                "max_steps": a.max_steps, "facts_store": a.facts_store, **_data_overrides(a)}
        res = run_prm_job(load_config(PRMJobConfig, a.config, over))
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=2, default=str))
        return
    if a.train_cmd in ("dpo", "rm", "cross-encoder"):
        _cmd_train_baseline(a)
        return
    if a.train_cmd == "curriculum":
        from she.recipes.sampling import cmd_train_curriculum

        cmd_train_curriculum(a, _data_overrides(a))
        return

    over = {"model": a.model, "output_dir": a.output_dir, "target": a.target, "epochs": a.epochs,
            "max_steps": a.max_steps, "lora": a.lora, "traces_file": a.traces, "schema": a.schema,
            **_data_overrides(a)}
    cfg = load_config(SFTJobConfig, a.config, over)
    splits = load_splits(cfg.data)
    final = train_sft(cfg, splits["train"])
    print(f"saved {final}")


def _cmd_train_baseline(a) -> None:
    """``she train dpo|rm|cross-encoder`` (docs/baselines.md)."""
    from she.config import CrossEncoderJobConfig, DPOJobConfig, RewardModelJobConfig, load_config
    from she.data.sources import load_splits

    over = {"model": a.model, "output_dir": a.output_dir, "max_steps": a.max_steps, **_data_overrides(a)}
    if a.train_cmd == "dpo":
        from she.training.dpo import run_dpo_job

        cfg = load_config(DPOJobConfig, a.config, over)
        print(f"saved {run_dpo_job(cfg, load_splits(cfg.data)['train'])}")
    elif a.train_cmd == "rm":
        from she.training.reward_model import run_reward_model_job

        cfg = load_config(RewardModelJobConfig, a.config, over)
        print(f"saved {run_reward_model_job(cfg, load_splits(cfg.data)['train'])}")
    else:
        from she.training.cross_encoder import run_cross_encoder_job

        cfg = load_config(CrossEncoderJobConfig, a.config, over)
        splits = load_splits(cfg.data)
        if cfg.eval_split not in ("none", *splits):
            raise ValueError(f"eval_split {cfg.eval_split!r}: use none or one of {sorted(splits)}")
        evals = splits[cfg.eval_split] if cfg.eval_split != "none" else None
        final = run_cross_encoder_job(cfg, splits["train"], evals)
        print(f"saved {final}")
        if evals:
            m = json.loads((final.parent / "metrics.json").read_text())
            print(json.dumps({k: m[k] for k in ("macro_f1", "accuracy", "n")}, indent=2))


def _cmd_eval(a) -> None:
    from she.config import DataConfig, from_dict
    from she.data.sources import load_data, load_splits
    from she.evaluation.evaluate import evaluate

    over = {k.split(".", 1)[1]: v for k, v in _data_overrides(a).items() if v is not None}
    if a.data_config:
        import yaml

        try:
            raw = yaml.safe_load(open(a.data_config)) or {}
        except yaml.YAMLError as ex:
            raise ValueError(f"{a.data_config}: not valid YAML: {ex}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ValueError(f"{a.data_config}: no `data:` section")
        base = dict(raw["data"])
        if a.format == "auto":
            over.pop("format", None)  # the flag's default must not override the file's format
        if a.on_error == "fail":
            over.pop("on_error", None)
        over = {**base, **over}
    dcfg = from_dict(DataConfig, over, where=a.data_config or "data")
    split = a.split or ("all" if a.data else "test")
    records = load_data(dcfg) if split == "all" else load_splits(dcfg)[split]
    if a.limit:
        records = records[: a.limit]
    m = evaluate(a.model, records, a.out, taxonomy=dcfg.taxonomy, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, bf16=not a.no_bf16)
    print(json.dumps({k: m[k] for k in ("macro_f1", "accuracy", "format_valid_rate", "n")}, indent=2))
    print(f"report: {os.path.join(a.out, 'report.md')}")


def _cmd_predict(a) -> None:
    from she.config import DataConfig, from_dict
    from she.data.sources import load_data
    from she.evaluation.evaluate import predict

    dcfg = from_dict(DataConfig, {k.split(".", 1)[1]: v for k, v in _data_overrides(a).items() if v is not None})
    n = predict(a.model, load_data(dcfg), a.out, taxonomy=dcfg.taxonomy, batch_size=a.batch_size,
                max_new_tokens=a.max_new_tokens, fast=a.fast)
    print(f"wrote {n} predictions to {a.out}")


def _cmd_serve(a) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"she: error: serving needs fastapi and uvicorn ({e}); pip install 'she[serve]'", file=sys.stderr)
        sys.exit(2)
    from she.serving.app import serve

    serve(a.model, host=a.host, port=a.port, max_batch_pairs=a.max_batch, batch_wait_ms=a.batch_wait_ms,
          max_request_pairs=a.max_request_pairs, max_text_chars=a.max_text_chars, max_new_tokens=a.max_new_tokens,
          taxonomy=a.taxonomy)


def _cmd_annotate(a) -> None:
    from she.annotation.commands import cmd_annotate

    cmd_annotate(a)


def _cmd_demo(a) -> None:
    from she.config import DemoConfig, load_config
    from she.recipes.demo import run_demo

    over = {"model": a.model, "output_dir": a.output_dir, "sft.max_steps": a.max_steps, **_data_overrides(a)}
    if a.skip_base_eval:
        over["eval_before"] = False
    cfg = load_config(DemoConfig, a.config, over)
    s = run_demo(cfg)
    print(open(s["report"]).read())


def _cmd_compare(a) -> None:
    import shlex

    from she.recipes.compare import load_compare_config, run_compare

    rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else None
    cfg = load_compare_config(a.config, {"output_dir": a.output_dir, "rows": rows})
    argv = ["she", "compare", a.config] + (["--output-dir", a.output_dir] if a.output_dir else []) \
        + (["--rows", a.rows] if a.rows else [])
    s = run_compare(cfg, command=shlex.join(argv))
    print(open(os.path.join(s["output_dir"], "results.md")).read())


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from she.config import ConfigError

    # OSError: a bad path the user gave (an --out that is a file, a read-only folder, a directory as config)
    user_errors: tuple[type[BaseException], ...] = (ConfigError, OSError, ValueError)
    try:
        from she.data.validation import DataError

        user_errors = (DataError, *user_errors)
    except ImportError:
        pass
    handlers = {"model": _cmd_model, "data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval,
                "predict": _cmd_predict, "serve": _cmd_serve, "demo": _cmd_demo, "compare": _cmd_compare,
                "annotate": _cmd_annotate}
    try:
        handlers[a.cmd](a)
    except user_errors as e:
        if os.environ.get("SHE_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"she: error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the process group a job opened under ``accelerate launch`` (no-op otherwise).

    Left open, gloo's threads can abort the interpreter at exit ("terminate called without an active
    exception", exit status -6: seen in about 1 of 8 two-process CPU launches), turning a finished run
    into a failed one. Destroying is local (no collective), so it cannot hang. docs/distributed.md.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
