"""Sampling rollouts faster on a CPU, with the same distribution: two measured costs of ``model.generate``.

1. **The weights are cast to bf16 at every decoding step.** TRL's GRPO trainer generates with the model that
   accelerate prepared for training, whose ``forward`` carries its own bf16 autocast. Autocast caches the bf16
   copy of a weight only until the *outermost* autocast region exits, which here is each ``forward``: every
   generated token re-reads the float32 weights and writes bf16 copies of all 135 M parameters.
   :func:`generation_autocast` opens one bf16 autocast region around the whole ``generate`` call, so the inner
   regions nest inside it and the casts are made once per call. The casts are the same, so the tokens are the
   same (a test checks it token for token).
2. **``torch.multinomial`` is slow over a large vocabulary on a CPU.** At SmolLM2's 49,152 tokens and 32 rows
   it took ~80 ms a step here (``scripts/bench_rollouts.py``), as much as a decoding step of the model itself.
   :func:`categorical_sample` draws from the same distribution by inversion (a float64 cumulative sum, one
   uniform number a row, a binary search): about 2 ms. :func:`fast_sampling` routes transformers' sampling call
   (``torch.multinomial(probs, num_samples=1)`` in ``GenerationMixin._sample``) to it for the duration of a
   ``with`` block; every other use of ``torch.multinomial`` goes to torch's. The draws follow another random
   stream than torch's, so a run is reproducible with itself, not bit for bit with a run on torch's sampler.

Measured figures and commands: docs/benchmarks.md, "Rollout generation".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from she.patching import scoped_patch

ROLLOUT_SAMPLERS = ("torch", "inverse_cdf")


def categorical_sample(probs: torch.Tensor, generator: torch.Generator | None = None, *,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [N, V] (non-negative, rows need not sum to 1), drawn with probability
    ``probs[i, j] / probs[i].sum()``: the row's cumulative sum in float64 (its rounding is far below any
    probability that matters), a uniform ``u`` in [0, total), and the first index whose cumulative sum exceeds
    ``u``. An index of zero probability owns an empty interval and is never drawn. ``uniform`` [N] in [0, 1)
    replaces the random numbers (tests). Returns int64 [N]."""
    if probs.dim() != 2:
        raise ValueError(f"categorical_sample takes [N, V] probabilities, got shape {tuple(probs.shape)}")
    cum = probs.to(torch.float64).cumsum(dim=-1)
    total = cum[:, -1:]
    if not bool(torch.isfinite(total).all()) or bool((total <= 0).any()) or bool((probs < 0).any()):
        # torch.multinomial's condition, in its words
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0, or a row sums to 0")
    if uniform is None:
        uniform = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    u = uniform.to(torch.float64).reshape(total.shape) * total
    idx = torch.searchsorted(cum, u, right=True).squeeze(1)
    # any index < V has positive probability; only u * total rounding up to total itself gives V: then the last index
    # of positive probability (computed only in that rare case: this runs once per generated token)
    if bool((idx >= probs.size(1)).any()):
        last = probs.size(1) - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)
        idx = torch.minimum(idx, last)
    return idx


_TORCH_MULTINOMIAL = torch.multinomial  # torch's own, whatever is installed while a block is open
_THREAD = threading.local()  # .depth: open blocks in this thread (only they route their draws)


def _routed_multinomial(input, num_samples, replacement=False, *, generator=None, out=None):  # noqa: A002
    if (getattr(_THREAD, "depth", 0) > 0 and num_samples == 1 and input.dim() == 2 and out is None
            and input.is_floating_point()):
        return categorical_sample(input, generator).unsqueeze(1)
    return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)


@contextlib.contextmanager
def fast_sampling(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``torch.multinomial(probs, 1)`` on [N, V] probabilities (the call of transformers'
    sampling loop) is :func:`categorical_sample`; any other call (more samples, with replacement, ``out=``, other
    shapes, other threads) goes to torch's own. Re-entrant and thread-safe: the wrapper is installed while any
    block is open in any thread (she.patching), routes only the calls of threads inside a block, and torch's
    function is back when the last block closes."""
    if not enabled:
        yield
        return
    with scoped_patch(torch, "multinomial", _routed_multinomial):
        _THREAD.depth = getattr(_THREAD, "depth", 0) + 1
        try:
            yield
        finally:
            _THREAD.depth -= 1


def generation_autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """One bf16 autocast region around a whole ``generate`` call when ``enabled`` (see the module's point 1), so
    that the per-``forward`` regions of a model prepared by accelerate reuse one bf16 copy of each weight; a no-op
    context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


__all__ = ["ROLLOUT_SAMPLERS", "categorical_sample", "fast_sampling", "generation_autocast"]
