"""she.patching.scoped_patch: installed by the first open block, restored by the last, across threads and errors."""

from __future__ import annotations

import threading
import types

import pytest

from she.patching import scoped_patch


def _owner():
    return types.SimpleNamespace(f=lambda: "original")


def test_nested_blocks_restore_once_the_last_closes():
    owner = _owner()
    original = owner.f
    new = lambda: "patched"  # noqa: E731
    with scoped_patch(owner, "f", new):
        assert owner.f() == "patched"
        with scoped_patch(owner, "f", new):
            assert owner.f is new
        assert owner.f is new
    assert owner.f is original


def test_restored_after_an_error_and_other_attributes_independent():
    owner = _owner()
    owner.g = "g"
    original = owner.f
    with pytest.raises(KeyError), scoped_patch(owner, "f", len), scoped_patch(owner, "g", "h"):
        assert (owner.f, owner.g) == (len, "h")
        raise KeyError("x")
    assert (owner.f, owner.g) == (original, "g")


def test_a_different_replacement_while_open_is_refused():
    owner = _owner()
    with scoped_patch(owner, "f", len):
        with pytest.raises(RuntimeError, match="already replaced"), scoped_patch(owner, "f", abs):
            pass
        assert owner.f is len  # the refused block changed nothing
    assert owner.f() == "original"


def test_threads_share_the_patch_until_the_last_block_closes():
    owner = _owner()
    original = owner.f
    inside, release = threading.Event(), threading.Event()

    def worker():
        with scoped_patch(owner, "f", len):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(5)
    with scoped_patch(owner, "f", len):
        pass
    assert owner.f is len  # the worker's block is still open
    release.set()
    t.join(5)
    assert owner.f is original


def test_thread_routed_patch_counts_this_threads_blocks():
    import threading

    from she.patching import thread_routed_patch

    class Owner:
        f = staticmethod(len)

    owner, local, seen = Owner(), threading.local(), []
    with thread_routed_patch(owner, "f", abs, local):
        assert owner.f is abs and local.depth == 1
        with thread_routed_patch(owner, "f", abs, local):
            assert local.depth == 2
        t = threading.Thread(target=lambda: seen.append(getattr(local, "depth", 0)))
        t.start()
        t.join()
        assert local.depth == 1
    assert seen == [0]  # another thread sees the replacement but no open block of its own
    assert owner.f is len and local.depth == 0
    with pytest.raises(KeyError), thread_routed_patch(owner, "f", abs, local):
        raise KeyError("x")
    assert owner.f is len and local.depth == 0
