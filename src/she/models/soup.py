"""Weight averaging ("model soup", Wortsman et al. 2022) of fine-tunes that share one pretrained start.

Two SFTs of the same base on different samples of the data (or with other seeds) usually sit in one basin of the
loss, so the uniform average of their weights is a single model of the same size and speed that is often as good
as the best of them and sometimes better (docs/results.md, session 29, measures it here). It costs no training:
``she model average A B --out C`` writes a ``save_pretrained`` folder that every command reads as it is.

The verdict offsets that ``she calibrate`` fitted (``label_offsets*`` in ``she.json``) belong to the ingredient they
were fitted on, so the soup's ``she.json`` drops them: calibrate the soup on the validation pairs before use.

:func:`average_state_dicts` is the pure part (tensors in, tensors out); :func:`average_models` reads and writes
folders, and names the folder and tensor of any mismatch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from she.errors import UserError
from she.models.metadata import SHE_META, load_she_meta, save_she_meta

WEIGHTS = "model.safetensors"
_OFFSET_KEYS = "label_offsets"


def soup_weights(n: int, weights: list[float] | None = None) -> list[float]:
    """The mixing weights, normalised to sum to 1 (uniform when ``weights`` is None)."""
    if n < 2:
        raise UserError(f"a weight average needs at least 2 models, got {n}")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weights: {len(weights)} numbers for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights {weights}: must be >= 0 with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, key by key, accumulated in float32 and returned in each tensor's own dtype.

    Every state must have the same keys, shapes and dtypes (checked by the caller with file names); tensors that
    are not floating point (buffers of ids) must be equal across states and are copied from the first."""
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for w, state in zip(weights, states):
            acc += w * state[key].to(torch.float32)
        out[key] = acc.to(first.dtype)
    return out


def _check_same(states: list[dict[str, torch.Tensor]], paths: list[Path]) -> None:
    ref, ref_path = states[0], paths[0] / WEIGHTS
    for state, path in zip(states[1:], paths[1:]):
        where = path / WEIGHTS
        for name in sorted(set(ref) ^ set(state)):
            has, lacks = (ref_path, where) if name in ref else (where, ref_path)
            raise UserError(f"{lacks}: no tensor {name!r}, which {has} has; only fine-tunes of one model can be "
                            f"averaged")
        for key, t in ref.items():
            u = state[key]
            if u.shape != t.shape or u.dtype != t.dtype:
                raise UserError(f"{where}: tensor {key!r} is {tuple(u.shape)} {u.dtype}, {ref_path} has "
                                f"{tuple(t.shape)} {t.dtype}; only fine-tunes of one model can be averaged")
            if not t.is_floating_point() and not torch.equal(t, u):
                raise UserError(f"{where}: integer tensor {key!r} differs from {ref_path}'s")


def average_models(paths: list[str | os.PathLike], out: str | os.PathLike,
                   weights: list[float] | None = None) -> Path:
    """Write the weight average of the ``save_pretrained`` folders ``paths`` to ``out`` (a new folder).

    The config, tokenizer and generation files are copied from the first folder; its ``she.json`` is copied
    without the fitted verdict offsets, and records the ingredients and weights under ``"soup"``."""
    from safetensors.torch import load_file, save_file

    folders = [Path(p) for p in paths]
    w = soup_weights(len(folders), weights)
    for f in folders:
        if not (f / WEIGHTS).is_file():
            raise UserError(f"{f}: no {WEIGHTS} (give save_pretrained folders of full models, e.g. runs/x/sft/final)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; give a new folder")
    states = [load_file(str(f / WEIGHTS)) for f in folders]
    _check_same(states, folders)
    soup = average_state_dicts(states, w)
    out.mkdir(parents=True, exist_ok=True)
    for item in folders[0].iterdir():
        if item.is_file() and item.name not in (WEIGHTS, SHE_META, "training_args.bin") \
                and not item.name.startswith("calibration"):
            shutil.copy2(item, out / item.name)
    meta = {k: v for k, v in load_she_meta(folders[0]).items() if not k.startswith(_OFFSET_KEYS)}
    meta["soup"] = {"models": [str(f) for f in folders], "weights": w}
    save_she_meta(out, meta)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(soup, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    return out


__all__ = ["average_models", "average_state_dicts", "soup_weights"]
