"""TRL's fused LM head on a CPU: project only the positions that have a label.

TRL 1.16 patches every model it trains (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` the model returns per-token log-probabilities (and entropies) from a chunked projection
through the LM head, without materialising the ``[tokens, vocabulary]`` logits. Which positions it projects is
decided by one line, ``compact = _use_triton(hidden_states.device)``:

- on a GPU with Triton, only the positions whose label is not ``-100`` (the completion tokens);
- anywhere else, *every* position, prompt and padding included, so that the tile shapes never change (a
  recompilation concern on XLA/Neuron devices, none on a CPU).

On a CPU the second branch costs most of the head's work. SmolLM2's head is 576 x 49,152 (a fifth of the model's
FLOPs per position), its softmax statistics are folded in float32 over the whole vocabulary, and the backward
accumulates both gradient products in float32 (about a quarter of the bf16 matmul rate here). In an RL step of
this project the prompt is ~75 of ~125 tokens a row: all projected, then thrown away by the mask (an RL step measured
0.80x with this change; an SFT step, whose examples are mostly completion, no measurable change).

:func:`labelled_positions_only` makes TRL take its first branch on a CPU too, for the duration of a ``with``
block, by replacing the one name that line reads (``trl.trainer.utils._use_triton``) with a function that is
also true for CPU tensors. The kernel module keeps its own reference to the original, so the tiles are still
folded by torch's ops, not Triton's. The per-token outputs are the same: each position's projection and fold
do not depend on the other positions, and the unprojected positions were zeroed by the mask anyway
(tests/test_lm_head.py checks log-probabilities, entropies and gradients against the unpatched path; TRL's line
is pinned by tests/test_trl_contract.py). ``SHE_LM_HEAD_POSITIONS=all`` in the environment turns it off for every
job that does not say otherwise (benchmarks, or a device where it misbehaves); a compiled SFT
(``torch_compile: true``) keeps TRL's path, whose shapes do not depend on the labels. Measured: docs/benchmarks.md,
"The fused LM head on labelled positions only".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from she.patching import scoped_patch
from she.errors import env_switch

ENV = "SHE_LM_HEAD_POSITIONS"  # labelled (default) | all (TRL's CPU path)


def resolve_labelled_positions(enabled: bool | None = None) -> bool:
    """``enabled`` as given, or for ``None`` the environment's ``SHE_LM_HEAD_POSITIONS`` (``labelled``, the default,
    or ``all``). Trainers call it when they are built, so that a bad value fails before any model is loaded."""
    return env_switch(enabled, ENV, "labelled", "all")


def _compact_on_cpu(device: Any) -> bool:
    # TRL's own decision (the kernel module keeps the original name) or a CPU tensor
    from trl.kernels.chunked_logprob import _use_triton

    return getattr(device, "type", None) == "cpu" or bool(_use_triton(device))


@contextlib.contextmanager
def labelled_positions_only(enabled: bool | None = None) -> Iterator[None]:
    """Inside the block, TRL's fused LM head projects only the labelled positions on a CPU as it does on a GPU
    (see the module docstring); other devices keep TRL's own choice. ``enabled``: see
    :func:`resolve_labelled_positions`; a no-op when it resolves to false.

    Re-entrant and safe to open from several threads (she.patching: TRL's function is back when the last block
    closes). The patch is process-wide while any block is open (a thread outside a block then gets the labelled
    positions too), which changes no value, only the work done."""
    if not resolve_labelled_positions(enabled):
        yield
        return
    import trl.trainer.utils as trl_utils

    with scoped_patch(trl_utils, "_use_triton", _compact_on_cpu):
        yield


__all__ = ["ENV", "labelled_positions_only", "resolve_labelled_positions"]
