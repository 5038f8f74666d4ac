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

4. **Decoding attention without a mask takes a slow kernel.** With one query token a row and no padding mask,
   transformers hands torch's CPU SDPA the grouped-query flag, whose kernel took ~2.3 ms a layer at 32 rows and
   ~150 cached tokens here (~0.43 ms with a mask, where transformers instead stacks a key/value head's query heads
   as query positions; scripts/bench_decode_ops.py). :func:`decode_attention_forward` takes the stacked path for
   every one-token query (:func:`grouped_decode_attention`); every other call (a prompt, training, dropout, soft
   caps, sinks, another device) is transformers' SDPA. :func:`decode_attention` switches a model that uses SDPA
   to it for the duration of a ``with`` block: the same kernel and arithmetic as transformers' own path with a
   mask.
5. **The KV cache is copied at every token.** transformers' ``DynamicLayer`` grows a layer's keys and values by
   ``torch.cat`` -- the whole cache copied, every layer, every decoding step (~10 % of a step here).
   :func:`growing_cache` writes each new token into spare room that doubles when it runs out (amortised O(1) a
   token) and hands back a view of the filled part: the same tensors' values, no copy.
6. **Each linear layer's weight is cast and reordered at every call.** Under bf16 autocast every ``Linear`` casts
   its float32 weight to bf16 (cached for the region) and oneDNN reorders it into its blocked layout at every call;
   with one token a row the weights' bytes bound a decoding step. :func:`packed_linears` packs a bf16 copy of each
   weight once a block and calls oneDNN's linear on it: the same bf16 products, bit for bit, faster at a few rows.
7. **transformers' module stack costs a quarter of a decoding step at a few rows.** Module calls, keyword plumbing,
   output capture, the mask builder and SDPA's kernel around a one-token query: she.models.decode_step computes a
   Llama model's one-token step from its packed weights with the query/key/value and gate/up projections fused,
   the same operations otherwise, and the attention's scores in float32 (:func:`fast_decoding` opens it with the
   packed layers).

Measured figures and commands: docs/benchmarks.md, "Rollout generation".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from she.models.decode_step import lean_decoding, packed_linear_ops
from she.patching import thread_routed_patch

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
    with thread_routed_patch(torch, "multinomial", _routed_multinomial, _THREAD):
        yield


def generation_autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """One bf16 autocast region around a whole ``generate`` call when ``enabled`` (see the module's point 1), so
    that the per-``forward`` regions of a model prepared by accelerate reuse one bf16 copy of each weight; a no-op
    context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def left_pad(rows: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [N, longest] of token-id ``rows`` padded on the left (generation appends on the
    right, so every row's last token is aligned), the mask 0 on padding."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


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


# -- decoding attention (module point 4) -----------------------------------------------------------------------------

DECODE_ATTENTION = "she_decode"  # the name registered with transformers' attention and mask interfaces
_DECODE_FALLBACK_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")  # features only SDPA's path handles
DECODING_ENV = "SHE_DECODING"  # fast (default: points 4-7 on a CPU) | plain (transformers' paths)


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of one query token a row: ``query`` [B, H, 1, D], ``key`` [B, K, L, D], ``value`` [B, K, L, Dv]
    with H a multiple of K (query head h reads key/value head h // (H / K), as transformers' ``repeat_kv`` has it),
    ``mask`` None, boolean (True = attend) or additive, broadcastable to [B, 1, 1, L] or [B, H, 1, L]. The G = H / K
    query heads of a key/value head go to torch's SDPA as G query *positions* of one head ([B, K, G, D], not causal:
    each attends to every cached key the mask allows), so the keys are neither repeated nor read through the
    kernel's grouped-query path. Returns [B, 1, H, Dv] in the query's dtype."""
    b, h, q_len, d = query.shape
    k_heads, dv = key.size(1), value.size(-1)
    if q_len != 1 or h % k_heads:
        raise ValueError(f"grouped_decode_attention takes one query token and H % K == 0, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    g = h // k_heads
    if mask is not None and mask.dim() == 4 and mask.size(1) == h and h > 1:  # per-head mask: grouped as the query
        mask = mask.reshape(mask.size(0), k_heads, g, mask.size(-1))
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, k_heads, g, d), key, value,
                                                           attn_mask=mask, scale=scaling)  # [B, K, G, Dv]
    return out.reshape(b, h, 1, dv).transpose(1, 2)


def decode_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: :func:`grouped_decode_attention` for a one-token query on a CPU
    without dropout or the features in ``_DECODE_FALLBACK_KWARGS``; transformers' SDPA for anything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.size(2) != 1 or dropout > 0 or query.device.type != "cpu" or kwargs.get("output_attentions")
            or any(kwargs.get(k) is not None for k in _DECODE_FALLBACK_KWARGS) or query.size(1) % key.size(1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    return grouped_decode_attention(query, key, value, attention_mask, scale), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # the masks SDPA gets (else transformers builds none)


def resolve_fast_decoding(enabled: bool | None = None) -> bool:
    """``enabled`` as given, or for ``None`` the environment's ``SHE_DECODING`` (``fast``, the default: module points
    4-7, or ``plain``: transformers' attention, cache and linear layers)."""
    from she.errors import env_switch

    return env_switch(enabled, DECODING_ENV, "fast", "plain")


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "module"):  # DistributedDataParallel and similar wrappers
        config = getattr(model.module, "config", None)
    return config


@contextlib.contextmanager
def decode_attention(model, enabled: bool | None = None) -> Iterator[None]:
    """Inside the block a model whose attention is SDPA uses :func:`decode_attention_forward` (module point 4):
    one-token queries by :func:`grouped_decode_attention`, every other call SDPA as before. Models with another
    attention (eager, flash, flex), ``enabled=False`` or ``SHE_DECODING=plain`` (for ``enabled=None``) are left as
    they are. Nested blocks leave the switch to the outermost; the model's config is back as it was on
    exit. The switch is the model's (its config), not the thread's: a forward pass of another thread meanwhile takes
    the same path, and for anything but a one-token query that path is SDPA."""
    config = _model_config(model)
    if (not resolve_fast_decoding(enabled) or config is None
            or getattr(config, "_attn_implementation", None) != "sdpa"):
        yield
        return
    _register_decode_attention()
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


# -- the growing KV cache (module point 5) --------------------------------------------------------------------------

_GROW_THREAD = threading.local()  # .depth: open growing_cache blocks in this thread


def _grow(buffer: torch.Tensor | None, filled: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer, view)``: ``filled`` [B, H, n, D] followed by ``new`` [B, H, t, D] as the first n + t positions of
    ``buffer`` (reused when ``filled`` is its prefix view and there is room, else a new one of twice the length,
    ``filled`` copied in once), and the view of those positions."""
    n, t = (filled.size(-2) if filled.numel() else 0), new.size(-2)
    reusable = (buffer is not None and n > 0 and filled.data_ptr() == buffer.data_ptr()
                and filled.stride() == buffer.stride() and filled.shape[:2] == buffer.shape[:2]
                and buffer.size(-2) >= n + t and buffer.dtype == new.dtype)
    if not reusable:
        b, h, _, d = new.shape
        buffer = new.new_empty(b, h, max(2 * (n + t), 16), d)
        if n:
            buffer[:, :, :n].copy_(filled)
    buffer[:, :, n:n + t].copy_(new)
    return buffer, buffer[:, :, :n + t]


def _growing_update(self, key_states, value_states, *args, **kwargs):
    if getattr(_GROW_THREAD, "depth", 0) == 0 or type(self) is not _DYNAMIC_LAYER[0]:
        return _DYNAMIC_UPDATE[0](self, key_states, value_states, *args, **kwargs)
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    self._she_key_buffer, self.keys = _grow(getattr(self, "_she_key_buffer", None), self.keys, key_states)
    self._she_value_buffer, self.values = _grow(getattr(self, "_she_value_buffer", None), self.values, value_states)
    return self.keys, self.values


_DYNAMIC_LAYER: list = []  # transformers' DynamicLayer class, and its own update, once looked up
_DYNAMIC_UPDATE: list = []


@contextlib.contextmanager
def growing_cache(enabled: bool = True) -> Iterator[None]:
    """Inside the block, in this thread, transformers' ``DynamicLayer.update`` (the default KV cache's, exactly that
    class: subclasses such as the sliding-window layer keep their own) appends into spare room instead of
    concatenating (module point 5): the returned keys and values are views of a buffer that doubles when full, with
    the values ``torch.cat`` would give. A layer whose keys were replaced meanwhile (``batch_select_indices``,
    ``reorder_cache``) is detected by its tensor and starts a new buffer; a ``crop`` leaves a shorter prefix view of
    the same buffer, which the next token overwrites from its end. Re-entrant and thread-safe as
    :func:`fast_sampling` is (she.patching)."""
    if not enabled:
        yield
        return
    from transformers.cache_utils import DynamicLayer

    if not _DYNAMIC_LAYER:
        _DYNAMIC_LAYER.append(DynamicLayer)
        _DYNAMIC_UPDATE.append(DynamicLayer.update)
    with thread_routed_patch(DynamicLayer, "update", _growing_update, _GROW_THREAD):
        yield


# -- prepacked linear layers (module point 6) -----------------------------------------------------------------------

def _packed_forward(own, packed: torch.Tensor, bias: torch.Tensor | None, link):
    def forward(x: torch.Tensor) -> torch.Tensor:
        # only what autocast's bf16 linear would compute: no gradient, this thread in a CPU bf16 autocast region
        if (torch.is_grad_enabled() or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") != torch.bfloat16):
            return own(x)
        return link(x.to(torch.bfloat16), packed, bias, "none", [], "")

    forward._she_packed = True
    forward._she_packed_weight, forward._she_packed_bias = packed, bias  # for she.models.decode_step to reuse
    return forward


@contextlib.contextmanager
def packed_linears(model, enabled: bool | None = None) -> Iterator[None]:
    """Inside the block every ``torch.nn.Linear`` of ``model`` (exactly that class, the LM head included) computes
    what CPU bf16 autocast computes for it -- the input and weight rounded to bf16, a bf16 result -- from a bf16
    copy of its weight packed once, at the block's entry, into oneDNN's blocked layout (module point 6), instead
    of autocast's cast and oneDNN's reorder of the weight at every call. Calls with gradients enabled, outside a
    bf16 autocast region or on another device take the layer's own forward. The weights must not change inside the
    block (generation: they do not). A no-op for ``enabled=False``, ``SHE_DECODING=plain`` (for ``None``), models
    off the CPU or torch builds without oneDNN's linear ops, and inside an open block on the same model (nested, or
    in another thread: the outermost block packs and unpacks; a call after it closed takes the layer's own forward,
    the same products). A layer whose forward something else replaced is an error."""
    ops = packed_linear_ops()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    if not resolve_fast_decoding(enabled) or ops is None or not linears:
        yield
        return
    reorder, link = ops
    replaced = [vars(m).get("forward") for m in linears if "forward" in vars(m)]
    if replaced and all(getattr(f, "_she_packed", False) for f in replaced) and len(replaced) == len(linears):
        yield  # an open block already packed this model
        return
    if replaced:
        raise RuntimeError("packed_linears: a linear layer's forward is already replaced by something else")
    with torch.no_grad():
        for m in linears:
            packed = reorder(m.weight.detach().to(torch.bfloat16))
            bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)
            m.forward = _packed_forward(m.forward, packed, bias, link)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def fast_decoding(model, enabled: bool | None = None, *, pack: bool = True) -> contextlib.AbstractContextManager:
    """Module points 4-7 together on a CPU model: :func:`decode_attention`, :func:`growing_cache` and, with
    ``pack``, :func:`packed_linears` and she.models.decode_step's ``lean_decoding`` (both act in bf16 autocast
    regions only and cost a pass over the weights at entry: open the block once around all of a call's batches;
    ``SHE_DECODE_STEP=transformers`` leaves the lean step out).
    ``enabled=None`` reads ``SHE_DECODING`` (``fast``, the default, or ``plain``); a model off the CPU gets none of
    them."""
    stack = contextlib.ExitStack()
    on_cpu = next(model.parameters()).device.type == "cpu"
    if resolve_fast_decoding(enabled) and on_cpu:
        stack.enter_context(decode_attention(model, True))
        stack.enter_context(growing_cache(True))
        if pack:
            stack.enter_context(packed_linears(model, True))
            stack.enter_context(lean_decoding(model))  # SHE_DECODE_STEP=transformers leaves it out
    return stack


__all__ = ["DECODE_ATTENTION", "DECODING_ENV", "ROLLOUT_PREFILLS", "ROLLOUT_SAMPLERS", "categorical_sample",
           "decode_attention", "decode_attention_forward", "fast_decoding", "fast_sampling", "generation_autocast",
           "grouped_decode_attention", "growing_cache", "identical_runs", "left_pad", "packed_linears", "resolve_fast_decoding",
           "shared_prefill", "shared_prefill_generate"]
