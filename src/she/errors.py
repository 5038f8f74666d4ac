"""The error a user can fix: bad input, a bad config, a bad command-line argument.

``UserError`` subclasses ``ValueError`` so code and tests that expect a ``ValueError`` for bad input keep
working. The CLI prints a ``UserError`` as one line and exits with status 2; internal checks (shapes,
invariants) raise plain ``ValueError``/``RuntimeError`` and are meant to show their traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input that the user can correct; ``str()`` is one readable line."""


__all__ = ["UserError"]
