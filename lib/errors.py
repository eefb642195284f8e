"""The one error type a user sees.

Job entry points turn :class:`UserError` into a single line on stderr and exit code 2,
so bad input never ends in a traceback. Raise it for anything the user can fix (a path,
a flag, a file); let programming errors propagate as ordinary exceptions.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input that the user can fix. ``str(err)`` is the whole message, one line."""

    def __init__(self, message: str):
        # Keep the promise of one line even when a caught exception's text spans several.
        super().__init__(" ".join(str(message).split()))
