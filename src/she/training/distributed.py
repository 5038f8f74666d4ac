"""Multi-process training helpers: layout-invariant sampling, vLLM checks, import strings.

Why layout-invariant sampling exists: TRL samples completions with ``model.generate(do_sample=True)``,
which draws from the process's global torch RNG. With one process the 12 rows of a step are drawn in one
batched call; with two processes each draws 6 rows from its own RNG stream. Same seed, same weights, same
prompts -- and still different completions, so a 1-process and a 2-process run cannot be compared row by
row. :class:`RowKeyedSampler` makes every sampled token a function of ``(seed, generation round, global
row, token position)`` only, using the Gumbel-max trick (``argmax(logits / T + Gumbel noise)`` is an exact
sample from ``softmax(logits / T)``), with the noise drawn from a private generator keyed by those four
numbers. The global row is ``process_index * local_batch + local_row``, which is the row's position in
the global batch on any number of processes (TRL's ``process_slice``), so the rollouts do not depend on
how the batch is split. See docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from she.errors import UserError

VLLM_MODES = ("colocate", "server")


def _process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def row_seed(seed: int, generation_round: int, row: int, position: int) -> int:
    """A 63-bit generator seed from the four numbers that identify one sampled token (pure, stable across
    processes and Python runs: no ``hash()``, whose value for strings changes per interpreter)."""
    key = f"{seed}:{generation_round}:{row}:{position}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def gumbel_noise(seed: int, size: int) -> Tensor:
    """``size`` i.i.d. standard Gumbel draws from a private CPU generator (float64 for exact ties-free argmax)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(size, generator=g, dtype=torch.float64).clamp_(1e-300, 1.0 - 1e-16)
    return -torch.log(-torch.log(u))


class RowKeyedSampler:
    """Logits processor that samples the next token of every row with row-keyed Gumbel noise.

    It returns scores that are 0 on the chosen token and -inf elsewhere, so whatever ``generate`` does
    afterwards (temperature warper, ``multinomial``) picks that token: the global RNG no longer decides.
    ``temperature`` must be the generation temperature (the noise is added to ``scores / temperature``).
    ``row_offset`` is the global index of local row 0; by default ``rank * local_batch`` from
    ``torch.distributed`` (every process generates the same number of rows in TRL). One instance serves one
    ``generate`` call: it counts its calls to know the token position.
    """

    def __init__(self, seed: int, generation_round: int, temperature: float = 1.0, row_offset: int | None = None):
        if temperature <= 0:
            raise UserError(f"temperature must be > 0 for sampling, got {temperature}")
        self.seed = int(seed)
        self.generation_round = int(generation_round)
        self.temperature = float(temperature)
        self.row_offset = row_offset
        self.position = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        b, v = scores.shape
        offset = self.row_offset if self.row_offset is not None else _process_index() * b
        logits = scores.detach().to(torch.float64).cpu() / self.temperature
        choice = torch.empty(b, dtype=torch.long)
        for i in range(b):
            noise = gumbel_noise(row_seed(self.seed, self.generation_round, offset + i, self.position), v)
            choice[i] = int(torch.argmax(logits[i] + noise))
        self.position += 1
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(b, device=scores.device), choice.to(scores.device)] = 0.0
        return out


def install_layout_invariant_sampling(model: Any, seed: int) -> Any:
    """Wrap ``model.generate`` so that sampled generation uses :class:`RowKeyedSampler`.

    Works on the instance (TRL unwraps DDP/FSDP to this same object before generating). Each call is one
    generation round; every process makes the same sequence of calls, so the round number agrees across
    processes. Only plain sampling is supported: ``top_k``/``top_p``/``min_p`` would have to be applied to the
    noisy scores and are refused rather than silently ignored. Greedy calls pass through unchanged.
    """
    from transformers import LogitsProcessorList

    original = model.generate
    rounds = itertools.count()

    def generate(*args: Any, **kwargs: Any):
        gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        if gc is None or not getattr(gc, "do_sample", False):
            return original(*args, **kwargs)
        top_k, top_p, min_p = getattr(gc, "top_k", None), getattr(gc, "top_p", None), getattr(gc, "min_p", None)
        if top_k not in (None, 0) or top_p not in (None, 1.0) or min_p not in (None, 0.0):
            raise UserError(
                f"layout_invariant_sampling samples from the full softmax; top_k={top_k}, top_p={top_p}, "
                f"min_p={min_p} are not supported (leave them at TRL's defaults)"
            )
        sampler = RowKeyedSampler(seed, next(rounds), temperature=getattr(gc, "temperature", None) or 1.0)
        processors = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []), sampler])
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    return model


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_settings(use_vllm: bool, vllm_mode: str, vllm_gpu_memory_utilization: float,
                        vllm_server_base_url: str | None) -> None:
    """Fail before any model is loaded when the vLLM settings cannot work (clear message, no traceback)."""
    if vllm_mode not in VLLM_MODES:
        raise UserError(f"vllm_mode must be one of {VLLM_MODES}, got {vllm_mode!r}")
    if not 0.0 < vllm_gpu_memory_utilization <= 1.0:
        raise UserError(f"vllm_gpu_memory_utilization must be in (0, 1], got {vllm_gpu_memory_utilization}")
    if vllm_server_base_url is not None and not str(vllm_server_base_url).startswith(("http://", "https://")):
        raise UserError(f"vllm_server_base_url must start with http:// or https://, got {vllm_server_base_url!r}")
    if use_vllm and not vllm_available():
        raise UserError("use_vllm: true, but vLLM is not installed: pip install 'she[vllm]'; needs a GPU")


def import_object(spec: str) -> Callable[..., Any]:
    """``"package.module:name"`` -> the object (how a YAML config names a Python function)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"expected 'module:function', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise UserError(f"{spec!r}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise UserError(f"{spec!r}: module {module!r} has no attribute {name!r}") from None
    if not callable(obj):
        raise UserError(f"{spec!r} is not callable")
    return obj


__all__ = [
    "VLLM_MODES",
    "RowKeyedSampler",
    "check_vllm_settings",
    "gumbel_noise",
    "import_object",
    "install_layout_invariant_sampling",
    "row_seed",
    "vllm_available",
]
