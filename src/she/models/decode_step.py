"""One-token decoding steps of a Llama-family model without transformers' module stack (she.models.generation,
module point 7).

At a few rows a CPU decoding step of SmolLM2-135M is bound by reading the weights and by the number of small
operations, not by arithmetic. Measured at 8 rows (session 48, docs/benchmarks.md "A lean decoding step"): of a
~40 ms step, ~5-8 ms went to transformers' Python around the operations (module calls, keyword plumbing, output
capture, the mask builder) and ~3-9 ms to the attention, where torch's SDPA kernel with one query position costs
~0.12 ms a layer at 8 rows, more at 32, and autocast casts the whole float32 key cache to bf16 at every step.

:class:`LeanDecoder` computes the step transformers' ``LlamaForCausalLM.forward`` computes for one new token a row
over a cached prompt, in the same order and dtypes (bf16 autocast over float32 weights, as every generation of this
project runs on a CPU), from weights packed once into oneDNN's blocked layout with the query/key/value and the
gate/up projections each fused into one matmul (the same products bit for bit: each output column is the same dot
product). Only the attention differs: :func:`one_token_attention` forms the scores in float32 from the float32 query
and keys that the rotary embedding already gives (autocast's SDPA rounds both to bf16 first), so it is closer to
exact arithmetic than the path it replaces, not bit for bit equal to it. With ``attention=`` set to transformers'
own SDPA path the step is transformers' bit for bit (a test checks it).

:func:`lean_decoding` puts the decoder in front of a model's ``forward`` for the duration of a ``with`` block; the
calls it takes are exactly one-token steps over a non-empty ``DynamicCache`` in a bf16 CPU autocast region without
gradients; every other call (the prompt, training, another cache, outputs asked for beyond the logits, a module
with a forward hook other than the LM head, whose hooks the step calls) goes to the model's own forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


DECODE_STEP_ENV = "SHE_DECODE_STEP"  # lean (default: LeanDecoder inside fast_decoding) | transformers


def resolve_lean_decoding(enabled: bool | None = None) -> bool:
    """``enabled`` as given, or for ``None`` the environment's ``SHE_DECODE_STEP`` (``lean``, the default, or
    ``transformers``: the model's own forward for every step)."""
    from she.errors import env_switch

    return env_switch(enabled, DECODE_STEP_ENV, "lean", "transformers")


def packed_linear_ops():
    """oneDNN's ``(reorder weight, linear on a packed weight)`` ops, or None on a torch build without them."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


# -- the attention of one query token ----------------------------------------------------------------------------

def key_bias(key_mask: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """The additive float32 bias [B * K, 1, L] (0 = attend, -inf = not) of a boolean ``key_mask`` [B, L] (True =
    attend) for :func:`one_token_attention` with K key/value heads; None for None."""
    if key_mask is None:
        return None
    b, length = key_mask.shape
    bias = torch.zeros(b, 1, length, dtype=torch.float32, device=key_mask.device)
    bias.masked_fill_(~key_mask.view(b, 1, length), float("-inf"))
    return bias.repeat_interleave(kv_heads, dim=0)


def one_token_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """Attention of one query token a row: ``query`` [B, H, 1, D], ``key`` [B, K, L, D], ``value`` [B, K, L, Dv],
    H a multiple of K (query head h reads key/value head h // (H / K), transformers' ``repeat_kv``), ``bias`` None
    or :func:`key_bias`'s [B * K, 1, L] (a row needs one key it may attend). The scores are float32 products of the
    query and keys taken as float32, softmax in float32; the probabilities are rounded to the values' dtype and
    multiplied with them (bf16 values: a bf16 product, as SDPA's kernel has it). Call it outside autocast, which
    would round the float32 products to bf16. Returns [B, 1, H, Dv] in the values' dtype."""
    b, h, q_len, d = query.shape
    k_heads, length, dv = key.size(1), key.size(2), value.size(-1)
    if q_len != 1 or h % k_heads:
        raise ValueError(f"one_token_attention takes one query token and H % K == 0, got query {tuple(query.shape)} "
                         f"and key {tuple(key.shape)}")
    q = query.reshape(b * k_heads, h // k_heads, d).float()  # the G query heads of a key/value head as G query rows
    k = key.reshape(b * k_heads, length, d).float().transpose(1, 2)
    scores = torch.bmm(q, k).mul_(scaling) if bias is None else torch.baddbmm(bias, q, k, alpha=scaling)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs, value.reshape(b * k_heads, length, dv))  # [B*K, G, Dv]
    return out.view(b, h, 1, dv).transpose(1, 2)


# -- the step -----------------------------------------------------------------------------------------------------

def unsupported_reason(model) -> str | None:
    """Why :class:`LeanDecoder` cannot take ``model`` (None when it can): a transformers ``LlamaForCausalLM`` on the
    CPU whose blocks are the stock modules (plain ``nn.Linear`` projections, no adapters), SiLU MLPs and SDPA-family
    attention, on a torch build with oneDNN's linear ops."""
    from transformers.models.llama import modeling_llama as llama

    if type(model) is not llama.LlamaForCausalLM:
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    if packed_linear_ops() is None:
        return "this torch build has no oneDNN linear ops"
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if len(model.model.layers) != cfg.num_hidden_layers:
        return "the model runs another number of layers than it holds"
    for i, layer in enumerate(model.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        kinds = [type(layer), type(a), type(mlp), type(layer.input_layernorm), type(layer.post_attention_layernorm)]
        if kinds != [llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm,
                     llama.LlamaRMSNorm]:
            return f"layer {i} is not the stock Llama block"
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            replaced = vars(lin).get("forward")  # packed_linears' forward computes the layer's own products
            if (type(lin) is not torch.nn.Linear or lin.weight.device.type != "cpu"
                    or (replaced is not None and not getattr(replaced, "_she_packed", False))):
                return f"layer {i} has a projection that is not a plain CPU nn.Linear"
    if type(model.lm_head) is not torch.nn.Linear or type(model.model.norm) is not llama.LlamaRMSNorm:
        return "the LM head or the final norm is not the stock module"
    return None


class LeanDecoder:
    """The one-token step of a supported model (:func:`unsupported_reason`) from bf16 weights packed once at
    construction. The weights must not change while it is used (generation: they do not). ``attention`` is
    :func:`one_token_attention` (the default) or a function of (query [B, H, 1, D], key [B, K, L, D], value
    [B, K, L, Dv], key_mask [B, L] bool or None, scaling) returning [B, 1, H, Dv]."""

    def __init__(self, model, attention: Callable | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"LeanDecoder: {reason}")
        reorder, self._linear = packed_linear_ops()
        self.attention = attention or one_token_attention
        cfg, base = model.config, model.model
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.split = [cfg.num_attention_heads * self.head_dim, cfg.num_key_value_heads * self.head_dim,
                      cfg.num_key_value_heads * self.head_dim]
        self.kv_heads = cfg.num_key_value_heads
        self.embed, self.rotary, self.final_norm = base.embed_tokens, base.rotary_emb, base.norm

        def pack(*linears):  # one packed bf16 weight (and bias) for the linears' outputs side by side
            own = vars(linears[0]).get("forward")
            if len(linears) == 1 and hasattr(own, "_she_packed_weight"):  # packed_linears packed it already
                return own._she_packed_weight, own._she_packed_bias
            with torch.no_grad():  # cast while copying into one bf16 buffer: no float32 concatenation
                weight = torch.empty(sum(m.out_features for m in linears), linears[0].in_features,
                                     dtype=torch.bfloat16)
                bias = None if all(m.bias is None for m in linears) else torch.zeros(weight.size(0),
                                                                                    dtype=torch.bfloat16)
                row = 0
                for m in linears:
                    weight[row:row + m.out_features].copy_(m.weight.detach())
                    if m.bias is not None:
                        bias[row:row + m.out_features].copy_(m.bias.detach())
                    row += m.out_features
            return reorder(weight), bias

        self.layers = []
        for layer in base.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm1": layer.input_layernorm, "norm2": layer.post_attention_layernorm, "scaling": a.scaling,
                "idx": a.layer_idx, "qkv": pack(a.q_proj, a.k_proj, a.v_proj), "o": pack(a.o_proj),
                "gate_up": pack(mlp.gate_proj, mlp.up_proj), "down": pack(mlp.down_proj),
            })
        self.head, self.lm_head = pack(model.lm_head), model.lm_head
        self._modules = [m for m in model.modules() if m is not model.lm_head]

    def hooked(self) -> bool:
        """Whether a forward hook (global, or on a module the step does not call) would miss the step: then the
        model's own forward must run it. Hooks on the LM head are called (the step calls the head module then)."""
        from torch.nn.modules import module as nn_module

        return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def _linear_bf16(self, x: torch.Tensor, packed: tuple) -> torch.Tensor:
        return self._linear(x.to(torch.bfloat16), packed[0], packed[1], "none", [], "")

    @staticmethod
    def _rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm.forward, op for op
        x = hidden.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + norm.variance_epsilon)
        return norm.weight * x.to(hidden.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # apply_rotary_pos_emb
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def step(self, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 1, V] (bf16) of one new token a row, ``input_ids`` [B, 1], over ``cache`` (updated in place,
        as transformers' forward updates it), ``attention_mask`` [B, cached + 1] (1 = attend) or None, positions as
        transformers gives them when None (the cache's length). Call it without gradients. It runs outside autocast:
        every cast is explicit, the ones transformers' forward makes under bf16 autocast (the linear layers' inputs)
        and no others (autocast would round the attention's float32 products to bf16)."""
        with torch.autocast("cpu", enabled=False):
            return self._step(input_ids, cache, attention_mask, position_ids)

    def _step(self, input_ids, cache, attention_mask, position_ids) -> torch.Tensor:
        b = input_ids.size(0)
        hidden = F.embedding(input_ids, self.embed.weight, self.embed.padding_idx)
        if position_ids is None:
            position_ids = (torch.arange(1, device=hidden.device) + cache.get_seq_length()).unsqueeze(0)
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        bias = key_bias(key_mask, self.kv_heads) if self.attention is one_token_attention else key_mask
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        d, qk_width, heads = self.head_dim, self.split[0] + self.split[1], self.split[0] // self.head_dim
        for p in self.layers:
            residual = hidden
            qkv = self._linear_bf16(self._rms_norm(p["norm1"], hidden), p["qkv"])
            # the query's and key's heads rotated in one pass (elementwise: the values of two passes)
            qk = self._rotate(qkv[..., :qk_width].view(b, 1, -1, d).transpose(1, 2), cos, sin)
            v = qkv[..., qk_width:].view(b, 1, -1, d).transpose(1, 2)
            k, v = cache.update(qk[:, heads:], v, p["idx"])
            attn = self.attention(qk[:, :heads], k, v, bias, p["scaling"])
            hidden = residual + self._linear_bf16(attn.reshape(b, 1, -1), p["o"])
            residual = hidden
            gate, up = self._linear_bf16(self._rms_norm(p["norm2"], hidden), p["gate_up"]).chunk(2, dim=-1)
            hidden = residual + self._linear_bf16(F.silu(gate) * up, p["down"])
        hidden = self._rms_norm(self.final_norm, hidden)
        if self.lm_head._forward_hooks or self.lm_head._forward_pre_hooks:  # e.g. she.models.heads' capture
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the same products (packed or autocast's)
                return self.lm_head(hidden)
        return self._linear_bf16(hidden, self.head)


# -- in front of a model's forward ----------------------------------------------------------------------------------

_PLAIN_KWARGS = {"use_cache": (True, None), "return_dict": (True, None), "output_attentions": (False, None),
                 "output_hidden_states": (False, None), "logits_to_keep": (0, 1), "labels": (None,),
                 "inputs_embeds": (None,)}  # keyword values a lean step computes as the model would


def _one_of(value, allowed: tuple) -> bool:
    return any(value is a or (type(value) is int and type(a) is int and value == a) for a in allowed)


def _lean_call(decoder: LeanDecoder, model, args: tuple, kwargs: dict):
    """The step's logits when this call is one the decoder computes as the model's forward would, else None."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if args or torch.is_grad_enabled() or not torch.is_autocast_enabled("cpu") or decoder.hooked():
        return None
    if torch.get_autocast_dtype("cpu") != torch.bfloat16 or (model.training and model.config.attention_dropout):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    input_ids, mask, positions = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("position_ids")
    extra = set(kwargs) - {"cache", "past_key_values", "input_ids", "attention_mask", "position_ids"}
    if any(k not in _PLAIN_KWARGS or not _one_of(kwargs[k], _PLAIN_KWARGS[k]) for k in extra):
        return None
    if (type(cache) is not DynamicCache or not cache.layers or any(type(x) is not DynamicLayer for x in cache.layers)
            or not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.size(1) != 1
            or input_ids.device.type != "cpu"):
        return None
    past = cache.get_seq_length()
    if past == 0 or len(cache.layers) != len(decoder.layers):
        return None
    if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != (input_ids.size(0), past + 1)):
        return None
    if positions is not None and (not torch.is_tensor(positions) or positions.shape[-1] != 1):
        return None
    return decoder.step(input_ids, cache, mask, positions), cache


@contextlib.contextmanager
def lean_decoding(model, enabled: bool | None = None, attention: Callable | None = None) -> Iterator[None]:
    """Inside the block ``model``'s forward hands one-token decoding steps to a :class:`LeanDecoder` (built, its
    weights packed, at entry) and every other call to the forward it had. A no-op for ``enabled=False`` (for
    ``None``: ``SHE_DECODE_STEP=transformers``), models the decoder does not take (:func:`unsupported_reason`) and
    inside an open block on the same model (the outermost block keeps the decoder). The model's forward is back as
    it was on exit, whether it was the class's or an instance attribute (accelerate's autocast wrapper)."""
    if not resolve_lean_decoding(enabled) or unsupported_reason(model) is not None:
        yield
        return
    own = vars(model).get("forward")
    if own is not None and getattr(own, "_she_lean", False):
        yield
        return
    decoder = LeanDecoder(model, attention)
    forward = model.forward
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @functools.wraps(forward)  # generate reads the forward's signature (which inputs it prepares, e.g. positions)
    def lean_forward(*args, **kwargs):
        out = _lean_call(decoder, model, args, kwargs)
        if out is None:
            return forward(*args, **kwargs)
        logits, cache = out
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    lean_forward._she_lean = True
    model.forward = lean_forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


__all__ = ["DECODE_STEP_ENV", "LeanDecoder", "key_bias", "lean_decoding", "one_token_attention", "packed_linear_ops",
           "resolve_lean_decoding", "unsupported_reason"]
