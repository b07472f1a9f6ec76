"""User-facing errors: one line on stderr, exit status 2, no traceback.

Every error a user can fix (a config field, a file, a record, a checkpoint) subclasses
:class:`UserError` and says in its message what is wrong and what to do. Commands run their body
through :func:`guard`, which turns such an error into ``error: <message>``. Setting the
environment variable ``APO_JAX_DEBUG=1`` re-raises instead, so the traceback is shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
DEBUG_ENV = "APO_JAX_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message names the field, file or record, and the fix."""


def debug() -> bool:
    """Whether tracebacks are wanted (``APO_JAX_DEBUG`` set to anything but '', '0')."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: object) -> str:
    """The message on one line (newlines folded), as commands print it."""
    return " ".join(str(message).split())


def guard(fn: Callable[[], T]) -> T:
    """Runs ``fn()``; a :class:`UserError` prints ``error: <message>`` and exits 2."""
    try:
        return fn()
    except UserError as e:
        if debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
