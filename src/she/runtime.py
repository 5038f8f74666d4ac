"""Process-level settings that make CPU training faster: the C allocator's thresholds.

PyTorch on CPU frees and re-allocates the same large buffers (activations, logits, gradients) every step.
glibc's malloc hands big blocks back to the OS (``munmap``, heap trimming) and the next step faults every
page in again: measured on the coverage SFT, a quarter of all CPU time was kernel time, 231 million minor
page faults in 21 minutes (docs/benchmarks.md, "Allocator"). Keeping freed memory in the process removes it:
an RL step of SmolLM2-135M went from 10.2 s to 7.1 s on the same rollouts (same losses, bit for bit).

``tune_allocator()`` sets that with ``mallopt`` at run time (no re-exec, no preloaded library): no ``mmap``
for large blocks (they come from the heap and are reused) and no trimming of the heap's top. The cost is
that a process keeps its peak memory until it exits, which is what a training job does anyway -- but a
process that runs *many* jobs of different shapes one after another fragments that heap: a `she compare` run
(SFT eval, GRPO, eval, calibration, then SRPO at 32 rollouts a step) grew to 24 GB and was killed by the OOM
killer. So does one RL job on its own: a 60-step, 32-rollout RL row (rollouts of a different length every step,
so differently sized buffers) reached 24.4 GB resident and was OOM-killed 54 steps in (docs/benchmarks.md,
session 8). So the CLI tunes the other single-job commands (``she train sft|prm|rm|dpo|cross-encoder``,
``eval``, ``predict``, ``calibrate``, ``serve``; :func:`allocator_default`) and leaves ``she compare``,
``she demo`` and RL training (``she train srpo|grpo``) on glibc's defaults. ``SHE_MALLOC=tuned|system``
overrides either; on a C library other than glibc (macOS, musl) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from she.errors import UserError

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_INT_MAX = 2**31 - 1
_state: dict[str, object] = {}


def allocator_default(cmd: str | None, train_cmd: str | None = None) -> str:
    """The allocator mode a CLI command gets when ``SHE_MALLOC`` is not set: ``system`` for the multi-job
    commands and for RL training (their heaps fragment without trimming), ``tuned`` for everything else."""
    if cmd in ("compare", "demo") or (cmd == "train" and train_cmd in ("srpo", "grpo")):
        return "system"
    return "tuned"


def tune_allocator(default: str = "tuned") -> bool:
    """Keep freed memory in the process (glibc only); return whether the settings were applied.

    ``SHE_MALLOC`` (``tuned`` | ``system``) overrides ``default``. Idempotent. Call it as early as possible in a
    process: blocks already mapped stay mapped, only later allocations follow the new rules.
    """
    if "applied" in _state:
        return bool(_state["applied"])
    mode = os.environ.get("SHE_MALLOC", default).lower()
    if mode not in ("tuned", "system"):
        raise UserError(f"SHE_MALLOC={mode!r}: use tuned or system")
    applied = False
    if mode == "tuned":
        libc = _glibc()
        if libc is not None:
            applied = all([
                libc.mallopt(M_MMAP_MAX, 0) == 1,  # large blocks from the heap too, so they are reused
                libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1,  # never give the heap's top back
                libc.mallopt(M_TOP_PAD, 64 << 20) == 1,  # grow the heap 64 MiB at a time
            ])
    _state["applied"] = applied
    return applied


def cpu_bf16_native() -> bool:
    """Whether oneDNN counts this CPU as running bf16 matmuls well (``torch.ops.mkldnn._is_mkldnn_bf16_supported``:
    AVX-512 and up, AMX, ARM's BF16); elsewhere bf16 is emulated and float32 is the faster choice."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``), or None where there is no procfs."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> tuple[int | None, int | None]:
    """Between the jobs of a multi-job process: collect garbage, then give the C heap's free pages back to the
    OS (glibc's ``malloc_trim(0)``, which also releases free pages inside the heap, not only at its top).
    Returns resident bytes (before, after); either is None where it cannot be read. A no-op but for the
    garbage collection on other C libraries."""
    import gc

    before = resident_bytes()
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return before, resident_bytes()


def _glibc():
    """The process's glibc, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    gnu_get_libc_version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


__all__ = ["allocator_default", "release_memory", "resident_bytes", "tune_allocator"]
