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

3. **Every rollout of a group computes its prompt again.** GRPO samples G completions of each prompt, and TRL
   hands ``generate`` each prompt G times (next to each other). :func:`shared_prefill_generate` runs the prompt's
   forward pass (its KV cache) once for each run of identical rows and copies the cache to the run's rows before
   decoding starts: the prompt costs 1/G of its forward pass. The rows' caches and the tokens sampled from them are
   those of the plain call up to matmul rounding (a test compares them greedily and by logits).

Measured figures and commands: docs/benchmarks.md, "Rollout generation".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from she.patching import scoped_patch

ROLLOUT_SAMPLERS = ("torch", "inverse_cdf")
ROLLOUT_PREFILLS = ("shared", "per_rollout")


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


def identical_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, counts)``: the first row and the length of each run of consecutive identical rows (ids and mask
    equal), in order, on the inputs' device; ``counts.sum()`` is the number of rows."""
    dev = input_ids.device
    if input_ids.size(0) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    same = (input_ids[1:] == input_ids[:-1]).all(1) & (attention_mask[1:] == attention_mask[:-1]).all(1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.nonzero(~same).flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([input_ids.size(0)], device=dev)])
    return starts, ends - starts


# generate() arguments the shared path leaves to the plain call: its own cache or inputs, rows it would expand
# (beams, several sequences a row), per-position outputs of the prompt, and any tensor (multimodal fields)
_PLAIN_ONLY = {"cache", "past_key_values", "inputs_embeds", "position_ids", "num_beams", "num_return_sequences",
               "cache_implementation", "use_cache", "output_hidden_states", "output_attentions", "prefill_chunk_size"}


def _shareable(model, kwargs: dict) -> bool:
    """Whether a ``generate`` call with these arguments can start from a shared prefill (else: the plain call)."""
    if _PLAIN_ONLY & kwargs.keys() or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return False
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if gc is not None and ((getattr(gc, "num_beams", 1) or 1) > 1 or (getattr(gc, "num_return_sequences", 1) or 1) > 1
                           or getattr(gc, "cache_implementation", None) is not None
                           or getattr(gc, "use_cache", True) is False or getattr(gc, "prefill_chunk_size", None)
                           or getattr(gc, "output_hidden_states", False) or getattr(gc, "output_attentions", False)):
        return False
    return True


def shared_prefill_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, generate=None,
                            **kwargs):
    """``model.generate(input_ids=..., attention_mask=..., **kwargs)`` with the prompt's forward pass made once per
    run of identical rows (module point 3). The prompt up to its last token is run for one row of each run, with
    the positions ``generate`` itself gives a left-padded row (mask cumsum - 1, 0 on padding); the cache is
    expanded to every row of its run and handed to ``generate``, which then feeds only each row's last prompt token
    before decoding. Falls back to the plain call when no two rows are identical, a prompt has one token, or the
    call asks for what a prefilled cache would change (its own cache or inputs, beams or several sequences a row,
    another cache kind, no cache, the prompt's hidden states or attentions, tensor arguments: ``_PLAIN_ONLY``).
    ``generate``: the function to call (default ``model.generate``). Returns what it returns."""
    from transformers import DynamicCache

    generate = generate or model.generate
    starts, counts = identical_runs(input_ids, attention_mask)
    if counts.numel() == input_ids.size(0) or input_ids.size(1) < 2 or not _shareable(model, kwargs):
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    ids, mask = input_ids[starts, :-1], attention_mask[starts, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if getattr(model, "_supports_logits_to_keep", lambda: False)() else {}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **keep)
    cache.batch_select_indices(torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts))
    return generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)


@contextlib.contextmanager
def shared_prefill(model, enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``model.generate(input_ids=..., attention_mask=..., ...)`` is
    :func:`shared_prefill_generate` over whatever ``model.generate`` was (the class's, or a wrapper already set on
    the instance, e.g. she.training.distributed's layout-invariant sampler), set on this model object only and put
    back as it was when the block exits; calls without a mask go to the previous one. Not re-entrant on one model."""
    if not enabled:
        yield
        return
    own = model.generate
    if getattr(own, "_she_shared_prefill", False):
        raise RuntimeError("shared_prefill: this model's generate is already replaced by an open block")
    had_attr = "generate" in vars(model)

    def generate(*args, input_ids=None, attention_mask=None, **kwargs):
        if args or input_ids is None or attention_mask is None:
            return own(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return shared_prefill_generate(model, input_ids, attention_mask, generate=own, **kwargs)

    generate._she_shared_prefill = True
    model.generate = generate
    try:
        yield
    finally:
        if had_attr:
            model.generate = own
        else:
            del model.generate


__all__ = ["ROLLOUT_PREFILLS", "ROLLOUT_SAMPLERS", "categorical_sample", "fast_sampling", "generation_autocast",
           "identical_runs", "shared_prefill", "shared_prefill_generate"]
