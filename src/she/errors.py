"""The error a user can fix: bad input, a bad config, a bad command-line argument.

``UserError`` subclasses ``ValueError`` so code and tests that expect a ``ValueError`` for bad input keep
working. The CLI prints a ``UserError`` as one line and exits with status 2; internal checks (shapes,
invariants) raise plain ``ValueError``/``RuntimeError`` and are meant to show their traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input that the user can correct; ``str()`` is one readable line."""


def env_switch(enabled: bool | None, env: str, on: str, off: str) -> bool:
    """A two-valued switch: ``enabled`` as given, or for ``None`` the environment variable ``env`` (``on``, the
    default, or ``off``); any other value is a :class:`UserError` naming the variable."""
    import os

    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(env, on)
    if value not in (on, off):
        raise UserError(f"{env} must be {on!r} or {off!r}, got {value!r}")
    return value == on


__all__ = ["UserError", "env_switch"]
