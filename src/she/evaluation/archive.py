"""Prediction archives: a held-out evaluation's per-pair outputs, small enough to commit, without the data.

``runs/`` is never committed, and a session's checkout may start without the previous session's runs, so the
``predictions.jsonl`` of a compare row is lost with it, and with it every later *paired* comparison against that
row (seeds pooled across sessions). An archive keeps what a paired comparison needs and nothing of the data:

    {"id": "hd-12345", "raw_label": "Partial", "label": "Exact", "probs": {"Exact": 0.61, ...}}

one line a pair, gzip-compressed (``.jsonl.gz``; plain ``.jsonl`` too): the pair's id, the generated label (null
for a generation with no readable verdict, ``format_ok: false``, which a comparison scores as wrong), the
label the evaluation reported (calibrated when it was, or re-read with the offsets given when archiving) and the
label-token probabilities (6 significant digits: offsets of several nats read the small ones). No query, product,
reasoning or gold label: the data's licence keeps them out of the repository, so the gold label comes back from
the data file by id when an archive is read (``scripts/paired_eval.py`` takes it from the data config's split).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from she.data.validation import atomic_write_lines, iter_jsonl
from she.errors import UserError
from she.evaluation.calibration import apply_offsets


def _field(d, key: str, path: Path, n: int):
    if not isinstance(d, dict):
        raise UserError(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
    if d.get(key) is None:
        raise UserError(f"{path}:{n}: field {key!r}: missing")
    return d[key]


def _labels(d: Mapping, offsets: Mapping[str, float] | None) -> tuple[str | None, str | None]:
    """A prediction's generated label and its reported one (re-read from the probabilities with ``offsets``)."""
    raw = d.get("raw_label", d.get("label"))
    return raw, apply_offsets(d.get("probs"), raw, offsets) if offsets else d.get("label")


def compact_prediction(d: Mapping, offsets: Mapping[str, float] | None = None) -> dict:
    """One archive line from one ``predictions.jsonl`` object: id, generated label, reported (or re-read) label,
    probabilities; everything else (reasoning, gold, step probabilities) left out."""
    raw, label = _labels(d, offsets)
    out = {"id": str(d["id"]), "raw_label": raw, "label": label}
    if d.get("probs"):
        out["probs"] = {str(c): float(f"{float(p):.6g}") for c, p in d["probs"].items()}
    return out


def write_archive(src: str | os.PathLike, dest: str | os.PathLike,
                  offsets: Mapping[str, float] | None = None) -> int:
    """Archive ``src`` (a ``predictions.jsonl``) into ``dest`` (``.jsonl.gz`` compressed); the number of pairs.

    Written to a temporary file and renamed, so an interrupted call leaves no half archive."""
    src, dest = Path(src), Path(dest)
    rows, seen = [], set()
    for n, d in iter_jsonl(src):
        rid = str(_field(d, "id", src, n))
        if rid in seen:
            raise UserError(f"{src}:{n}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        if d.get("format_ok") is not False or "label" not in d:  # a null label only for a format-invalid trace
            _field(d, "label", src, n)
        rows.append(json.dumps(compact_prediction(d, offsets), ensure_ascii=False, sort_keys=True) + "\n")
    if not rows:
        raise UserError(f"{src}: no predictions")
    atomic_write_lines(dest, rows)  # gzip-compressed for a .gz name
    return len(rows)


def read_predictions(path: str | os.PathLike, offsets: Mapping[str, float] | None = None,
                     gold: Mapping[str, str] | None = None) -> dict[str, dict[str, str | None]]:
    """``{id: {"gold", "raw", "calibrated"}}`` of a ``predictions.jsonl`` or an archive (``.jsonl.gz``).

    ``raw`` is the generated label; ``calibrated`` is the file's reported label, or with ``offsets`` the raw label
    re-read from the probabilities. The gold label is the line's own ``gold`` or, for an archive, ``gold[id]``
    (the data file's label); a pair with neither is an error naming the file and line."""
    path = Path(path)
    out: dict[str, dict[str, str | None]] = {}
    for n, d in iter_jsonl(path):
        rid = str(_field(d, "id", path, n))
        raw, reported = _labels(d, offsets)
        g = d.get("gold")
        if g is None:
            if gold is None:
                raise UserError(f"{path}:{n}: field 'gold': missing (an archive: pass the data's gold labels)")
            if rid not in gold:
                raise UserError(f"{path}:{n}: field 'id': {rid!r} is not a labelled pair of the data given")
            g = gold[rid]
        out[rid] = {"gold": g, "raw": raw, "calibrated": reported}
    return out


__all__ = ["compact_prediction", "read_predictions", "write_archive"]
