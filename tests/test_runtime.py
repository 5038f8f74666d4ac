"""she/runtime.py: the allocator settings are applied on glibc and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from she.runtime import _glibc

CODE = "from she.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SHE_MALLOC"} | env_extra
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; this C library is another one")
def test_applied_on_glibc_and_idempotent():
    assert _run({}) == ["True", "True"]


def test_switched_off_by_environment():
    assert _run({"SHE_MALLOC": "system"}) == ["False", "False"]


def test_bad_mode_is_a_user_error():
    env = {k: v for k, v in os.environ.items() if k != "SHE_MALLOC"} | {"SHE_MALLOC": "fast"}
    res = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "SHE_MALLOC='fast'" in res.stderr


@pytest.mark.parametrize("argv, default", [(["data", "validate", "/nonexistent.jsonl"], "tuned"),
                                           (["compare", "/nonexistent.yaml"], "system"),
                                           (["demo", "--config", "/nonexistent.yaml"], "system"),
                                           (["train", "srpo", "--config", "/nonexistent.yaml"], "system"),
                                           (["train", "grpo", "--config", "/nonexistent.yaml"], "system"),
                                           (["train", "sft", "--config", "/nonexistent.yaml"], "tuned")])
def test_cli_tunes_fixed_shape_jobs_and_leaves_multi_job_and_rl_commands_alone(monkeypatch, argv, default):
    import she.cli
    import she.runtime

    calls = []
    monkeypatch.setattr(she.runtime, "tune_allocator", lambda default="tuned": calls.append(default) or True)
    with pytest.raises(SystemExit):
        she.cli.main(argv)
    assert calls == [default]


RELEASE = """
from she.runtime import release_memory, resident_bytes, tune_allocator
tune_allocator()  # freed memory stays in the heap ...
blocks = [bytearray(64 << 20) for _ in range(8)]  # 512 MiB touched
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])
del blocks
before, after = release_memory()  # ... until it is handed back
print(before, after, resident_bytes())
"""


@pytest.mark.skipif(_glibc() is None or not os.path.exists("/proc/self/statm"), reason="glibc and procfs only")
def test_release_memory_returns_a_tuned_heap_to_the_os():
    env = {k: v for k, v in os.environ.items() if k != "SHE_MALLOC"}
    before, after, now = map(int, subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                                                 text=True, check=True).stdout.split())
    assert before - after > 400 << 20  # the 512 MiB freed into the tuned heap went back to the OS
    assert abs(now - after) < 64 << 20


def test_heap_trim_callback_trims_every_n_steps_and_logs_rss(monkeypatch):
    from types import SimpleNamespace

    import she.runtime
    from she.training.trainer_setup import heap_trim_callback

    assert heap_trim_callback(0) is None
    calls = []
    monkeypatch.setattr(she.runtime, "release_memory", lambda: calls.append(1) or (5 << 30, 3 << 29))
    cb = heap_trim_callback(2)
    state = SimpleNamespace(global_step=0, log_history=[])
    for step in (1, 2, 3):
        state.global_step = step
        cb.on_step_end(None, state, None)
    assert len(calls) == 1  # step 2 only
    state.log_history.append({"loss": 1.0, "step": 3})
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    assert logs["rss_gb"] == 1.5 and state.log_history[-1]["rss_gb"] == 1.5
