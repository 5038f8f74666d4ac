"""The operations a CPU decoding step is made of, timed alone (docs/benchmarks.md, "Packed bf16 weights, a growing KV
cache, one-token attention"): this machine's memory bandwidth, the 30 layers' linear matmuls of SmolLM2-135M at a few
rows -- through ``F.linear`` on bf16 weights (oneDNN reorders each weight at every call) and on weights packed once
(she.models.generation.packed_linears' ops) -- and one-token attention through torch's SDPA three ways; then a whole
one-token decoding step (docs/benchmarks.md, "A lean decoding step"): transformers' forward with fast_decoding's
points 4-6 against she.models.decode_step's LeanDecoder, on a randomly initialised model of SmolLM2-135M's shape over
a cache of ``--cache`` tokens, the two alternating, and one-token attention as the lean step computes it.

No model is loaded: random tensors at SmolLM2-135M's shapes (hidden 576, 9 query / 3 key-value heads of 64, MLP
1,536, 30 layers). Each figure is the mean of ``--reps`` timed calls after warm-up calls.

Usage:
  python scripts/bench_decode_ops.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from she.models.decode_step import LeanDecoder, key_bias, one_token_attention

# (out, in) of one layer: q, k, v, o, up, gate, down
LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))


def seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache", type=int, default=100, help="cached tokens of the decoding-step comparison")
    args = p.parse_args(argv)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    out: dict = {"machine": platform.platform(), "cpu": cpu or platform.processor(), "threads": torch.get_num_threads()}

    x = torch.empty(128 * 1024 * 1024, dtype=torch.bfloat16).normal_()  # 256 MB
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    out["copy_gb_per_s"] = 2 * nbytes / seconds(lambda: y.copy_(x), args.reps) / 1e9  # read + write
    out["sum_gb_per_s"] = nbytes / seconds(lambda: x.sum(), args.reps) / 1e9
    del x, y

    weights = [[torch.randn(o, i, dtype=torch.bfloat16) for o, i in LAYER] for _ in range(30)]
    wbytes = sum(w.numel() * w.element_size() for layer in weights for w in layer)
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w) for w in layer] for layer in weights]
    for rows in (8, 32):
        inputs = {n: torch.randn(rows, n, dtype=torch.bfloat16) for n in (576, 1536)}
        plain = seconds(lambda: [F.linear(inputs[w.size(1)], w) for layer in weights for w in layer], args.reps)
        pk = seconds(lambda: [torch.ops.mkldnn._linear_pointwise(inputs[w.size(1)], q, None, "none", [], "")
                              for layer, qs in zip(weights, packed) for w, q in zip(layer, qs)], args.reps)
        same = all(torch.equal(F.linear(inputs[w.size(1)], w),
                               torch.ops.mkldnn._linear_pointwise(inputs[w.size(1)], q, None, "none", [], ""))
                   for w, q in zip(weights[0], packed[0]))
        out[f"linears_{rows}_rows"] = {"plain_ms": plain * 1e3, "packed_ms": pk * 1e3, "speedup": plain / pk,
                                       "plain_weight_gb_per_s": wbytes / plain / 1e9,
                                       "packed_weight_gb_per_s": wbytes / pk / 1e9, "bit_for_bit": same}

    b, h, k, length, d = 32, 9, 3, 150, 64
    q = torch.randn(b, h, 1, d, dtype=torch.bfloat16)
    key, value = torch.randn(b, k, length, d, dtype=torch.bfloat16), torch.randn(b, k, length, d, dtype=torch.bfloat16)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[:, :, :, :5] = False
    stacked = q.reshape(b, k, h // k, d)
    out["attention_32_rows_150_keys_us_per_layer"] = {
        "grouped_query_kernel_no_mask": 1e6 * seconds(lambda: F.scaled_dot_product_attention(
            q, key, value, enable_gqa=True), args.reps * 20),
        "stacked_heads_with_mask": 1e6 * seconds(lambda: F.scaled_dot_product_attention(
            stacked, key, value, attn_mask=mask), args.reps * 20),
        "stacked_heads_no_mask": 1e6 * seconds(lambda: F.scaled_dot_product_attention(stacked, key, value),
                                               args.reps * 20),
    }
    out["attention_32_rows_150_keys_us_per_layer"]["lean_float32_scores"] = 1e6 * seconds(
        lambda: one_token_attention(q.float(), key.float(), value, key_bias(mask.view(b, length), k), 0.125),
        args.reps * 20)  # the lean step's keys are float32 already (the rotary embedding's output)
    for rows in (8, 32):
        out[f"decoding_step_{rows}_rows_ms"] = decoding_step_ms(rows, args.cache, args.reps)
    print(json.dumps(out, indent=2))


def decoding_step_ms(rows: int, cache_len: int, reps: int) -> dict:
    """Milliseconds of one one-token step over ``cache_len`` cached tokens (the first row left-padded by 5):
    transformers' forward inside fast_decoding's points 4-6, and the lean decoder's, alternating over ``reps``
    rounds of 16 steps each; and the largest logit difference of their first step (bf16 logits)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from she.models.generation import decode_attention, generation_autocast, growing_cache, packed_linears

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, cfg.vocab_size, (rows, cache_len))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    nxt = torch.randint(0, cfg.vocab_size, (rows, 1))
    times: dict[str, list[float]] = {"transformers": [], "lean": []}
    with torch.no_grad(), generation_autocast(True, "cpu"), decode_attention(model, True), growing_cache(True), \
            packed_linears(model, True):
        lean = LeanDecoder(model)

        def run(arm: str, steps: int) -> torch.Tensor:
            cache = DynamicCache(config=cfg)
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            m, first = mask, None
            t = time.perf_counter()
            for _ in range(steps):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                logits = (model(input_ids=nxt, attention_mask=m, cache=cache, use_cache=True).logits
                          if arm == "transformers" else lean.step(nxt, cache, m))
                first = logits if first is None else first
            times[arm].append((time.perf_counter() - t) / steps)
            return first

        diff = (run("transformers", 1).float() - run("lean", 1).float()).abs().max().item()  # warm-up
        times = {k: [] for k in times}
        for r in range(reps):
            for arm in (("transformers", "lean") if r % 2 == 0 else ("lean", "transformers")):
                run(arm, 16)
    mean = {k: 1e3 * sum(v) / len(v) for k, v in times.items()}
    return {**mean, "lean_over_transformers": mean["lean"] / mean["transformers"],
            "first_step_max_abs_logit_diff": diff}


if __name__ == "__main__":
    main()
