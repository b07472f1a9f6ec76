"""User-facing errors: one line on stderr, exit status 2, no traceback.

Every error a user can fix (a config field, a file, a record, a checkpoint) subclasses
:class:`UserError` and says in its message what is wrong and what to do. Commands run their body
through :func:`guard`, which turns such an error into ``error: <message>`` (exit 2), an OSError
into one line naming the file (exit 2) and Ctrl-C into one line (exit 130). Setting the
environment variable ``APO_JAX_DEBUG=1`` re-raises instead, so the traceback is shown.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
APO_JAX_DEBUG_HINT = "APO_JAX_DEBUG=1 shows the traceback"
DEBUG_ENV = "APO_JAX_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message names the field, file or record, and the fix."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work: a run's config field (`apo_jax.config`), a model config field
    or a Hugging Face config.json the model cannot represent (`apo_jax.models.config`). The
    message names the field."""


def debug() -> bool:
    """Whether tracebacks are wanted (``APO_JAX_DEBUG`` set to anything but '', '0')."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: object) -> str:
    """The message on one line (newlines folded), as commands print it."""
    return " ".join(str(message).split())


_ctrl_c = threading.Event()  # set by the first Ctrl-C a guarded command receives


def _on_sigint(signum: int, frame: object) -> None:
    _ctrl_c.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raises KeyboardInterrupt when a Ctrl-C came in and was lost on its way up.

    Python delivers Ctrl-C as an exception wherever the main thread happens to be; when that is a
    finalizer, a weakref callback or a C extension that clears errors, the exception is swallowed
    and the command would go on as if nothing happened. Commands call this before they publish
    their output, and :func:`guard` calls it when the body returns, so a Ctrl-C always ends the
    command with exit 130 and nothing half-published.
    """
    if _ctrl_c.is_set():
        raise KeyboardInterrupt


@contextmanager
def _ctrl_c_recorded() -> Iterator[None]:
    """While a command runs: Ctrl-C is recorded (and still raised), and a KeyboardInterrupt that
    a finalizer swallows is recorded instead of printed ("Exception ignored in ...")."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # a handler of the caller's own (or not the main thread): leave it alone
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable: object) -> None:
        if isinstance(getattr(unraisable, "exc_value", None), KeyboardInterrupt):
            _ctrl_c.set()
            return
        previous_hook(unraisable)  # type: ignore[arg-type]

    _ctrl_c.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


def guard(fn: Callable[[], T], *, interrupted: str = "interrupted (Ctrl-C)") -> T:
    """Runs ``fn()`` as a command's body, so that no expected failure shows a traceback.

    A :class:`UserError` prints ``error: <message>`` and exits 2; an ``OSError`` that reached
    here (a full disk, a permission) prints ``error: <file>: <reason>`` and exits 2; Ctrl-C
    prints the one line ``interrupted`` and exits 130 (128 + SIGINT, as shells do).
    """
    try:
        with _ctrl_c_recorded():
            result = fn()
            check_interrupted()
        return result
    except UserError as e:
        if debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        if debug():
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(
            f"error: {where}{one_line(e.strerror or e)} ({APO_JAX_DEBUG_HINT})",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if debug():
            raise
        print(f"apo_jax: {interrupted}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
