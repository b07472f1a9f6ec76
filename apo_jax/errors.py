"""User-facing errors: one line on stderr, exit status 2, no traceback.

Every error a user can fix (a config field, a file, a record, a checkpoint) subclasses
:class:`UserError` and says in its message what is wrong and what to do. Commands run their body
through :func:`guard`, which turns such an error into ``error: <message>`` (exit 2), an OSError
into one line naming the file (exit 2) and Ctrl-C into one line (exit 130). Setting the
environment variable ``APO_JAX_DEBUG=1`` re-raises instead, so the traceback is shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
APO_JAX_DEBUG_HINT = "APO_JAX_DEBUG=1 shows the traceback"
DEBUG_ENV = "APO_JAX_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message names the field, file or record, and the fix."""


def debug() -> bool:
    """Whether tracebacks are wanted (``APO_JAX_DEBUG`` set to anything but '', '0')."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: object) -> str:
    """The message on one line (newlines folded), as commands print it."""
    return " ".join(str(message).split())


def guard(fn: Callable[[], T], *, interrupted: str = "interrupted (Ctrl-C)") -> T:
    """Runs ``fn()`` as a command's body, so that no expected failure shows a traceback.

    A :class:`UserError` prints ``error: <message>`` and exits 2; an ``OSError`` that reached
    here (a full disk, a permission) prints ``error: <file>: <reason>`` and exits 2; Ctrl-C
    prints the one line ``interrupted`` and exits 130 (128 + SIGINT, as shells do).
    """
    try:
        return fn()
    except UserError as e:
        if debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        if debug():
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{one_line(e.strerror or e)} ({APO_JAX_DEBUG_HINT})", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if debug():
            raise
        print(f"apo_jax: {interrupted}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
