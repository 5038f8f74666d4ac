"""The lean decoding step with its elementwise parts compiled by TorchInductor, against the eager lean step
(docs/benchmarks.md, "A lean decoding step": tested and dropped).

Before the attention (normalisation, the fused query/key/value projection, the rotation) and after it (the output
projection, the residual, normalisation, the fused MLP) are two functions compiled with ``dynamic=False``, the packed
oneDNN linear wrapped as an opaque custom op (oneDNN's packed op itself does not lower). The attention, the cache and
the LM head stay eager. Both arms run over the same prompt's cache, alternating, ``--rounds`` rounds of 32 steps.

Usage:
  python scripts/bench_lean_compiled.py --model runs/compare-synthetic-noisy/sft/final --rows 8 --cache 80
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_LINEAR = torch.ops.mkldnn._linear_pointwise


@torch.library.custom_op("she_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _LINEAR(x, w, None, "none", [], "")


@packed_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.size(0))


def rms(h, w, eps: float):
    x = h.to(torch.float32)
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def pre(hidden, w1, eps: float, qkv_w, cos, sin, qk_width: int, d: int):
    qkv = packed_linear(rms(hidden, w1, eps).to(torch.bfloat16), qkv_w)
    b, half = hidden.size(0), d // 2
    qk = qkv[..., :qk_width].view(b, 1, -1, d).transpose(1, 2)
    qk = (qk * cos) + (torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin)
    return qk, qkv[..., qk_width:].view(b, 1, -1, d).transpose(1, 2)


def post(hidden, attn, o_w, w2, eps: float, gu_w, down_w):
    h = hidden + packed_linear(attn.reshape(hidden.size(0), 1, -1).to(torch.bfloat16), o_w)
    g, u = packed_linear(rms(h, w2, eps).to(torch.bfloat16), gu_w).chunk(2, dim=-1)
    return h + packed_linear((F.silu(g) * u).to(torch.bfloat16), down_w)


def compiled_step(dec, fns, input_ids, cache, attention_mask):
    from she.models.decode_step import key_bias, one_token_attention

    fpre, fpost = fns
    with torch.autocast("cpu", enabled=False):
        hidden = F.embedding(input_ids, dec.embed.weight)
        pos = (torch.arange(1) + cache.get_seq_length()).unsqueeze(0)
        bias = key_bias(None if bool(attention_mask.all()) else attention_mask.bool(), dec.kv_heads)
        cos, sin = dec.rotary(hidden, position_ids=pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        d = dec.head_dim
        qk_width, heads = dec.split[0] + dec.split[1], dec.split[0] // d
        for p in dec.layers:
            qk, v = fpre(hidden, p["norm1"].weight, p["norm1"].variance_epsilon, p["qkv"][0], cos, sin, qk_width, d)
            k, v = cache.update(qk[:, heads:], v, p["idx"])
            attn = one_token_attention(qk[:, :heads], k, v, bias, p["scaling"])
            hidden = fpost(hidden, attn, p["o"][0], p["norm2"].weight, p["norm2"].variance_epsilon,
                           p["gate_up"][0], p["down"][0])
        return dec._linear_bf16(dec._rms_norm(dec.final_norm, hidden), dec.head)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--cache", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from transformers import DynamicCache

    from she.models.decode_step import LeanDecoder
    from she.models.generation import fast_decoding, generation_autocast
    from she.models.registry import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(args.model)
    model.eval()
    ids = torch.randint(0, 1000, (args.rows, args.cache))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    nxt = torch.randint(0, 1000, (args.rows, 1))
    fns = (torch.compile(pre, dynamic=False), torch.compile(post, dynamic=False))

    def prefill():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        return cache

    out: dict = {"rows": args.rows, "cache": args.cache, "threads": torch.get_num_threads()}
    times: dict[str, list[float]] = {"eager_ms": [], "compiled_ms": []}
    with torch.no_grad(), generation_autocast(True, "cpu"), fast_decoding(model):
        dec = LeanDecoder(model)
        m = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        eager = dec.step(nxt, prefill(), m)
        t = time.perf_counter()
        comp = compiled_step(dec, fns, nxt, prefill(), m)
        out["compile_s"] = time.perf_counter() - t
        out["bit_for_bit"] = bool(torch.equal(eager, comp))
        out["max_abs_logit_diff"] = (eager.float() - comp.float()).abs().max().item()
        for _ in range(args.rounds):
            for arm in ("eager_ms", "compiled_ms"):
                cache, m = prefill(), mask
                t = time.perf_counter()
                for _ in range(32):
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    dec.step(nxt, cache, m) if arm == "eager_ms" else compiled_step(dec, fns, nxt, cache, m)
                times[arm].append(1e3 * (time.perf_counter() - t) / 32)
    print(json.dumps({**out, **times}, indent=2))


if __name__ == "__main__":
    main()
