"""What a model folder says about itself, and the device facts every layer reads the same way.

A model trained by she carries ``she.json`` beside its weights (like ``generation_config.json``): how it
expects to be prompted (``prompt_style``), its training target, taxonomy and -- when not the built-in one --
the step schema it writes. Training writes it (:func:`save_she_meta`); evaluation, RL, sampling and serving
read it (:func:`load_she_meta`, :func:`prompt_style_of`, :func:`schema_of`). It lives here, in the core
``models`` package, so no reader has to import a training module to open a folder.

Also here: :func:`autocast` (bf16 autocast or nothing) and :func:`use_cpu` (CPU exactly when there is no
CUDA), which generation, the judge, training and serving share.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from she.errors import UserError

SHE_META = "she.json"


def save_she_meta(model_dir: str | os.PathLike, meta: dict) -> None:
    """How the model expects to be prompted, saved beside its weights (like generation_config.json).

    ``meta["schema"]`` is the step schema spec the model writes (:func:`she.reasoning.schema.resolve_schema`);
    it is kept only when it is not the built-in one (``None``/``"default"`` are dropped), so a model trained on
    a schema variant carries it to eval, RL and serving, and a default model's she.json stays as it was."""
    meta = dict(meta)
    if meta.get("schema") in (None, "default"):
        meta.pop("schema", None)
    else:
        meta["schema"] = str(meta["schema"])
    (Path(model_dir) / SHE_META).write_text(json.dumps(meta, indent=2))


def load_she_meta(model_dir: str | os.PathLike) -> dict:
    p = Path(model_dir) / SHE_META
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text())
    except ValueError as e:  # invalid JSON or not UTF-8: a damaged model folder, not a bug
        raise UserError(f"{p}: not a valid she.json ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    return meta


def schema_of(model: Any, default: str = "default") -> str:
    """The step schema spec a model writes (``she.json`` ``schema``), else ``default``.

    A folder without one -- a base model, a Trainer checkpoint, a registered model not prepared yet -- says
    nothing, and neither does a name that is no model at all (loading it fails next, with the loader's own
    message) or an already loaded ``(model, tokenizer)`` pair: then ``default`` is returned, which a caller
    that knows better (``she compare`` evaluating a checkpoint of its own run) sets itself."""
    from she.models.registry import resolve_model

    if not isinstance(model, (str, os.PathLike)):
        return default
    try:
        folder = resolve_model(model, prepare_if_missing=False)
    except FileNotFoundError:
        return default
    return str(load_she_meta(folder).get("schema", default))


def model_step_schema(model: Any, taxonomy: str = "hd3", default: str = "default"):
    """The :class:`~she.reasoning.schema.StepSchema` a model writes, for ``taxonomy``: its ``she.json`` spec
    (:func:`schema_of`) resolved by :func:`she.reasoning.schema.resolve_schema`. What ``she eval``, ``predict``,
    RL, pass@N and the service pass down when the caller gives no schema."""
    from she.reasoning.schema import resolve_schema

    return resolve_schema(schema_of(model, default), taxonomy)


def prompt_style_of(model_path) -> str:
    """The prompt style the model was fine-tuned with (``she.json``), else the full zero-shot prompt."""
    from she.models.registry import resolve_model

    return load_she_meta(resolve_model(model_path)).get("prompt_style", "full")


EVIDENCE_MODES = ("generated", "computed", "marginal")  # she.config.Evidence (a test keeps the two equal)


def offsets_key(evidence: str = "generated") -> str:
    """The ``she.json`` key of the verdict offsets fitted for an evidence mode: the verdict after generated steps
    and after computed ones are different readings, each calibrated on its own (``label_offsets`` and
    ``label_offsets_computed``)."""
    if evidence not in EVIDENCE_MODES:
        raise UserError(f"evidence must be one of {EVIDENCE_MODES}, got {evidence!r}")
    return "label_offsets" if evidence == "generated" else f"label_offsets_{evidence}"


def label_offsets_of(model_path, evidence: str = "generated") -> dict[str, float] | None:
    """The per-class verdict offsets fitted by ``she calibrate`` for ``evidence`` (``she.json``), or None."""
    from she.models.registry import resolve_model

    offsets = load_she_meta(resolve_model(model_path)).get(offsets_key(evidence))
    return {str(k): float(v) for k, v in offsets.items()} if isinstance(offsets, dict) and offsets else None


def autocast(enabled: bool, device):
    """bf16 autocast on ``device`` (a ``torch.device``) when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


__all__ = ["EVIDENCE_MODES", "SHE_META", "autocast", "label_offsets_of", "load_she_meta", "model_step_schema", "offsets_key",
           "prompt_style_of", "save_she_meta", "schema_of", "use_cpu"]
