r"""SFT token weights: how much each completion token counts in the reasoning SFT loss.

A reasoning trace is ~45 tokens and its verdict is one of them, so under the plain mean over completion tokens
the decision gets ~2 % of the loss and the deterministic step text the rest. The label-only fine-tune spends the
whole loss on that one token, and it needed three epochs to leave the prior (docs/results.md, session 8).
``verdict_weight`` w counts the verdict's first label token w times:

    loss = sum_t W_t * nll_t / N,    W_t = w on the verdict token, 1 on the other completion tokens,
                                     N = the number of completion tokens (TRL's normalisation, unchanged)

so w = 1 is TRL's loss exactly. The verdict token of a row is the *last* completion position whose label is
one of the label tokens: the label step ends the trace, and only that occurrence is the decision.

Shapes: ``labels [B, T]`` long, next-token targets already shifted, -100 where no loss is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def last_label_token_mask(labels: Tensor, label_ids: Sequence[int]) -> Tensor:
    """``[B, T]`` bool: per row, True at the last position whose target is one of ``label_ids`` (none if absent)."""
    hit = torch.isin(labels, torch.as_tensor(list(label_ids), dtype=labels.dtype, device=labels.device))
    pos = torch.arange(labels.size(1), device=labels.device).expand_as(labels)
    last = torch.where(hit, pos, -1).amax(dim=1, keepdim=True)  # -1: the row has no label token
    return (pos == last) & hit


def verdict_token_weights(labels: Tensor, label_ids: Sequence[int], weight: float) -> Tensor:
    """``[B, T]`` float: ``weight`` on each row's verdict token, 1 on other trained positions, 0 where -100."""
    if weight < 0:
        raise ValueError(f"verdict_weight must be >= 0, got {weight}")
    w = (labels != -100).to(torch.float32)
    return torch.where(last_label_token_mask(labels, label_ids), torch.full_like(w, float(weight)), w)
