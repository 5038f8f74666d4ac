"""The ``she`` command line.

    she model prepare smollm2-135m
    she data validate|stats|split|generate ...
    she train sft [--config configs/sft.yaml] [--data FILE] ...
    she eval --model DIR --data FILE --out DIR
    she predict --model DIR --data FILE --out preds.jsonl
    she demo

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
    _add_data_args(ts)

    for algo, helptext in (("srpo", "SRPO: stepwise hybrid-examined RL (TRL GRPOTrainer + per-token step advantages)"),
                           ("grpo", "vanilla GRPO: the same trainer with step rewards off")):
        tr = t.add_parser(algo, help=helptext)
        tr.add_argument("--config", default=None, help="YAML RL config")
        tr.add_argument("--model", default=None, help="SFT checkpoint folder (or registered name)")
        tr.add_argument("--output-dir", default=None)
        tr.add_argument("--max-steps", type=int, default=None)
        tr.add_argument("--judge", default=None, help="judge folder from `she train prm` (examiner hybrid/blend)")
        _add_data_args(tr)
    tp = t.add_parser("prm", help="train the generative stepwise reward model (the judge)")
    tp.add_argument("--config", default=None, help="YAML PRM config")
    tp.add_argument("--policy", default=None, help="policy folder whose rollouts are labelled")
    tp.add_argument("--judge-model", default=None)
    tp.add_argument("--output-dir", default=None)
    tp.add_argument("--max-steps", type=int, default=None)
    _add_data_args(tp)

    e = sub.add_parser("eval", help="generate, parse and score judgements; metrics.json, report.md, confusion.png")
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--split", default=None, help="all (default with --data) | train | validation | test")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=96)
    e.add_argument("--no-bf16", action="store_true")
    _add_data_args(e)

    pr = sub.add_parser("predict", help="one JSON line per pair: label, class probabilities, reasoning")
    pr.add_argument("--model", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--max-new-tokens", type=int, default=96)
    _add_data_args(pr, required=True)

    dm = sub.add_parser("demo", help="the main job: data -> base eval -> SFT -> eval -> report")
    dm.add_argument("--config", default=None)
    dm.add_argument("--model", default=None)
    dm.add_argument("--output-dir", default=None)
    dm.add_argument("--max-steps", type=int, default=None)
    dm.add_argument("--skip-base-eval", action="store_true", help="do not evaluate the untrained model")
    _add_data_args(dm)
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


def _cmd_train(a) -> None:
    from she.config import PRMJobConfig, RLJobConfig, SFTJobConfig, load_config
    from she.data.sources import load_splits
    from she.training.sft import train_sft

    if a.train_cmd in ("srpo", "grpo"):
        from she.training.rl import run_rl_job

        over = {"model": a.model, "output_dir": a.output_dir, "max_steps": a.max_steps, "judge": a.judge,
                **_data_overrides(a)}
        cfg = load_config(RLJobConfig, a.config, over)
        if a.train_cmd == "grpo":
            cfg.step_rewards = False
        print(f"saved {run_rl_job(cfg, load_splits(cfg.data)['train'])}")
        return
    if a.train_cmd == "prm":
        from she.training.prm import run_prm_job

        over = {"policy": a.policy, "judge_model": a.judge_model, "output_dir": a.output_dir,
                "max_steps": a.max_steps, **_data_overrides(a)}
        res = run_prm_job(load_config(PRMJobConfig, a.config, over))
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=2, default=str))
        return

    over = {"model": a.model, "output_dir": a.output_dir, "target": a.target, "epochs": a.epochs,
            "max_steps": a.max_steps, "lora": a.lora, "traces_file": a.traces, **_data_overrides(a)}
    cfg = load_config(SFTJobConfig, a.config, over)
    splits = load_splits(cfg.data)
    final = train_sft(cfg, splits["train"])
    print(f"saved {final}")


def _cmd_eval(a) -> None:
    from she.config import DataConfig, from_dict
    from she.data.sources import load_data, load_splits
    from she.evaluation.evaluate import evaluate

    dcfg = from_dict(DataConfig, {k.split(".", 1)[1]: v for k, v in _data_overrides(a).items() if v is not None})
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
                max_new_tokens=a.max_new_tokens)
    print(f"wrote {n} predictions to {a.out}")


def _cmd_demo(a) -> None:
    from she.config import DemoConfig, load_config
    from she.pipeline import run_demo

    over = {"model": a.model, "output_dir": a.output_dir, "sft.max_steps": a.max_steps, **_data_overrides(a)}
    if a.skip_base_eval:
        over["eval_before"] = False
    cfg = load_config(DemoConfig, a.config, over)
    s = run_demo(cfg)
    print(open(s["report"]).read())


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from she.config import ConfigError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)
    try:
        from she.data.validation import DataError

        user_errors = (DataError, *user_errors)
    except ImportError:
        pass
    handlers = {"model": _cmd_model, "data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval,
                "predict": _cmd_predict, "demo": _cmd_demo}
    try:
        handlers[a.cmd](a)
    except user_errors as e:
        if os.environ.get("SHE_DEBUG"):
            raise
        print(f"she: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
