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


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's; this C library is another one")
def test_cli_applies_it_before_parsing(monkeypatch):
    import she.cli
    import she.runtime

    calls = []
    monkeypatch.setattr(she.runtime, "tune_allocator", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        she.cli.main(["--version"])
    assert calls == [1]
