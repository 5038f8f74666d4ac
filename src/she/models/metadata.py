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

from she.errors import UserError

SHE_META = "she.json"


def save_she_meta(model_dir: str | os.PathLike, meta: dict) -> None:
    """How the model expects to be prompted, saved beside its weights (like generation_config.json).

    The step schema in effect (:func:`she.reasoning.schema.schema_scope`) is recorded as ``schema`` unless
    it is the built-in one, so every model trained on a schema variant carries it to eval, RL and serving."""
    from she.reasoning.schema import active_schema_name

    meta = dict(meta)
    if "schema" not in meta and active_schema_name() != "default":
        meta["schema"] = active_schema_name()
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


def schema_of(model: str | os.PathLike) -> str:
    """The step schema a model writes (``she.json``). A folder without one -- a base model, a Trainer
    checkpoint, a registered model not prepared yet -- says nothing, so the schema already in effect is kept
    (the built-in one at top level). A name that is no model at all also says nothing here: loading it fails
    next, with the loader's own message."""
    from she.models.registry import resolve_model
    from she.reasoning.schema import active_schema_name

    if not isinstance(model, (str, os.PathLike)):  # None, or an already loaded (model, tokenizer) pair
        return active_schema_name()
    try:
        folder = resolve_model(model, prepare_if_missing=False)
    except FileNotFoundError:
        return active_schema_name()
    return load_she_meta(folder).get("schema", active_schema_name())


def model_schema(model_path, *args, **kwargs) -> str:
    """The step schema of the model an entry point reads (its first argument), for
    :func:`she.reasoning.schema.in_schema`: ``@in_schema(model_schema)``."""
    return schema_of(model_path)


def prompt_style_of(model_path) -> str:
    """The prompt style the model was fine-tuned with (``she.json``), else the full zero-shot prompt."""
    from she.models.registry import resolve_model

    return load_she_meta(resolve_model(model_path)).get("prompt_style", "full")


def label_offsets_of(model_path) -> dict[str, float] | None:
    """The per-class verdict offsets fitted by ``she calibrate`` (``she.json`` ``label_offsets``), or None."""
    from she.models.registry import resolve_model

    offsets = load_she_meta(resolve_model(model_path)).get("label_offsets")
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


__all__ = ["SHE_META", "autocast", "label_offsets_of", "load_she_meta", "model_schema", "prompt_style_of", "save_she_meta", "schema_of",
           "use_cpu"]
