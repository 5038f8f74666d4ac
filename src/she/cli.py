"""The ``she`` command line.

    she model prepare smollm2-135m
    she data validate|stats|split|generate ...
    she data facts build|show|export ...
    she data filter|diverse ...   (difficulty band / diverse subset, docs/sampling.md)
    she train sft [--config configs/sft.yaml] [--data FILE] ...
    she train dpo|rm|cross-encoder --config ...   (baselines, docs/baselines.md)
    she train curriculum --config configs/curriculum-demo.yaml
    she eval --model DIR --data FILE --output-dir DIR
    she predict --model DIR --data FILE --out preds.jsonl [--fast]
    she serve --model DIR [--host 127.0.0.1] [--port 8000]   (docs/serving.md)
    she annotate serve --data FILE --facts facts.sqlite --tokens FILE [--model DIR --judge DIR] --port N
    she demo
    she compare configs/compare-cpu.yaml [--output-dir DIR] [--rows a,b,c]   (docs/baselines.md)

Precedence for every config-driven command: built-in defaults < the --config YAML < flags given; any config
key is also a flag (``--learning_rate 1e-5``, ``--data.max_train 100``; :func:`she.config.parse_overrides`).

Exit status: 0 done; 1 input rows were rejected (``--on-error skip``); 2 a user error (bad files, bad configs,
unknown models, bad flags): one clear line on stderr. ``SHE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from she.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local folders
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FORMATS = ["auto", "home-depot", "esci", "wands", "jsonl"]
TAXONOMIES = ["hd3", "esci4", "taobao4"]
# Flags that set a config key store it under "@<dotted key>" and are absent unless given (argparse.SUPPRESS),
# so a flag the user did not type never overrides the YAML (precedence: defaults < YAML < flags).
GIVEN = argparse.SUPPRESS
OVERRIDES_HELP = (
    "Any config key can also be set on the command line, in TRL's style: --KEY VALUE or --KEY=VALUE, dotted for "
    "sections (--data.max_train 100), dashes or underscores (--learning-rate 1e-5), --KEY / --no-KEY for true/false. "
    "Precedence: built-in defaults < the --config YAML < flags. `she CMD --help-keys` lists the keys.")


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long options: a config key such as --lr must never silently become --lr-scheduler."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _key(k: str) -> str:
    return "@" + k


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The data flags of every command that reads records: one place, one meaning (docs/data.md)."""
    p.add_argument("--data", dest=_key("data.path"), default=GIVEN, required=required, metavar="PATH",
                   help="data file or folder (required)" if required else
                   "data file or folder (default: the config's data.path, else the synthetic generator)")
    p.add_argument("--format", dest=_key("data.format"), default=GIVEN, choices=FORMATS,
                   help="input format (default: the config's, else auto: detected from the name or header)")
    p.add_argument("--encoding", dest=_key("data.encoding"), default=GIVEN, metavar="CODEC",
                   help="text encoding of CSV/JSONL input (default auto: BOM, UTF-16, UTF-8, else latin-1 for "
                        "Home Depot); e.g. utf-8, latin-1, utf-16")
    p.add_argument("--taxonomy", dest=_key("data.taxonomy"), default=GIVEN, choices=TAXONOMIES,
                   help="label taxonomy the records are mapped into (default: the config's, else hd3)")
    p.add_argument("--on-error", dest=_key("data.on_error"), default=GIVEN, choices=["fail", "skip"],
                   help="bad rows: fail (default) or skip them and write a rejects file")


def _add_job_args(p: argparse.ArgumentParser, what: str, *, model: str | None = "registered name or save_pretrained "
                  "folder", max_steps: str = "max_steps") -> None:
    """--config, --model, --output-dir (alias --out), --max-steps: the flags every job command has."""
    p.add_argument("--config", default=None, help=f"YAML {what} config (configs/; docs/configs.md)")
    if model:
        p.add_argument("--model", dest=_key("model"), default=GIVEN, help=model)
    p.add_argument("--output-dir", "--out", dest=_key("output_dir"), default=GIVEN, metavar="DIR",
                   help="output folder (checkpoints, final model, logs)")
    p.add_argument("--max-steps", dest=_key(max_steps), type=int, default=GIVEN, metavar="N",
                   help="stop after N optimizer steps (-1: train num_train_epochs)")
    p.add_argument("--help-keys", action="store_true", help="list every config key of this command and exit")


def _add_trainer_args(p: argparse.ArgumentParser, report_to: bool = True) -> None:
    """The TrainingArguments flags every transformers-Trainer job shares (TRL names; generic --KEY works too)."""
    p.add_argument("--num-train-epochs", "--epochs", dest=_key("num_train_epochs"), type=float, default=GIVEN,
                   metavar="X", help="epochs over the training split")
    p.add_argument("--learning-rate", dest=_key("learning_rate"), type=float, default=GIVEN, metavar="LR",
                   help="peak learning rate")
    p.add_argument("--per-device-train-batch-size", "--batch-size", dest=_key("per_device_train_batch_size"),
                   type=int, default=GIVEN, metavar="N", help="training batch size per process")
    p.add_argument("--seed", dest=_key("seed"), type=int, default=GIVEN, help="random seed of the job")
    if report_to:
        p.add_argument("--report-to", dest=_key("report_to"), default=GIVEN,
                       help="logging integration: tensorboard (default), wandb, none, ...")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("she")
    except Exception:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _add_evidence_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--evidence", default="generated", choices=["generated", "computed", "marginal"],
                   help="generated: the model writes its steps (default); computed: the steps are computed from the "
                        "pair and forced, the model gives the verdict (label-free schemas only: evidence, semantic); "
                        "marginal: the model writes its steps and the verdict is averaged over the values of the step "
                        "before it, weighted by their probabilities (decision, semantic; docs/reasoning-format.md)")


def build_parser() -> argparse.ArgumentParser:
    import typing

    from she.config import CalibrationMethod

    p = _Parser(prog="she", description="Stepwise Hybrid Examination: LLM relevance judges",
                epilog="Exit status: 0 done; 1 some input rows were rejected (--on-error skip; the rejects file "
                       "lists them); 2 unusable input or a usage error (one line on stderr, nothing written).")
    p.add_argument("--version", action="version", version=f"she {_version()}", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    m = sub.add_parser("model", help="model cache").add_subparsers(dest="model_cmd", required=True, metavar="COMMAND")
    mp = m.add_parser("prepare", help="convert a registered model into a save_pretrained folder in the cache")
    mp.add_argument("name", choices=["smollm2-135m", "tiny"], help="registered model name")
    mp.add_argument("--force", action="store_true", help="rebuild the folder even if it exists")
    ma = m.add_parser("average", help="average the weights of fine-tunes of one model (a model soup); calibrate "
                                      "the result before use (its she.json drops the fitted offsets)")
    ma.add_argument("models", nargs="+", help="two or more save_pretrained folders of the same architecture")
    ma.add_argument("--out", required=True, help="new folder for the averaged model")
    ma.add_argument("--weights", type=float, nargs="+", default=None,
                    help="mixing weights, one per model (normalised; default uniform)")

    d = sub.add_parser("data", help="validate, describe, split or generate data",
                       epilog="Exit status of every data command: 0 clean; 1 rows rejected (--on-error skip: the "
                              "output holds the good rows, the rejects file the others); 2 unusable input (nothing "
                              "written).").add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")

    def file_args(q: argparse.ArgumentParser, rejects_default: str = "<input>.rejects.jsonl") -> None:
        q.add_argument("path", help="data file or folder")
        q.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: auto-detect)")
        q.add_argument("--encoding", default="auto", metavar="CODEC",
                       help="text encoding (default auto: BOM, UTF-16, UTF-8, else latin-1 for Home Depot)")
        q.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                       help="bad rows: fail (default: stop at the first, exit 2) or skip (go on, write every bad "
                            "row to the rejects file, exit 1)")
        q.add_argument("--rejects", default=None, help=f"rejects file in skip mode (default: {rejects_default})")

    dv = d.add_parser("validate", help="check every row; report file, line and field of each bad row")
    file_args(dv)
    dv.add_argument("--show", type=int, default=20, metavar="N",
                    help="print at most N bad rows (default 20), then how many more the rejects file holds")
    ds = d.add_parser("stats", help="counts, label mix, query types, fact coverage")
    file_args(ds)
    dsp = d.add_parser("split", help="query-disjoint seeded train/validation/test split to JSONL")
    file_args(dsp)
    dsp.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR",
                     help="folder for train.jsonl, validation.jsonl and test.jsonl (each record keeps its part, so "
                          "training on train.jsonl never splits it again)")
    dsp.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    dsp.add_argument("--fractions", default="0.8,0.1,0.1", help="train,validation,test shares (default 0.8,0.1,0.1)")
    dg = d.add_parser("generate", help="write the synthetic catalogue and query log as JSONL")
    dg.add_argument("--out", "--output", dest="out", required=True,
                    help="output JSONL file; a folder (existing, or ending in /) gets synthetic.jsonl inside")
    dg.add_argument("--queries", type=int, default=300, help="number of queries (default 300)")
    dg.add_argument("--products-per-query", type=int, default=4, help="judged products per query (default 4)")
    dg.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    dg.add_argument("--taxonomy", default="hd3", choices=TAXONOMIES, help="label taxonomy (default hd3)")

    dt = d.add_parser("teach", help="SFT traces from an OpenAI-compatible teacher; wrong-label traces rejected")
    dt.add_argument("path", help="data file or folder")
    dt.add_argument("--out", required=True, help="traces JSONL: {id, trace} per accepted record")
    dt.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    dt.add_argument("--teacher-model", required=True, help="model name the teacher server knows")
    dt.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    dt.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: auto-detect)")
    dt.add_argument("--encoding", default="auto", metavar="CODEC", help="text encoding (default: auto)")
    dt.add_argument("--n", type=int, default=1, help="samples per record")
    from she.recipes.sampling import add_data_parsers, add_train_parser

    add_data_parsers(d, _add_data_args)  # she data filter | diverse (docs/sampling.md)
    df = d.add_parser("facts", help="fact store: human step facts by record id (SQLite) for the verifier")
    dfs = df.add_subparsers(dest="facts_cmd", required=True, metavar="COMMAND")
    dfb = dfs.add_parser("build", help="validate annotation JSONL files into a fact store")
    dfb.add_argument("paths", nargs="+", help='JSONL: {"id": ..., "facts": {...}} or full records with facts')
    dfb.add_argument("--out", required=True, help="the store file, e.g. facts.sqlite (replaced atomically)")
    dfb.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                     help="bad rows: fail (default, exit 2) or skip them into the rejects file (exit 1)")
    dfb.add_argument("--rejects", default=None, help="rejects file (default: <out>.rejects.jsonl)")
    dfw = dfs.add_parser("show", help="print the stored facts of record ids as JSON lines")
    dfw.add_argument("--store", required=True, help="fact store file from `she data facts build`")
    dfw.add_argument("ids", nargs="+", help="record ids")
    dfe = dfs.add_parser("export", help="write the store's facts as JSONL (rebuildable), optionally the answer log")
    dfe.add_argument("--store", required=True, help="fact store file")
    dfe.add_argument("--out", required=True, help='facts JSONL: {"id", "facts"} per record')
    dfe.add_argument("--answers", default=None, help="also write the annotation log (annotator, time, ...) here")

    t = sub.add_parser("train", help="training jobs").add_subparsers(dest="train_cmd", required=True, metavar="JOB")
    ts = t.add_parser("sft", help="supervised warm start on reasoning traces (TRL SFTTrainer)", epilog=OVERRIDES_HELP)
    _add_job_args(ts, "SFT")
    _add_trainer_args(ts)
    ts.add_argument("--target", dest=_key("target"), default=GIVEN, choices=["reasoning", "label"],
                    help="reasoning traces (default) or the label only (baseline)")
    ts.add_argument("--lora", dest=_key("lora"), action=argparse.BooleanOptionalAction, default=GIVEN,
                    help="LoRA adapters instead of full fine-tuning (--no-lora turns a config's lora: true off)")
    ts.add_argument("--traces", dest=_key("traces_file"), default=GIVEN,
                    help="teacher traces JSONL from `she data teach` (else rule-based)")
    ts.add_argument("--schema", dest=_key("schema"), default=GIVEN,
                    help="step schema: default | coverage (adds a Missing step) | grounded (Missing, Numbers, "
                         "Head) | evidence (the computed steps only) | semantic (+ Similarity) | decision "
                         "(+ Relevant yes|no, from the gold label) | a YAML/JSON schema file")
    _add_data_args(ts)

    for algo, helptext in (("srpo", "SRPO: stepwise hybrid-examined RL (TRL GRPOTrainer + per-token step advantages)"),
                           ("grpo", "vanilla GRPO: the same trainer with step rewards off")):
        tr = t.add_parser(algo, help=helptext, epilog=OVERRIDES_HELP)
        _add_job_args(tr, "RL", model="SFT checkpoint folder (or registered name)")
        tr.add_argument("--learning-rate", dest=_key("learning_rate"), type=float, default=GIVEN, metavar="LR",
                        help="learning rate")
        tr.add_argument("--seed", dest=_key("seed"), type=int, default=GIVEN, help="random seed of the job")
        tr.add_argument("--report-to", dest=_key("report_to"), default=GIVEN,
                        help="logging integration: tensorboard (default), wandb, none, ...")
        tr.add_argument("--judge", dest=_key("judge"), default=GIVEN,
                        help="judge folder from `she train prm` (examiner hybrid/blend)")
        tr.add_argument("--facts-store", dest=_key("facts_store"), default=GIVEN,
                        help="fact store from `she data facts build`")
        tr.add_argument("--reward-model", dest=_key("reward_model"), default=GIVEN,
                        help="scalar RM folder from `she train rm`: its score replaces the label reward (scalar-RM GRPO)")
        _add_data_args(tr)
    for algo, helptext in (("dpo", "baseline: DPO on pass@N preference pairs of the SFT policy (TRL DPOTrainer)"),
                           ("rm", "baseline: scalar reward model on the same pass@N pairs (TRL RewardTrainer)"),
                           ("cross-encoder", "baseline: MiniLM cross-encoder classifier over [query, product]")):
        tb = t.add_parser(algo, help=helptext, epilog=OVERRIDES_HELP)
        _add_job_args(tb, algo, model="base model: SFT folder (dpo, rm) or BERT-like folder/minilm")
        _add_trainer_args(tb)
        _add_data_args(tb)
    tp = t.add_parser("prm", help="train the generative stepwise reward model (the judge)", epilog=OVERRIDES_HELP)
    _add_job_args(tp, "PRM", model=None)
    tp.add_argument("--policy", dest=_key("policy"), default=GIVEN, help="policy folder whose rollouts are labelled")
    tp.add_argument("--judge-model", dest=_key("judge_model"), default=GIVEN,
                    help="base model of the judge (registered name or folder)")
    tp.add_argument("--facts-store", dest=_key("facts_store"), default=GIVEN,
                    help="fact store from `she data facts build`")
    _add_trainer_args(tp, report_to=False)
    _add_data_args(tp)
    add_train_parser(t, _add_data_args)  # she train curriculum

    e = sub.add_parser("eval", help="generate, parse and score judgements; metrics.json, report.md, confusion.png",
                       epilog="Which pairs are scored: a file written by `she data split` keeps its parts, and eval "
                              "scores its test (else validation) part; any other file is split by query the way the "
                              "training commands split it (data.split_seed, fractions) and its test split is scored. "
                              "Training pairs are scored only when asked: --split train or --split all. "
                              "--data.KEY VALUE sets any data key (e.g. --data.split_seed 1).")
    e.add_argument("--model", required=True, help="registered name or save_pretrained folder")
    e.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR",
                   help="folder for metrics.json, report.md, predictions.jsonl")
    e.add_argument("--split", default=None, choices=["test", "validation", "train", "all"],
                   help="which pairs to score (default: the test split; see below)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    e.add_argument("--batch-size", type=int, default=32,
                   help="generation batch size (default 32: 1.26x the judgements a second of 16, docs/benchmarks.md)")
    e.add_argument("--max-new-tokens", type=int, default=96, help="longest judgement (default 96)")
    e.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast")
    e.add_argument("--data-config", default=None,
                   help="YAML of any job (its `data:` section is used): the same seeded split and caps as that job")
    e.add_argument("--no-calibration", action="store_true",
                   help="ignore the model's label offsets from `she calibrate` (score the generated labels)")
    _add_evidence_arg(e)
    _add_data_args(e)

    ca = sub.add_parser("calibrate", help="fit per-class verdict offsets on validation pairs; saved in the model's "
                                          "she.json and used by eval, predict and serve (docs/reasoning-format.md)")
    ca.add_argument("--model", required=True, help="save_pretrained folder (its she.json gets label_offsets)")
    ca.add_argument("--split", default="validation", choices=["validation", "train"],
                    help="pairs to fit on (default: validation; never the test pairs)")
    ca.add_argument("--limit", type=int, default=1000,
                    help="fit on the first N pairs of that split (default 1000: fits on 300 were as noisy as the "
                         "effects measured, docs/results.md)")
    ca.add_argument("--batch-size", type=int, default=32, help="generation batch size (default 32)")
    ca.add_argument("--max-new-tokens", type=int, default=96, help="longest judgement (default 96)")
    ca.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast")
    _add_evidence_arg(ca)
    ca.add_argument("--method", default="grid", choices=typing.get_args(CalibrationMethod),
                    help="grid: the offsets maximising validation Macro F1 (default); bagged: their mean over 50 "
                         "query-bootstrap resamples; prior: predicted shares matched to the validation labels'")
    ca.add_argument("--data-config", default=None,
                    help="YAML of any job (its `data:` section is used): the same seeded split as that job")
    _add_data_args(ca)

    pr = sub.add_parser("predict", help="one JSON line per pair: label, class probabilities, reasoning")
    pr.add_argument("--model", required=True, help="registered name or save_pretrained folder")
    pr.add_argument("--out", "--output", dest="out", required=True, help="predictions JSONL file")
    pr.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    pr.add_argument("--max-new-tokens", type=int, default=96, help="longest judgement (default 96)")
    pr.add_argument("--fast", action="store_true",
                    help="label only, one forward pass, no reasoning (approximate for reasoning models; docs/serving.md)")
    _add_evidence_arg(pr)
    _add_data_args(pr, required=True)

    sv = sub.add_parser("serve", help="HTTP relevance service + OpenAI-compatible chat endpoint (docs/serving.md)")
    sv.add_argument("--model", required=True, help="registered name or save_pretrained folder")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--max-batch", type=int, default=64, help="pairs per model batch")
    sv.add_argument("--batch-wait-ms", type=float, default=5, help="longest wait to fill a batch")
    sv.add_argument("--max-request-pairs", type=int, default=256, help="most pairs one request may hold")
    sv.add_argument("--max-text-chars", type=int, default=2000, help="longest query/product text accepted")
    sv.add_argument("--max-new-tokens", type=int, default=96, help="reasoning length in full mode")
    sv.add_argument("--taxonomy", default=None, choices=TAXONOMIES, help="default: the model's she.json, else hd3")
    sv.add_argument("--max-queue-pairs", type=int, default=4096,
                    help="pairs that may wait; beyond it requests get 503 with Retry-After (default 4096)")
    sv.add_argument("--request-timeout-s", type=float, default=300,
                    help="longest a request may take, queue included (504 after; a client's X-Deadline-S may be "
                         "shorter; default 300)")
    sv.add_argument("--fast-batch-size", type=int, default=None,
                    help="pairs per forward pass in fast mode (default 16, as `she predict --batch-size`)")
    sv.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast in every mode on CUDA and on CPUs that run bf16 well (AVX-512 "
                         "and up), full mode and chat in fp32 on other CPUs; bf16 / fp32: all modes (bf16 is what "
                         "`she eval` uses; on a CPU its decoding runs on packed bf16 weights, docs/benchmarks.md)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every path but /health; default $SHE_API_KEY "
                         "(this flag wins when both are set; the variable keeps the key out of `ps`)")

    dm = sub.add_parser("demo", help="the main job: data -> base eval -> SFT -> eval -> report", epilog=OVERRIDES_HELP)
    _add_job_args(dm, "demo", max_steps="sft.max_steps")
    dm.add_argument("--skip-base-eval", dest=_key("eval_before"), action="store_const", const=False, default=GIVEN,
                    help="do not evaluate the untrained model")
    _add_data_args(dm)

    from she.annotation.commands import add_parser as add_annotate_parser

    add_annotate_parser(sub)  # she annotate serve (docs/annotation.md)

    cp = sub.add_parser("compare", help="every baseline and ablation from one SFT start at equal budget; resumable "
                                        "(docs/baselines.md)", epilog=OVERRIDES_HELP)
    cp.add_argument("config", help="YAML compare config (configs/compare-*.yaml)")
    cp.add_argument("--output-dir", "--out", dest=_key("output_dir"), default=GIVEN, metavar="DIR",
                    help="output folder (default: the config's)")
    cp.add_argument("--rows", default=None, help="comma-separated rows to run (default: the config's rows, else all)")
    cp.add_argument("--help-keys", action="store_true", help="list every config key of this command and exit")
    return p


# -- configs: one loader for every command ----------------------------------------------------------------


def flag_overrides(a: argparse.Namespace) -> dict:
    """The config keys the user set with a dedicated flag (only those given)."""
    return {k[1:]: v for k, v in vars(a).items() if k.startswith("@")}


def data_config(a: argparse.Namespace, base: dict | None = None, where: str = "data"):
    """The one conversion of data flags (and --data.KEY overrides) to a :class:`~she.config.DataConfig`, on top
    of ``base`` (a config's `data:` section)."""
    from she.config import NULL, DataConfig, from_dict, parse_overrides

    raw = dict(base or {})
    extras = [t if not t.startswith("--data.") else "--" + t[len("--data."):] for t in getattr(a, "extras", [])]
    raw.update({k: None if v is NULL else v for k, v in parse_overrides(DataConfig, extras).items()})
    raw.update({k.split(".", 1)[1]: v for k, v in flag_overrides(a).items() if k.startswith("data.")})
    return from_dict(DataConfig, raw, where)


def _job_class(a: argparse.Namespace):
    """(config class, loader) of a config-driven command, or None."""
    from she import config as C

    if a.cmd == "demo":
        return C.DemoConfig, C.load_config
    if a.cmd == "compare":
        from she.recipes.compare import CompareConfig, load_compare_config

        return CompareConfig, load_compare_config
    if a.cmd != "train":
        return None
    if a.train_cmd == "curriculum":
        from she.sampling.curriculum import CurriculumJobConfig, load_curriculum_job

        return CurriculumJobConfig, load_curriculum_job
    cls = {"sft": C.SFTJobConfig, "srpo": C.RLJobConfig, "grpo": C.RLJobConfig, "prm": C.PRMJobConfig,
           "dpo": C.DPOJobConfig, "rm": C.RewardModelJobConfig, "cross-encoder": C.CrossEncoderJobConfig}[a.train_cmd]
    return cls, C.load_config


def job_config(a: argparse.Namespace):
    """The config a job command runs with: built-in defaults < the YAML (--config) < the flags given.

    Every config-driven command goes through here, so a config that loads here is one the command accepts."""
    from she.config import parse_overrides

    cls, loader = _job_class(a)
    over = parse_overrides(cls, getattr(a, "extras", []))
    flags = flag_overrides(a)
    if a.cmd == "train" and a.train_cmd == "curriculum":  # flags of the RL section; see she.recipes.sampling
        flags = {f"rl.{k}": v for k, v in flags.items()}
        flags.update({k: v for k, v in (("rl.model", a.model), ("rl.output_dir", a.output_dir),
                                        ("curriculum.pass_rates", a.pass_rates)) if v is not None})
    if a.cmd == "compare" and a.rows:
        flags["rows"] = [r.strip() for r in a.rows.split(",") if r.strip()]
    from she.config import load_config

    over.update(flags)
    cfg = load_config(cls, a.config, over) if loader is load_config else loader(a.config, over)
    if a.cmd == "train" and a.train_cmd == "grpo":
        cfg.step_rewards = False  # the command says what the job is, whatever the YAML says
    return cfg


def _help_keys(a: argparse.Namespace) -> None:
    from she.config import config_keys

    cls, _ = _job_class(a)
    print("\n".join(f"--{k}" for k in config_keys(cls)))


def _cmd_model(a) -> None:
    if a.model_cmd == "average":
        from she.models.soup import average_models

        out = average_models(a.models, a.out, a.weights)
        print(f"{out} (weights {a.weights or 'uniform'}); fit its verdict offsets next: "
              f"she calibrate --model {out} --data-config <the training config>")
        return
    from she.models.registry import prepare

    print(prepare(a.name, force=a.force))


def _rejected_exit(report) -> None:
    """Exit status 1 when rows were rejected (skip mode): the output holds only the good rows."""
    if report.n_rejected or report.errors:
        sys.exit(1)


def _fractions(text: str) -> dict[str, float]:
    parts = [x.strip() for x in text.split(",")]
    try:
        fr = [float(x) for x in parts]
    except ValueError:
        fr = []
    if len(fr) != 3:
        raise UserError(f"--fractions {text!r}: expected three numbers train,validation,test such as 0.8,0.1,0.1")
    return dict(zip(["train", "validation", "test"], fr))


def _cmd_data(a) -> None:
    from she.data import commands

    if a.data_cmd == "validate":
        rep = commands.validate(a.path, a.format, a.on_error, a.rejects, encoding=a.encoding)
        for err in rep.errors[: max(a.show, 0)]:
            print(err.message())
        if len(rep.errors) > max(a.show, 0):
            print(f"... and {len(rep.errors) - max(a.show, 0)} more bad rows (--show N prints more; all of them "
                  f"are in {rep.rejects_path})")
        print(f"{a.path}: {rep.n_ok} ok, {rep.n_rejected} rejected of {rep.n_read} rows"
              + (f"; rejects written to {rep.rejects_path}" if rep.n_rejected else ""))
        _rejected_exit(rep)
    elif a.data_cmd == "stats":
        from she.data.loaders import load_records

        records, rep = load_records(a.path, a.format, on_error=a.on_error, rejects_path=a.rejects,
                                    encoding=a.encoding)
        print(commands.format_stats(commands.stats(records)))
        if rep.n_rejected:
            print(f"rejected {rep.n_rejected} of {rep.n_read} rows (not counted above); rejects in {rep.rejects_path}")
        _rejected_exit(rep)
    elif a.data_cmd == "split":
        from pathlib import Path

        fractions = _fractions(a.fractions)
        out = Path(a.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output-dir {out}: is a file; give a folder for train.jsonl, validation.jsonl, test.jsonl")
        paths, rep = commands.split_file(a.path, a.format, out, fractions, a.seed, on_error=a.on_error,
                                         rejects_path=a.rejects, encoding=a.encoding)
        for name, path in paths.items():
            print(f"{name}: {path}")
        if rep.n_rejected:
            print(f"rejected {rep.n_rejected} of {rep.n_read} rows (left out of every split); rejects in {rep.rejects_path}")
        _rejected_exit(rep)
    elif a.data_cmd == "generate":
        from pathlib import Path

        from she.data.loaders import save_jsonl
        from she.data.synthetic import generate

        out = Path(a.out)
        if a.out.endswith(("/", os.sep)) or out.is_dir():
            out = out / "synthetic.jsonl"
        recs = generate(n_queries=a.queries, products_per_query=a.products_per_query, seed=a.seed, taxonomy=a.taxonomy)
        save_jsonl(recs, out)
        print(f"wrote {len(recs)} records to {out}")
    elif a.data_cmd == "teach":
        from she.data.loaders import load_records
        from she.reasoning.teacher import TeacherClient, generate_traces
        from she.data.validation import atomic_write_lines

        records, _ = load_records(a.path, a.format, encoding=a.encoding)
        client = TeacherClient(a.base_url, a.teacher_model, api_key=a.api_key)
        accepted, stats = generate_traces(records, client, n=a.n)
        atomic_write_lines(a.out, (json.dumps({"id": r.id, "trace": t}, ensure_ascii=False) + "\n" for r, t in accepted))
        print(json.dumps(stats.to_dict(), indent=2))
    elif a.data_cmd == "facts":
        _cmd_facts(a)
    elif a.data_cmd in ("filter", "diverse"):
        from she.data.sources import load_data
        from she.recipes.sampling import cmd_data

        cmd_data(a, load_data(data_config(a)))


def _cmd_facts(a) -> None:
    from she.data.factstore import FactStore

    if a.facts_cmd == "build":
        rep = FactStore.build(a.paths, a.out, on_error=a.on_error, rejects_path=a.rejects)
        print(rep.summary())
        for dup in rep.duplicates[:10]:
            print(f"  duplicate: {dup.message()}")
        if rep.n_duplicates > 10:
            print(f"  ... and {rep.n_duplicates - 10} more duplicates")
        _rejected_exit(rep)
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
    from she.data.sources import load_splits

    cfg = job_config(a)
    if a.train_cmd in ("srpo", "grpo"):
        from she.training.rl import run_rl_job

        splits = load_splits(cfg.data)
        print(f"saved {run_rl_job(cfg, splits['train'], check_records=splits.get('validation') or None)}")
    elif a.train_cmd == "prm":
        from she.training.prm import run_prm_job

        res = run_prm_job(cfg)
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=2, default=str))
    elif a.train_cmd == "dpo":
        from she.training.dpo import run_dpo_job

        print(f"saved {run_dpo_job(cfg, load_splits(cfg.data)['train'])}")
    elif a.train_cmd == "rm":
        from she.training.reward_model import run_reward_model_job

        print(f"saved {run_reward_model_job(cfg, load_splits(cfg.data)['train'])}")
    elif a.train_cmd == "cross-encoder":
        from she.training.cross_encoder import run_cross_encoder_job

        splits = load_splits(cfg.data)
        evals = splits[cfg.eval_split] if cfg.eval_split != "none" else None
        if evals is not None and not evals:
            raise UserError(f"eval_split {cfg.eval_split}: the data has no {cfg.eval_split} records; "
                            "set eval_split: none or give that part")
        final = run_cross_encoder_job(cfg, splits["train"], evals)
        print(f"saved {final}")
        if evals:
            m = json.loads((final.parent / "metrics.json").read_text())
            print(json.dumps({k: m[k] for k in ("macro_f1", "accuracy", "n")}, indent=2))
    elif a.train_cmd == "curriculum":
        from she.recipes.sampling import cmd_train_curriculum

        cmd_train_curriculum(cfg)
    else:
        from she.training.sft import train_sft

        print(f"saved {train_sft(cfg, load_splits(cfg.data)['train'])}")


def _eval_data(a):
    """The pairs ``she eval`` / ``she calibrate`` score: ``--data``/``--data-config`` and ``--split``."""
    from she.config import read_yaml
    from she.data.sources import eval_records

    base, where = {}, "data"
    if a.data_config:
        raw = read_yaml(a.data_config)
        if not isinstance(raw.get("data"), dict):
            raise UserError(f"{a.data_config}: no `data:` section")
        base, where = raw["data"], f"{a.data_config}.data"
    dcfg = data_config(a, base, where)
    if not a.data_config and dcfg.path is None and not (dcfg.train_file or dcfg.validation_file or dcfg.test_file):
        raise UserError("she eval needs --data FILE (or --data-config JOB.yaml for a job's data, synthetic included)")
    records, note = eval_records(dcfg, a.split)
    print(note)
    if a.limit:
        records = records[: a.limit]
    return records, dcfg


def _cmd_eval(a) -> None:
    from she.evaluation.evaluate import evaluate

    records, dcfg = _eval_data(a)
    m = evaluate(a.model, records, a.out, taxonomy=dcfg.taxonomy, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, bf16=not a.no_bf16, calibrated=not a.no_calibration,
                 evidence=a.evidence)
    print(json.dumps({k: m[k] for k in ("macro_f1", "accuracy", "format_valid_rate", "n")}, indent=2))
    print(f"report: {os.path.join(a.out, 'report.md')}")


def _cmd_calibrate(a) -> None:
    from she.evaluation.evaluate import calibrate

    records, dcfg = _eval_data(a)
    rep = calibrate(a.model, records, taxonomy=dcfg.taxonomy, batch_size=a.batch_size,
                    max_new_tokens=a.max_new_tokens, bf16=not a.no_bf16, evidence=a.evidence, method=a.method)
    print(json.dumps(rep, indent=2))


def _cmd_predict(a) -> None:
    from she.data.sources import load_data
    from she.evaluation.evaluate import predict

    dcfg = data_config(a)
    n = predict(a.model, load_data(dcfg), a.out, taxonomy=dcfg.taxonomy, batch_size=a.batch_size,
                max_new_tokens=a.max_new_tokens, fast=a.fast, evidence=a.evidence)
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
          taxonomy=a.taxonomy, max_queue_pairs=a.max_queue_pairs, request_timeout_s=a.request_timeout_s,
          fast_batch_size=a.fast_batch_size, api_key=a.api_key,
          bf16={"auto": None, "bf16": True, "fp32": False}[a.precision])


def _cmd_annotate(a) -> None:
    from she.annotation.commands import cmd_annotate

    cmd_annotate(a)


def _cmd_demo(a) -> None:
    from she.recipes.demo import run_demo

    s = run_demo(job_config(a))
    print(open(s["report"]).read())


def _cmd_compare(a) -> None:
    import shlex

    from she.recipes.compare import run_compare

    s = run_compare(job_config(a), command=shlex.join(["she", *a.argv]))
    print(open(os.path.join(s["output_dir"], "results.md")).read())


def main(argv: list[str] | None = None) -> None:
    from she.runtime import allocator_default, tune_allocator

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a, extras = parser.parse_known_args(argv)
    # before torch allocates anything: freed memory stays in the process, except in the multi-job commands and
    # RL training, whose heaps fragment (she/runtime.py)
    tune_allocator(default=allocator_default(a.cmd, getattr(a, "train_cmd", None)))
    a.argv, a.extras = argv, extras
    takes_keys = a.cmd in ("train", "demo", "compare") or (a.cmd == "eval")
    if extras and not takes_keys:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Bad input the user can fix: UserError (ConfigError and DataError included) and OSError (a bad path the
    # user gave: an --out that is a file, a read-only folder, a directory as config). Anything else -- a
    # ValueError from a shape check, a KeyError -- is a bug and keeps its traceback.
    user_errors: tuple[type[BaseException], ...] = (UserError, OSError)
    handlers = {"model": _cmd_model, "data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval,
                "predict": _cmd_predict, "serve": _cmd_serve, "demo": _cmd_demo, "compare": _cmd_compare, "calibrate": _cmd_calibrate,
                "annotate": _cmd_annotate}
    try:
        if getattr(a, "help_keys", False):
            _help_keys(a)
            return
        handlers[a.cmd](a)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a finished rank of `accelerate launch`
            _exit_launched_rank()
    except user_errors as e:
        if os.environ.get("SHE_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"she: error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        _close_process_group()


def _exit_launched_rank() -> None:
    """End a rank whose job has finished (results saved) without the interpreter's teardown.

    Even with the process group destroyed, about 1 in 8 two-process CPU launches still died at exit with
    "terminate called without an active exception" (exit status -6, after both ranks had saved the final
    folder: a C++ thread torn down during interpreter finalisation), which turns a finished run into a failed
    one. The job's files are written and closed by then, so the rank flushes its streams and leaves with
    ``os._exit(0)``. Only under a launcher (``WORLD_SIZE`` > 1) and only after success; errors keep their
    exit status and traceback. docs/distributed.md."""
    _close_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
