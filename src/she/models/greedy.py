"""Greedy decoding of a batch of judge prompts, with two savings ``model.generate`` does not make.

Where a reasoning judge's evaluation spends its time (``she eval``, the service's full mode, the comparison's
validation and test pairs): measured on the synthetic SFT judge at 32 pairs a batch (scripts/bench_greedy.py,
docs/benchmarks.md "Greedy judgements"), ~40 % in the prompts' forward pass and the rest in ~64 one-token steps,
which run for every row until the batch's longest judgement ends. Two of those costs buy nothing:

1. **Every prompt repeats the same opening.** A judge's prompts share their chat template's system turn and the
   instruction (28 of SmolLM2's ~93 tokens a synthetic prompt). :func:`greedy_generate` runs the batch's longest
   common prefix once, for one row, copies its KV cache to every row, and runs only the rows' own remainders --
   laid out ``prefix | padding | remainder`` with positions counted over the real tokens (mask cumsum - 1, as
   ``generate`` counts them for left padding), so each row sees the positions and keys it has alone.
2. **Finished rows keep decoding.** ``generate`` feeds a row that has ended padding until the batch's last row
   ends; a step's cost grows with its rows (a Llama step of SmolLM2's shape: 30.8 ms at 8 rows, 60.3 ms at 32,
   scripts/bench_decode_ops.py). Rows that have ended leave the batch (their cache rows dropped) once they are
   ``retire_fraction`` of it: each retirement copies the cache, so it is made for several rows at once.

The tokens are greedy (the arg max of each step's logits, as ``generate`` without logits processors takes it), the
same as ``model.generate``'s up to the rounding of a batch of another shape (tests compare tokens and logits).
Models whose generation config asks for logits processors, that have no separate decoder module to run the prefix
through without the output head, or whose KV cache is not transformers' plain one throughout (sliding windows,
recurrent or convolutional layers) take ``model.generate``, as ``engine="generate"`` and ``SHE_GREEDY=generate`` do;
it returns the same structure.

The caller opens the precision and decoding contexts (bf16 autocast, she.models.generation.fast_decoding): the
one-token steps here are ordinary forward calls, which fast_decoding's lean step takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_ENV = "SHE_GREEDY"  # she (default: this module's loop) | generate (model.generate)
GREEDY_ENGINES = ("she", "generate")

# generation-config fields whose non-default values make ``generate`` change greedy logits or stop early
_PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                     "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty", "guidance_scale",
                     "watermarking_config", "stop_strings", "max_time", "num_beams", "num_return_sequences")


@dataclass
class GreedyOutput:
    tokens: list[list[int]]  # each row's new tokens, its end-of-sequence token included when it made one
    # for each generated position k (head call k), the rows of the batch that step ran, by their index in the input
    step_rows: list[torch.Tensor]
    scores: list[torch.Tensor] | None = None  # float32 logits [len(step_rows[k]), V] of step k (``output_scores``)
    prefix_tokens: int = 0  # the shared prefix computed once (0: none)
    engine: str = "she"

    def batch_row(self, k: int, row: int) -> int:
        """The position of input row ``row`` in step ``k``'s batch (its index into that step's scores or head
        inputs)."""
        return self.step_rows[k].tolist().index(row)


def common_prefix_length(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of ``rows`` (0 for no rows)."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for k in range(n):
        t = first[k]
        if any(r[k] != t for r in rows):
            return k
    return n


def resolve_engine(engine: str | None = None) -> str:
    """``engine`` as given, or for ``None`` the environment's ``SHE_GREEDY`` (``she``, the default, or
    ``generate``)."""
    from she.errors import env_switch

    if engine is not None:
        if engine not in GREEDY_ENGINES:
            raise ValueError(f"greedy engine must be one of {GREEDY_ENGINES}, got {engine!r}")
        return engine
    return "she" if env_switch(None, GREEDY_ENV, "she", "generate") else "generate"


def loop_unsupported(model) -> str | None:
    """Why this module's loop cannot stand in for ``model.generate`` on ``model`` (None: it can)."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    # the prefix runs through ``base_model`` so that the head (and hooks on it) sees one call a generated token; a
    # wrapper's base (peft's) holds the whole model, head included
    if base is None or base is model or head is None or any(m is head for m in base.modules()):
        return "no decoder module apart from the output head"
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    # rows are dropped from and padded in the middle of a plain KV cache; a sliding window counts cache slots (the
    # padding would take part of a row's window), and recurrent or convolutional states would carry the padding
    layers = DynamicCache(config=model.config).layers
    kinds = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if kinds:
        return f"its KV cache has {', '.join(sorted(kinds))} layers"
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        from transformers import GenerationConfig

        default = GenerationConfig()
        for name in _PROCESSOR_FIELDS:
            if getattr(gc, name, None) != getattr(default, name, None):
                return f"its generation config sets {name}={getattr(gc, name)!r}"
    return None


def _generate_engine(model, prompts, max_new_tokens, eos_token_id, pad_token_id, output_scores) -> GreedyOutput:
    from she.models.generation import left_pad

    ids, mask = left_pad(prompts, pad_token_id, next(model.parameters()).device)
    width = ids.size(1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         output_scores=output_scores, return_dict_in_generate=True, pad_token_id=pad_token_id,
                         eos_token_id=eos_token_id)
    gen = out.sequences[:, width:].tolist()
    tokens = []
    for row in gen:  # up to and including the end of sequence, as the loop keeps them
        tokens.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    rows = torch.arange(len(prompts))
    return GreedyOutput(tokens, [rows] * len(gen[0]) if gen else [],
                        [s.float() for s in out.scores] if output_scores else None, engine="generate")


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                    share_prefix: bool = True, retire_fraction: float | None = 0.25, output_scores: bool = False,
                    engine: str | None = None) -> GreedyOutput:
    """Greedy continuations of ``prompts`` (token ids, unpadded, each non-empty), up to ``max_new_tokens`` each or
    the end of sequence. ``share_prefix``: the rows' common prefix computed once (module point 1); it leaves at
    least one token of each row to the batch's forward pass. ``retire_fraction``: rows that ended leave the batch once
    they make up this share of it (module point 2; 0: at once, None: never). ``output_scores``: each step's float32
    logits. ``engine``: ``she`` (this loop), ``generate`` (``model.generate``), None: ``SHE_GREEDY``; the loop falls
    back to ``generate`` for models :func:`loop_unsupported` names. An output head's forward hooks see one call per
    generated position, the rows of ``step_rows[k]``."""
    from transformers import DynamicCache

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate takes one or more non-empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if resolve_engine(engine) == "generate" or loop_unsupported(model) is not None:
        return _generate_engine(model, prompts, max_new_tokens, eos_token_id, pad_token_id, output_scores)
    device = next(model.parameters()).device
    b = len(prompts)
    cache = DynamicCache(config=model.config)
    p = common_prefix_length(prompts) if share_prefix and b > 1 else 0
    p = min(p, min(len(r) for r in prompts) - 1)  # every row keeps a token for the batch's pass
    if p > 0:  # the shared prefix, one row, through the decoder only (no output head call)
        model.base_model(input_ids=torch.tensor([prompts[0][:p]], device=device), cache=cache, use_cache=True)
        if cache.get_seq_length() != p:  # a decoder that does not take ``cache=``: generate's own path
            return _generate_engine(model, prompts, max_new_tokens, eos_token_id, pad_token_id, output_scores)
        cache.batch_select_indices(torch.zeros(b, dtype=torch.long, device=device))
    width = max(len(r) for r in prompts) - p
    rest = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(b, p + width, dtype=torch.long, device=device)
    mask[:, :p] = 1
    for i, r in enumerate(prompts):
        n = len(r) - p
        rest[i, width - n:] = torch.tensor(r[p:], device=device)
        mask[i, p + width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=rest, attention_mask=mask, position_ids=positions[:, p:], cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    nxt_pos = positions[:, -1] + 1  # the position of each row's next input token
    alive = torch.arange(b, device=device)  # input row of each batch row
    ended = torch.zeros(b, dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in range(b)]
    step_rows: list[torch.Tensor] = []
    scores: list[torch.Tensor] | None = [] if output_scores else None
    for k in range(max_new_tokens):
        step_rows.append(alive.cpu())
        step = logits.float()  # as generate reads them; torch's arg max is also ~3x faster in float32 than bf16
        if scores is not None:
            scores.append(step)
        nxt = step.argmax(-1)
        live = ~ended
        for row, tok in zip(alive[live].tolist(), nxt[live].tolist()):
            tokens[row].append(tok)
        ended = ended | (nxt == eos_token_id)
        if bool(ended.all()) or k == max_new_tokens - 1:
            break
        nxt = nxt.masked_fill(ended, pad_token_id)
        if retire_fraction is not None and bool(ended.any()) and int(ended.sum()) >= retire_fraction * ended.numel():
            keep = (~ended).nonzero().flatten()
            cache.batch_select_indices(keep)
            alive, mask, nxt, nxt_pos, ended = alive[keep], mask[keep], nxt[keep], nxt_pos[keep], ended[keep]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos[:, None], cache=cache,
                       use_cache=True).logits[:, -1]
        nxt_pos = nxt_pos + 1
    return GreedyOutput(tokens, step_rows, scores, prefix_tokens=p)


__all__ = ["GREEDY_ENGINES", "GREEDY_ENV", "GreedyOutput", "common_prefix_length", "greedy_generate", "loop_unsupported",
           "resolve_engine"]
