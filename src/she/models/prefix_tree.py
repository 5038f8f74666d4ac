"""Score rows that share a prefix with one forward pass over the prefix (a prefix tree packed into one sequence).

The G rollouts of a prompt share its prompt (and, with computed evidence, the forced stem); the enumerated leaves of
``rollout_evidence: enumerated`` share everything but their last ~8 tokens. Scored as TRL scores them, each row is
a full sequence, so a group pays for its prompt G times. Packed here, a group is one sequence

    A = s[0 : P-1]  |  seg_1 = s_1[P-1 :]  |  seg_2 = s_2[P-1 :]  |  ...

where P is the length of the rows' longest common prefix (at most the shortest row), A is attended by every
segment, and each segment attends to A and causally to itself only (a 4-D mask). Each segment starts again with the
prefix's last token s[P-1] at position P-1, so that the hidden state that predicts a segment's first own token is
computed inside that segment: every scored token is then predicted by exactly one position of the packed row,
whose (pre-shifted) label is that token. Position ids continue the prefix's, so each segment sees the positions it
has in its own row (RoPE depends on position differences only, so the left padding of the unpacked rows changes
nothing either).

Everything here is the layout (a pure function of the ids and masks): :func:`pack_shared_prefixes` builds the
packed ids, position ids, 4-D boolean mask (True = attend), pre-shifted labels, and for every scored position of
the original rows the packed (row, column) whose output it is; :func:`unpack` gathers a per-position output back
into the original rows' ``[B, logits_to_keep]`` frame (zeros where nothing is scored, as TRL's head writes).
Tests: tests/test_prefix_tree.py (log-probabilities, entropies and gradients against the unpacked forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE = -100
LOGP_PREFIXES = ("per_row", "shared")  # the trainers' switch: TRL's rows, or this packing


@dataclass(frozen=True)
class PrefixPacking:
    input_ids: Tensor  # [N, Lp] packed rows (one per group of rows with the same prompt), right-padded
    position_ids: Tensor  # [N, Lp]
    attention: Tensor  # [N, 1, Lp, Lp] bool, True = attend (padding positions attend to themselves only)
    shift_labels: Tensor  # [N, Lp] the token each position predicts, IGNORE where nothing is scored
    row: Tensor  # [B, K] the packed row of each original scored position (K = logits_to_keep)
    col: Tensor  # [B, K] its packed column; -1 where the original position is not scored
    tokens_before: int  # sum of the original rows' lengths (their non-padding tokens)
    tokens_after: int  # sum of the packed rows' lengths


def _longest_common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    first = rows[0]
    for k in range(n):
        if any(r[k] != first[k] for r in rows[1:]):
            return k
    return n


@dataclass(frozen=True)
class PackedGroups:
    input_ids: Tensor  # [N, Lp] one packed row a group, right-padded
    position_ids: Tensor  # [N, Lp]
    attention: Tensor  # [N, 1, Lp, Lp] bool, True = attend (padding positions attend to themselves only)
    shift_labels: Tensor  # [N, Lp] the token each position predicts, IGNORE where nothing is scored
    where: list[dict[int, tuple[int, int]]]  # per original row: scored token index t -> the (packed row, column)
    # whose output predicts it
    tokens_before: int  # sum of the rows' lengths
    tokens_after: int  # sum of the packed rows' lengths


def pack_groups(seqs: list[list[int]], groups: list[list[int]], scored: list[list[int]],
                pad_token_id: int = 0) -> PackedGroups:
    """Pack each group of rows (indices into ``seqs``, every row in exactly one group) into one sequence over the
    rows' longest common prefix (module docstring). ``scored[i]``: the token indices t >= 1 of row i whose
    prediction (by token t - 1) is wanted."""
    if sorted(i for g in groups for i in g) != list(range(len(seqs))):
        raise ValueError("every row must be in exactly one group")
    if any(not s for s in seqs):
        raise ValueError("rows must not be empty")
    packed_ids, packed_pos, labels, layouts = [], [], [], []
    where: list[dict[int, tuple[int, int]]] = [{} for _ in seqs]
    for n, members in enumerate(groups):
        rows = [seqs[i] for i in members]
        p = _longest_common_prefix(rows)  # >= 1 unless the rows differ at their first token
        if p == 0:
            raise ValueError(f"group {n}: its rows share no first token")
        ids, pos, lab, offsets = list(rows[0][:p - 1]), list(range(p - 1)), [IGNORE] * (p - 1), []
        for i, s in zip(members, rows):
            offset = len(ids)  # the packed column of s[p-1] in this row's segment
            offsets.append(offset)
            ids.extend(s[p - 1:])
            pos.extend(range(p - 1, len(s)))
            lab.extend([IGNORE] * (len(s) - p + 1))
            for t in scored[i]:
                if not 1 <= t < len(s):
                    raise ValueError(f"row {i}: scored token {t} is outside [1, {len(s)})")
                src = t - 1 if t - 1 < p - 1 else offset + (t - p)  # the position holding token t - 1
                lab[src] = s[t]
                where[i][t] = (n, src)
        packed_ids.append(ids)
        packed_pos.append(pos)
        labels.append(lab)
        layouts.append((p - 1, offsets, [len(s) - p + 1 for s in rows]))

    width = max(len(x) for x in packed_ids)
    out_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    out_pos = torch.zeros((len(groups), width), dtype=torch.long)
    out_lab = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    attend = torch.zeros((len(groups), 1, width, width), dtype=torch.bool)
    for n, (ids, pos, lab, (shared, offsets, seg_lengths)) in enumerate(zip(packed_ids, packed_pos, labels, layouts)):
        out_ids[n, :len(ids)] = torch.tensor(ids)
        out_pos[n, :len(pos)] = torch.tensor(pos)
        out_lab[n, :len(lab)] = torch.tensor(lab)
        attend[n, 0, :shared, :shared] = torch.ones(shared, shared, dtype=torch.bool).tril()
        for offset, m in zip(offsets, seg_lengths):
            attend[n, 0, offset:offset + m, :shared] = True
            attend[n, 0, offset:offset + m, offset:offset + m] = torch.ones(m, m, dtype=torch.bool).tril()
        idle = torch.arange(len(ids), width)
        attend[n, 0, idle, idle] = True  # padding attends to itself: no empty softmax row
    return PackedGroups(out_ids, out_pos, attend, out_lab, where, tokens_before=sum(len(s) for s in seqs),
                        tokens_after=sum(len(x) for x in packed_ids))


def pack_shared_prefixes(input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int,
                         pad_token_id: int = 0) -> PrefixPacking:
    """The packed layout of ``input_ids`` [B, L] (left-padded prompts, then right-padded completions, as TRL
    builds them) whose last ``logits_to_keep`` columns are scored where ``attention_mask`` is 1. Rows whose first
    ``L - logits_to_keep`` columns (the prompt, with its padding) are equal form one group."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must "
                         "be the same [B, L]")
    b, length = input_ids.shape
    if not 0 < logits_to_keep < length:
        raise ValueError(f"logits_to_keep must be in (0, {length}), got {logits_to_keep}")
    start = length - logits_to_keep
    valid = attention_mask.bool()
    seqs, first_col = [], []
    for i in range(b):
        cols = valid[i].nonzero().flatten().tolist()
        if not cols or cols[-1] - cols[0] + 1 != len(cols):
            raise ValueError(f"row {i}: its attended tokens must be one contiguous run (left padding, then the "
                             "sequence, then right padding)")
        if cols[0] >= start:
            raise ValueError(f"row {i} has no prompt token before the scored columns")
        seqs.append(input_ids[i, cols[0]:cols[-1] + 1].tolist())
        first_col.append(cols[0])
    groups: dict[tuple, list[int]] = {}
    for i in range(b):
        groups.setdefault((tuple(input_ids[i, :start].tolist()), tuple(valid[i, :start].tolist())), []).append(i)
    scored = [list(range(start - c, len(s))) for s, c in zip(seqs, first_col)]  # the tokens in the last columns
    g = pack_groups(seqs, list(groups.values()), scored, pad_token_id)
    row = torch.zeros(b, logits_to_keep, dtype=torch.long)
    col = torch.full((b, logits_to_keep), -1, dtype=torch.long)
    for i in range(b):
        for t, (n, src) in g.where[i].items():
            row[i, first_col[i] + t - start] = n
            col[i, first_col[i] + t - start] = src
    return PrefixPacking(g.input_ids.to(input_ids.dtype), g.position_ids, g.attention, g.shift_labels, row, col,
                         tokens_before=g.tokens_before, tokens_after=g.tokens_after)


def model_attention(model: Any, attention: Tensor) -> Tensor:
    """The packed boolean mask as ``model`` takes a custom 4-D mask: as is (sdpa, True = attend), or additive
    (0 / the float32 minimum) for eager attention, which adds the mask to its scores."""
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(attention.shape, device=attention.device).masked_fill(~attention,
                                                                                 torch.finfo(torch.float32).min)
    return attention


def unpack(values: Tensor, packing: PrefixPacking) -> Tensor:
    """``values`` [N, Lp] (one per packed position, aligned with ``shift_labels``) in the original rows' frame
    [B, logits_to_keep], zeros where nothing is scored. Differentiable: a shared prefix position used by several
    rows passes each of their gradients back."""
    picked = values[packing.row, packing.col.clamp(min=0)]
    return torch.where(packing.col >= 0, picked, torch.zeros((), dtype=values.dtype, device=values.device))


__all__ = ["IGNORE", "LOGP_PREFIXES", "PackedGroups", "PrefixPacking", "model_attention", "pack_groups",
           "pack_shared_prefixes", "unpack"]
