"""Writes that never leave a half-written file in place of a good one.

`Staged(directory)` hands out temporary names beside the final ones (`.<name>.tmp-<pid>`); the
caller writes every file there, and on leaving the block without an error the files are renamed
into place together (a rename needs no free space, so a full disk can only fail the writes,
before anything is replaced). On an error the temporary files are removed, the previous files
are left as they were, and an `OSError` (a full disk: ENOSPC) becomes a one-line
:class:`WriteError` naming the file that could not be written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from apo_jax.errors import UserError


class WriteError(UserError, OSError):
    """A file could not be written (e.g. a full disk); the previous file is kept."""


class Staged:
    """Files written under temporary names in `directory`, renamed into place together.

    Use as a context manager: `path(name)` gives the name to write `name` under; the block's
    normal end renames them all, an exception removes them.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._pending: list[tuple[str, str]] = []  # (temporary, final)

    def path(self, name: str) -> str:
        """The temporary path to write `name` (a file name in `directory`) under."""
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.tmp-{os.getpid()}")
        self._pending.append((tmp, final))
        return tmp

    def __enter__(self) -> Staged:
        os.makedirs(self.directory, exist_ok=True)
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if error is None:
            try:
                for tmp, final in self._pending:
                    os.replace(tmp, final)
            except OSError as e:
                self._abort()
                raise self._error(e) from None
            return
        self._abort()
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise self._error(error) from None

    def _abort(self) -> None:
        for tmp, _ in self._pending:
            try:
                os.remove(tmp)
            except OSError:
                pass

    def _error(self, e: OSError) -> WriteError:
        final = self._final(e.filename)
        return WriteError(
            f"{final}: cannot write it ({e.strerror or e}); nothing in {self.directory} was "
            f"replaced (the previous {os.path.basename(final)}, if any, is kept)",
        )

    def _final(self, filename: Any) -> str:
        """The final name of the file an error is about (the last one started when unknown)."""
        for tmp, final in self._pending:
            if filename in (tmp, final):
                return final
        return self._pending[-1][1] if self._pending else self.directory


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_path)` and renames the result to `path` (see `Staged`)."""
    path = os.fspath(path)
    with Staged(os.path.dirname(path) or ".") as staged:
        write(staged.path(os.path.basename(path)))
