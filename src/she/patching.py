"""Replacing a library's attribute for the duration of a ``with`` block, safely nested and across threads.

Two speed-ups of this project swap one name of a library while a block runs: ``torch.multinomial`` while rollouts
are sampled (she.models.generation) and the name TRL's fused LM head reads to choose its positions
(she.training.lm_head). Both need the same care: blocks nest and may be open in several threads at once, so the
replacement is installed when the first block opens and the library's own attribute is back when the last one
closes (a count under a lock), also when a block exits with an exception.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_LOCK = threading.Lock()
_OPEN: dict[tuple[int, str], list[Any]] = {}  # (id(owner), name) -> [open blocks, the owner's own attribute]


@contextlib.contextmanager
def scoped_patch(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name`` is ``replacement`` while any block for ``(owner, name)`` is open, in any thread; the original
    is restored when the last one closes. A second block for the same attribute must pass the same replacement."""
    key = (id(owner), name)
    with _LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            entry = _OPEN[key] = [0, getattr(owner, name)]
            setattr(owner, name, replacement)
        elif getattr(owner, name) is not replacement:
            raise RuntimeError(f"{name} is already replaced by another function in an open block")
        entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                setattr(owner, name, entry[1])
                del _OPEN[key]


@contextlib.contextmanager
def thread_routed_patch(owner: Any, name: str, replacement: Any, local: threading.local) -> Iterator[None]:
    """:func:`scoped_patch` plus ``local.depth``, the number of blocks open in the calling thread: a replacement
    that reads it acts for the threads inside a block only and passes every other thread's calls to the original
    (she.models.generation's sampler and KV cache)."""
    with scoped_patch(owner, name, replacement):
        local.depth = getattr(local, "depth", 0) + 1
        try:
            yield
        finally:
            local.depth -= 1


__all__ = ["scoped_patch", "thread_routed_patch"]
