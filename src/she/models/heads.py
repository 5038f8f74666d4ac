"""The output head read where it decides: label-token logits in float32, at a few positions.

Why float32: under bf16 autocast the output head's logits carry 8 bits of mantissa, so at SmolLM2's logit
magnitudes (8-16) two label logits differ in steps of 1/16 nat. A verdict distribution that is soft (the
evidence schema's: max probability ~0.44 on Home Depot) then collapses onto a few dozen values, one pair in
ten has two labels exactly tied, and the per-class offsets of calibrated verdicts (she.evaluation.calibration)
move whole blocks of pairs at once (measured: docs/results.md, "Session 7", "Label logits in float32"). The head is one matmul;
re-reading it in float32 at the positions where a label is read costs ``N x vocab x hidden`` multiply-adds --
nothing next to the forward pass -- while the decoder itself keeps running in bf16.

``plain_head`` is the head when a model's logits are exactly ``head(hidden)``: no soft-capping or logit scaling
(their models fall back to the logits they return).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def plain_head(model: Any) -> torch.nn.Module | None:
    """The output head of ``model`` when its logits are exactly ``head(hidden)``, else None."""
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, torch.nn.Linear) else None


def head_logits_fp32(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits ``head(hidden)`` [N, V] for hidden states [N, H], computed outside any autocast."""
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


@contextlib.contextmanager
def capture_head_inputs(model: Any) -> Iterator[list[torch.Tensor] | None]:
    """Collect, at every call of ``model``'s plain output head, the last position's hidden state [B, H].

    Inside ``model.generate`` the head runs once per generated token (the prefill's last position, then each
    decoding step), so entry ``k`` is the state that produced ``scores[k]``. Yields None for a model without a
    plain head (:func:`plain_head`)."""
    head = plain_head(model)
    if head is None:
        yield None
        return
    store: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: store.append(args[0][:, -1, :].detach().clone()))
    try:
        yield store
    finally:
        handle.remove()


def selected_logits(model: Any, input_ids, attention_mask, rows, cols, *, head_fp32: bool = False,
                    position_ids=None):
    """Full-vocabulary logits [N, V] at the (rows, cols) positions, as float32.

    Runs the decoder once and applies the output head only at the N selected positions (for SmolLM2 the
    49k-word head is ~20 % of a forward's cost at every position). ``head_fp32``: that head in float32 even
    under bf16 autocast (for reading probabilities; training keeps the ambient precision). Models whose logits
    are more than ``head(hidden)`` take the full forward. ``attention_mask`` may be a custom 4-D mask with its
    ``position_ids`` (she.models.prefix_tree).
    """
    head = plain_head(model)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if head is not None and getattr(model, "base_model", None) is not None and model.base_model is not model:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        picked = hidden[rows, cols]
        return head_logits_fp32(head, picked) if head_fp32 else head(picked).float()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    return logits[rows, cols].float()


__all__ = ["capture_head_inputs", "head_logits_fp32", "plain_head", "selected_logits"]
